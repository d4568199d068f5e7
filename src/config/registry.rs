//! The experiment registry: `configs/experiments.toml` (built into the binary,
//! replaceable with `--config FILE`), a `[defaults]` table merged under every
//! `[experiments.NAME]` table.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::experiment::Experiment;

/// The shipped presets (configs/experiments.toml).
pub const BUILTIN: &str = include_str!("../../configs/experiments.toml");

/// Named experiments in file order of their names.
#[derive(Clone, Debug, PartialEq)]
pub struct Registry {
    pub experiments: BTreeMap<String, Experiment>,
    /// The raw, merged table of each experiment (sweeps edit these).
    pub tables: BTreeMap<String, toml::Table>,
}

/// Recursively overlays `over` on `base`.
pub fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Registry {
    /// Parses a registry document; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Registry> {
        let doc: toml::Table =
            toml::from_str(text).with_context(|| format!("{origin}: invalid TOML"))?;
        let mut defaults = toml::Table::new();
        let mut raw = toml::Table::new();
        for (k, v) in doc {
            match (k.as_str(), v) {
                ("defaults", toml::Value::Table(t)) => defaults = t,
                ("experiments", toml::Value::Table(t)) => raw = t,
                (other, _) => bail!(
                    "{origin}: unknown top-level key '{other}'; expected [defaults] and [experiments.NAME] tables"
                ),
            }
        }
        let mut registry = Registry {
            experiments: BTreeMap::new(),
            tables: BTreeMap::new(),
        };
        for (name, v) in raw {
            let toml::Value::Table(t) = v else {
                bail!("{origin}: experiments.{name} must be a table");
            };
            let mut table = defaults.clone();
            merge(&mut table, &t);
            let exp =
                Experiment::from_table(&name, table.clone()).with_context(|| origin.to_string())?;
            registry.experiments.insert(name.clone(), exp);
            registry.tables.insert(name, table);
        }
        Ok(registry)
    }

    /// The built-in presets.
    pub fn builtin() -> Registry {
        Registry::parse(BUILTIN, "configs/experiments.toml (built in)")
            .expect("built-in presets are valid")
    }

    /// The registry in `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> Result<Registry> {
        match path {
            None => Ok(Registry::builtin()),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read experiment config", p.display()))?;
                Registry::parse(&text, &p.display().to_string())
            }
        }
    }

    /// The experiment called `name`; an unknown name lists the known ones.
    pub fn get(&self, name: &str) -> Result<&Experiment> {
        self.experiments
            .get(name)
            .with_context(|| format!("unknown experiment '{name}'; known: {}", self.known()))
    }

    /// The experiment names, comma-separated (for error messages).
    pub fn known(&self) -> String {
        self.experiments
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantSpec;
    use crate::tensor::DType;

    #[test]
    fn builtin_presets_are_the_original_studys() {
        let r = Registry::builtin();
        let names: Vec<&str> = r.experiments.keys().map(String::as_str).collect();
        for want in [
            "fp16_baseline",
            "bf16_baseline",
            "bnb_8bit",
            "bnb_4bit_nf4",
            "bnb_4bit_nf4_no_double",
            "bnb_4bit_fp4",
            "bnb_4bit_nf4_bf16",
            "gptq_4bit_g128",
            "gptq_4bit_g32",
            "gptq_3bit_g128",
            "awq_4bit_g128",
        ] {
            assert!(names.contains(&want), "missing preset {want}");
        }
        let nf4 = r.get("bnb_4bit_nf4").unwrap();
        let QuantSpec::Nf4(c) = &nf4.quant else {
            panic!("{:?}", nf4.quant)
        };
        assert!(c.double_quant);
        assert_eq!(c.compute_dtype, DType::F16);
        let no_dq = r.get("bnb_4bit_nf4_no_double").unwrap();
        assert!(matches!(&no_dq.quant, QuantSpec::Nf4(c) if !c.double_quant));
        assert_eq!(r.get("bf16_baseline").unwrap().dtype, DType::BF16);
        assert!(
            matches!(&r.get("gptq_3bit_g128").unwrap().quant, QuantSpec::Gptq(g) if g.bits == 3 && g.group_size == 128)
        );
    }

    #[test]
    fn defaults_merge_and_unknown_keys_fail() {
        let text = r#"
            [defaults]
            model = "synth:tiny"
            [defaults.eval]
            limit = 3
            [experiments.a]
            quant = { method = "nf4" }
            [experiments.a.eval]
            batch_size = 2
        "#;
        let r = Registry::parse(text, "t.toml").unwrap();
        let a = r.get("a").unwrap();
        assert_eq!(a.model.as_deref(), Some("synth:tiny"));
        assert_eq!((a.eval.limit, a.eval.batch_size), (Some(3), 2));
        let bad = "[experiments.a]\nquant = { method = \"nf4\" }\nlimt = 3\n";
        let e = format!("{:#}", Registry::parse(bad, "t.toml").unwrap_err());
        assert!(e.contains("limt") && e.contains("experiment 'a'"), "{e}");
        let e = format!("{:#}", r.get("nope").unwrap_err());
        assert!(
            e.contains("unknown experiment 'nope'") && e.contains("known: a"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Registry::parse("[experiment.a]\n", "t.toml").unwrap_err()
        );
        assert!(e.contains("unknown top-level key 'experiment'"), "{e}");
    }
}
