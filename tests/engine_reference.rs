//! The CPU engine against a straightforward f64 Llama written here, plus
//! batching and KV-cache invariants.

use quantbench::backend::StepLayout;
use quantbench::backend::cpu::CpuBackend;
use quantbench::io::load_model;
use quantbench::model::{GenerationConfig, LlamaConfig, LlamaWeights, Model, generate};
use quantbench::quant::LinearWeight;

fn mat(w: &LinearWeight) -> Vec<f64> {
    w.dequantize().iter().map(|&v| v as f64).collect()
}

/// y = x · Wᵀ for W [out, in].
fn linear(x: &[f64], w: &[f64], out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out)
        .map(|o| (0..inp).map(|i| x[i] * w[o * inp + i]).sum())
        .collect()
}

fn rms_norm(x: &[f64], g: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, &g)| v * inv * g as f64).collect()
}

/// Inverse frequencies, llama3 scaling written out from its definition.
fn inv_freq(c: &LlamaConfig) -> Vec<f64> {
    let d = c.head_dim as f64;
    (0..c.head_dim / 2)
        .map(|i| {
            let f = c.rope_theta.powf(-(2.0 * i as f64) / d);
            match &c.rope_scaling {
                None => f,
                Some(s) => {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let old = s.original_max_position_embeddings as f64;
                    if wavelen < old / s.high_freq_factor {
                        f
                    } else if wavelen > old / s.low_freq_factor {
                        f / s.factor
                    } else {
                        let t = (old / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - t) * f / s.factor + t * f
                    }
                }
            }
        })
        .collect()
}

fn rope(v: &mut [f64], pos: usize, freqs: &[f64]) {
    let half = v.len() / 2;
    for i in 0..half {
        let (s, c) = (pos as f64 * freqs[i]).sin_cos();
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

/// Logits of every position of `tokens`, all in f64, no cache.
fn reference_logits(w: &LlamaWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &w.config;
    let (h, hd, nq, nkv) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
    );
    let eps = c.rms_norm_eps;
    let freqs = inv_freq(c);
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            w.embed_tokens.data[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for layer in &w.layers {
        let (wq, wk, wv, wo) = (
            mat(&layer.q_proj),
            mat(&layer.k_proj),
            mat(&layer.v_proj),
            mat(&layer.o_proj),
        );
        let (wg, wu, wd) = (
            mat(&layer.gate_proj),
            mat(&layer.up_proj),
            mat(&layer.down_proj),
        );
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in xs.iter().enumerate() {
            let n = rms_norm(x, &layer.input_layernorm, eps);
            let mut q = linear(&n, &wq, nq * hd);
            let mut k = linear(&n, &wk, nkv * hd);
            for head in q.chunks_mut(hd).chain(k.chunks_mut(hd)) {
                rope(head, pos, &freqs);
            }
            qs.push(q);
            ks.push(k);
            vs.push(linear(&n, &wv, nkv * hd));
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0.0; nq * hd];
            for head in 0..nq {
                let g = head / (nq / nkv);
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][g * hd..(g + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += p / z * vs[j][g * hd + d];
                    }
                }
            }
            let o = linear(&attn, &wo, h);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let n = rms_norm(x, &layer.post_attention_layernorm, eps);
            let g = linear(&n, &wg, c.intermediate_size);
            let u = linear(&n, &wu, c.intermediate_size);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = linear(&act, &wd, h);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    let head = match &w.lm_head {
        Some(l) => mat(l),
        None => w.embed_tokens.data.iter().map(|&v| v as f64).collect(),
    };
    xs.iter()
        .map(|x| linear(&rms_norm(x, &w.norm, eps), &head, c.vocab_size))
        .collect()
}

fn max_relative_error(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        / scale
}

#[test]
fn logits_match_f64_reference_for_tied_and_untied_models() {
    for name in ["synth:tiny", "synth:tiny-untied"] {
        let loaded = load_model(name).unwrap();
        let tokens: Vec<u32> = (0..80).map(|i| (i * 37 + 11) % 300).collect();
        let want = reference_logits(&loaded.weights, &tokens);
        let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
        let got = model.sequence_logits(&tokens).unwrap();
        let vocab = loaded.weights.config.vocab_size;
        for (pos, w) in want.iter().enumerate() {
            let err = max_relative_error(&got[pos * vocab..(pos + 1) * vocab], w);
            assert!(err < 1e-4, "{name} position {pos}: relative error {err}");
        }
    }
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    let loaded = load_model("synth:tiny").unwrap();
    let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 53 + 7) % 300).collect();
    let full = model.sequence_logits(&tokens).unwrap();
    let vocab = loaded.weights.config.vocab_size;
    // Prefill 10 tokens, then one token per step.
    let mut cache = model.new_cache(1, tokens.len()).unwrap();
    let layout = StepLayout::new([(0, 0, &tokens[..10])]).unwrap();
    model.forward(&layout, &mut cache, true).unwrap();
    for pos in 10..tokens.len() {
        let layout = StepLayout::new([(0, pos, &tokens[pos..pos + 1])]).unwrap();
        let logits = model.forward(&layout, &mut cache, false).unwrap().data;
        let want = &full[pos * vocab..(pos + 1) * vocab];
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (g, w) in logits.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5 * scale, "position {pos}: {g} vs {w}");
        }
    }
}

#[test]
fn greedy_steps_pick_the_first_largest_logit_of_each_sequence() {
    let loaded = load_model("synth:tiny").unwrap();
    let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let vocab = loaded.weights.config.vocab_size;
    let prompts: [Vec<u32>; 2] = [vec![5, 9, 200, 31], vec![17]];
    let (mut by_logits, mut by_greedy) = (
        model.new_cache(2, 16).unwrap(),
        model.new_cache(2, 16).unwrap(),
    );
    let mut steps: Vec<(usize, usize, Vec<u32>)> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i, 0, p.clone()))
        .collect();
    for _ in 0..6 {
        let layout =
            StepLayout::new(steps.iter().map(|(s, at, t)| (*s, *at, t.as_slice()))).unwrap();
        let logits = model.forward(&layout, &mut by_logits, false).unwrap().data;
        let want: Vec<u32> = logits
            .chunks(vocab)
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect();
        assert_eq!(model.greedy(&layout, &mut by_greedy).unwrap(), want);
        for ((_, at, t), id) in steps.iter_mut().zip(want) {
            *at += t.len();
            *t = vec![id];
        }
    }
}

#[test]
fn ragged_batch_generates_the_same_tokens_as_one_by_one() {
    let loaded = load_model("synth:tiny").unwrap();
    let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let tok = &loaded.tokenizer;
    let texts = [
        "a",
        "The quick brown fox",
        "Q: where?\n\nA:",
        "a much longer prompt than the others, to make the batch ragged",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        stop_strings: vec![],
        stop_at_eos: false,
    };
    let batch = generate(&model, tok, &prompts, &cfg).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&model, tok, std::slice::from_ref(p), &cfg).unwrap();
        assert_eq!(single[0], batch[i], "prompt {i}");
        assert_eq!(batch[i].as_ref().unwrap().tokens.len(), 24);
    }
    // The continuations differ between prompts (the model is not degenerate).
    assert_ne!(batch[0], batch[1]);
}

#[test]
fn stop_strings_cut_the_text_and_end_generation() {
    let loaded = load_model("synth:tiny").unwrap();
    let model = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let tok = &loaded.tokenizer;
    let prompt = tok.encode("hello", true).unwrap();
    let free = GenerationConfig {
        max_new_tokens: 16,
        stop_strings: vec![],
        stop_at_eos: false,
    };
    let text = generate(&model, tok, std::slice::from_ref(&prompt), &free).unwrap()[0]
        .clone()
        .unwrap()
        .text;
    // Stop on the 4th..5th characters of the free continuation.
    let stop: String = text.chars().skip(3).take(2).collect();
    let cut = text.find(&stop).unwrap();
    let stopped = generate(
        &model,
        tok,
        &[prompt],
        &GenerationConfig {
            stop_strings: vec![stop],
            ..free
        },
    )
    .unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(stopped.text, text[..cut]);
    assert_eq!(stopped.stop, quantbench::model::StopReason::StopString);
}
