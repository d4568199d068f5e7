//! The accuracy stages of one experiment: sanity prompts, then CoQA, each
//! recorded into the experiment's result as soon as it finishes.

use std::time::Instant;

use anyhow::{Context, Result};

use super::result::{ExperimentResult, SanitySample};
use super::store::RunStore;
use crate::backend::Backend;
use crate::config::Experiment;
use crate::eval::coqa::{self, CoqaOptions};
use crate::eval::coqa_source::CoqaSource;
use crate::eval::encode::BosPolicy;
use crate::eval::sanity;
use crate::io::tokenizer::Tokenizer;
use crate::model::Model;

/// Runs the evaluations `exp` asks for on `model`, filling `result`. CoQA
/// records go to the run directory and are resumed by a rerun.
pub fn run_evaluations<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    exp: &Experiment,
    store: &RunStore,
    result: &mut ExperimentResult,
) -> Result<()> {
    let mut details = serde_json::Map::new();
    if exp.eval.sanity {
        let t = Instant::now();
        let s = sanity::run(
            model,
            tokenizer,
            &sanity::PROMPTS,
            exp.eval.sanity_tokens,
            BosPolicy::Auto,
        )
        .context("sanity prompts")?;
        result.sanity = s
            .samples
            .iter()
            .map(|x| SanitySample {
                prompt: x.prompt.clone(),
                output: x.output.clone(),
            })
            .collect();
        result.timings.sanity_s = t.elapsed().as_secs_f64();
    }
    if exp.eval.coqa {
        let source = match &exp.eval.coqa_data {
            Some(p) => CoqaSource::parse(&p.to_string_lossy()),
            None => CoqaSource::Fixture,
        };
        let docs = source
            .load()
            .with_context(|| format!("CoQA data from {source}"))?;
        let docs = coqa::limit_docs(&docs, exp.eval.limit);
        let opts = CoqaOptions {
            batch_size: exp.eval.batch_size,
            model: format!("{} {}", result.model, result.config),
            ..CoqaOptions::default()
        };
        let records = store.records_path(&exp.name);
        let r = coqa::evaluate(model, tokenizer, docs, &opts, Some(&records))
            .context("CoQA evaluation")?;
        result.accuracy.coqa_f1 = Some(r.f1);
        result.accuracy.coqa_f1_stderr = r.f1_stderr;
        result.accuracy.coqa_em = Some(r.em);
        result.accuracy.coqa_em_stderr = r.em_stderr;
        result.accuracy.coqa_docs = Some(r.docs);
        let mut v = serde_json::to_value(&r)?;
        v["source"] = serde_json::Value::String(source.to_string());
        details.insert("coqa".into(), v);
    }
    result.eval_details = serde_json::Value::Object(details);
    Ok(())
}
