//! CoQA evaluation on a real engine: batching does not change results, and an
//! interrupted evaluation resumes from its records file.

use quantbench::backend::cpu::CpuBackend;
use quantbench::eval::coqa::{CoqaOptions, evaluate, limit_docs};
use quantbench::eval::coqa_data::fixture;
use quantbench::io::load_model;
use quantbench::model::Model;

fn options(batch_size: usize) -> CoqaOptions {
    CoqaOptions {
        batch_size,
        max_new_tokens: 24,
        model: "synth:tiny".into(),
        ..CoqaOptions::default()
    }
}

#[test]
fn batched_evaluation_equals_one_by_one() {
    let loaded = load_model("synth:tiny").unwrap();
    let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let docs = fixture().unwrap();
    let one = evaluate(&model, &loaded.tokenizer, &docs, &options(1), None).unwrap();
    let many = evaluate(&model, &loaded.tokenizer, &docs, &options(4), None).unwrap();
    assert_eq!(one.docs, docs.len());
    assert_eq!(one.records.len(), many.records.len());
    for (a, b) in one.records.iter().zip(&many.records) {
        assert_eq!(a.doc_id, b.doc_id);
        assert_eq!(a.output, b.output, "document {}", a.doc_id);
        assert_eq!((a.f1, a.em), (b.f1, b.em));
    }
    assert_eq!((one.f1, one.em), (many.f1, many.em));
}

#[test]
fn interrupted_evaluation_resumes_from_records() {
    let loaded = load_model("synth:tiny").unwrap();
    let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let docs = fixture().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("coqa.jsonl");
    // The first run stops after two documents (as if interrupted)...
    let first = evaluate(
        &model,
        &loaded.tokenizer,
        limit_docs(&docs, Some(2)),
        &options(2),
        Some(&path),
    )
    .unwrap();
    assert_eq!((first.computed, first.resumed), (2, 0));
    let saved = std::fs::read_to_string(&path).unwrap();
    // ...the rerun keeps those two and computes only the rest.
    let second = evaluate(&model, &loaded.tokenizer, &docs, &options(2), Some(&path)).unwrap();
    assert_eq!((second.computed, second.resumed), (docs.len() - 2, 2));
    assert!(std::fs::read_to_string(&path).unwrap().starts_with(&saved));
    let fresh = evaluate(&model, &loaded.tokenizer, &docs, &options(3), None).unwrap();
    assert_eq!((second.f1, second.em), (fresh.f1, fresh.em));
    for (a, b) in second.records.iter().zip(&fresh.records) {
        assert_eq!(a.output, b.output);
    }
}
