//! The CUDA backend against the CPU backend: every op on random inputs, the
//! full model's logits, greedy generations, and out-of-memory reporting.
//! Needs a CUDA GPU (`cargo test --release --features cuda --test cuda_backend`).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use half::f16;
use quantbench::backend::cpu::{CpuBackend, CpuTensor};
use quantbench::backend::cuda::{CudaBackend, CudaTensor};
use quantbench::backend::{Backend, CacheShape, HeadShape, StepLayout};
use quantbench::io::load_model;
use quantbench::model::rope::inv_freq;
use quantbench::model::synth::synth_config;
use quantbench::model::{GenerationConfig, Model, generate};
use quantbench::quant::bnb4::{Bnb4Matrix, Bnb4Options, Bnb4Type};
use quantbench::quant::int8::Int8Matrix;
use quantbench::quant::packed::PackedIntMatrix;
use quantbench::quant::{LinearWeight, QuantSpec};
use quantbench::tensor::{DType, HostTensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("cuda:0")
}

fn randn(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    let d = Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| d.sample(rng)).collect()
}

fn pair(g: &CudaBackend, rows: usize, cols: usize, data: &[f32]) -> (CpuTensor, CudaTensor) {
    (
        CpuTensor::new(rows, cols, data.to_vec()).unwrap(),
        g.tensor_from_host(rows, cols, data).unwrap(),
    )
}

/// Largest absolute difference relative to the largest reference magnitude.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()))
        / scale
}

fn check(what: &str, g: &CudaBackend, got: &CudaTensor, want: &CpuTensor, tol: f64) {
    let (r, c, v) = g.to_host(got).unwrap();
    assert_eq!((r, c), (want.rows, want.cols), "{what}: shape");
    assert!(v.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let e = rel_err(&v, &want.data);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
    println!("{what}: relative error {e:.2e} (bound {tol:.0e})");
}

fn dense(rows: usize, cols: usize, dtype: DType, data: &[f32]) -> LinearWeight {
    let mut t = HostTensor::new(vec![rows, cols], DType::F32, data.to_vec()).unwrap();
    t.round_to(dtype);
    t.dtype = dtype;
    LinearWeight::Dense(t)
}

fn step(parts: &[(usize, usize, Vec<u32>)]) -> StepLayout {
    StepLayout::new(parts.iter().map(|(s, p, t)| (*s, *p, t.as_slice()))).unwrap()
}

#[test]
fn embedding_gathers_rows_exactly_for_every_dtype() {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(1);
    let (vocab, hidden) = (300, 96);
    let table = randn(&mut rng, vocab * hidden, 1.0);
    let layout = step(&[(0, 0, vec![5, 299, 0, 5]), (1, 3, vec![17])]);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let w = dense(vocab, hidden, dtype, &table);
        let want = c
            .embedding(
                &c.upload_weight(&w).unwrap(),
                &c.upload_layout(&layout).unwrap(),
            )
            .unwrap();
        let got = g
            .embedding(
                &g.upload_weight(&w).unwrap(),
                &g.upload_layout(&layout).unwrap(),
            )
            .unwrap();
        check(&format!("embedding {dtype:?}"), &g, &got, &want, 0.0);
    }
}

#[test]
fn rms_norm_silu_mul_add_match() {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, cols) in [(1, 64), (7, 576), (33, 2048), (3, 8192)] {
        let x = randn(&mut rng, rows * cols, 2.0);
        let y = randn(&mut rng, rows * cols, 2.0);
        let w: Vec<f32> = randn(&mut rng, cols, 0.1).iter().map(|v| 1.0 + v).collect();
        let (cx, gx) = pair(&g, rows, cols, &x);
        let (cy, gy) = pair(&g, rows, cols, &y);
        let want = c
            .rms_norm(&cx, &c.upload_vector(&w).unwrap(), 1e-5)
            .unwrap();
        let got = g
            .rms_norm(&gx, &g.upload_vector(&w).unwrap(), 1e-5)
            .unwrap();
        check(&format!("rms_norm {rows}x{cols}"), &g, &got, &want, 1e-5);
        let want = c.silu_mul(&cx, &cy).unwrap();
        let got = g.silu_mul(&gx, &gy).unwrap();
        check(&format!("silu_mul {rows}x{cols}"), &g, &got, &want, 1e-6);
        let (mut cx2, mut gx2) = (cx.clone(), gx);
        c.add_assign(&mut cx2, &cy).unwrap();
        g.add_assign(&mut gx2, &gy).unwrap();
        check(&format!("add_assign {rows}x{cols}"), &g, &gx2, &cx2, 0.0);
    }
}

#[test]
fn last_rows_and_argmax_match() {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(3);
    let layout = step(&[(2, 0, vec![1; 5]), (0, 9, vec![1]), (1, 4, vec![1; 3])]);
    let cols = 128_256;
    let mut x = randn(&mut rng, 9 * cols, 1.0);
    // Ties: the first index of the maximum wins.
    x[4 * cols + 7] = 50.0;
    x[4 * cols + 70_000] = 50.0;
    x[8 * cols + cols - 1] = 60.0;
    let (cx, gx) = pair(&g, 9, cols, &x);
    assert_eq!(c.argmax_rows(&cx).unwrap(), g.argmax_rows(&gx).unwrap());
    let want = c.last_rows(cx, &c.upload_layout(&layout).unwrap()).unwrap();
    let got = g.last_rows(gx, &g.upload_layout(&layout).unwrap()).unwrap();
    check("last_rows", &g, &got, &want, 0.0);
    let ids = g.argmax_rows(&got).unwrap();
    assert_eq!(ids[0], 7);
    assert_eq!(ids[2], cols as u32 - 1);
}

#[test]
fn rope_matches_with_and_without_llama3_scaling() {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(4);
    for name in ["llama-3.2-1b", "tiny-untied"] {
        let (cfg, _) = synth_config(name).unwrap();
        let (heads, hd) = (cfg.num_attention_heads, cfg.head_dim);
        let freqs = inv_freq(&cfg);
        let layout = step(&[
            (0, 0, vec![1; 4]),
            (1, 8190, vec![1; 3]),
            (2, 30_000, vec![1]),
        ]);
        let x = randn(&mut rng, 8 * heads * hd, 1.0);
        let (mut cx, mut gx) = pair(&g, 8, heads * hd, &x);
        c.rope(
            &mut cx,
            heads,
            hd,
            &c.upload_vector(&freqs).unwrap(),
            &c.upload_layout(&layout).unwrap(),
        )
        .unwrap();
        g.rope(
            &mut gx,
            heads,
            hd,
            &g.upload_vector(&freqs).unwrap(),
            &g.upload_layout(&layout).unwrap(),
        )
        .unwrap();
        check(&format!("rope {name}"), &g, &gx, &cx, 2e-5);
    }
}

/// Bound on a prefill step's attention error relative to the CPU. Head
/// sizes 64 and 128 run on tensor cores (compute capability 8.0 and later)
/// with Q·scale, K, V and the softmax probabilities rounded to f16 (11
/// significant bits) and f32 accumulation: an emulation of that arithmetic
/// measured 3e-4 to 4.2e-4 on the unit-variance inputs used here, and it
/// moved synth:smollm2-135m's logits by 3.5e-4. Other head sizes (and older
/// GPUs) run the f32 kernel. Decode steps are f32 throughout.
fn prefill_attention_tol(head_dim: usize) -> f64 {
    if matches!(head_dim, 64 | 128) {
        2e-3
    } else {
        2e-5
    }
}

/// Runs `steps` through both backends' attention on two layers of a cache
/// of `max_len` positions per slot (4 slots) and compares every output;
/// with `fused_rope` through `rope_attention` (RoPE fused into the decode
/// kernel on the GPU).
fn compare_attention(
    heads: HeadShape,
    max_len: usize,
    steps: &[StepLayout],
    seed: u64,
    fused_rope: bool,
) {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(seed);
    let HeadShape {
        q_heads,
        kv_heads,
        head_dim,
    } = heads;
    let shape = CacheShape {
        layers: 2,
        slots: 4,
        max_len,
        kv_heads,
        head_dim,
    };
    let mut cc = c.new_cache(shape).unwrap();
    let mut gc = g.new_cache(shape).unwrap();
    let freqs: Vec<f32> = (0..head_dim / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / head_dim as f32))
        .collect();
    let (cf, gf) = (
        c.upload_vector(&freqs).unwrap(),
        g.upload_vector(&freqs).unwrap(),
    );
    for (i, layout) in steps.iter().enumerate() {
        let n = layout.num_tokens();
        let q = randn(&mut rng, n * q_heads * head_dim, 1.0);
        let k = randn(&mut rng, n * kv_heads * head_dim, 1.0);
        let v = randn(&mut rng, n * kv_heads * head_dim, 1.0);
        let (cq, gq) = pair(&g, n, q_heads * head_dim, &q);
        let (ck, gk) = pair(&g, n, kv_heads * head_dim, &k);
        let (cv, gv) = pair(&g, n, kv_heads * head_dim, &v);
        let prefill = layout.seqs.iter().any(|s| s.len > 1);
        let tol = if prefill {
            prefill_attention_tol(head_dim)
        } else {
            2e-5
        };
        for layer in 0..2 {
            let cl = c.upload_layout(layout).unwrap();
            let gl = g.upload_layout(layout).unwrap();
            let (want, got) = if fused_rope {
                let (mut cq, mut gq) = pair(&g, n, q_heads * head_dim, &q);
                let (mut ck, mut gk) = pair(&g, n, kv_heads * head_dim, &k);
                (
                    c.rope_attention(&mut cq, &mut ck, &cv, &cf, &mut cc, layer, heads, &cl)
                        .unwrap(),
                    g.rope_attention(&mut gq, &mut gk, &gv, &gf, &mut gc, layer, heads, &gl)
                        .unwrap(),
                )
            } else {
                (
                    c.attention(&cq, &ck, &cv, &mut cc, layer, heads, &cl)
                        .unwrap(),
                    g.attention(&gq, &gk, &gv, &mut gc, layer, heads, &gl)
                        .unwrap(),
                )
            };
            check(
                &format!(
                    "attention {q_heads}/{kv_heads}x{head_dim} rope {fused_rope} step {i} layer {layer}"
                ),
                &g,
                &got,
                &want,
                tol,
            );
        }
    }
}

/// Runs a prefill step and then decode steps of a ragged batch through both
/// backends' attention and compares every output.
fn attention_case(q_heads: usize, kv_heads: usize, head_dim: usize, fused_rope: bool) {
    let heads = HeadShape {
        q_heads,
        kv_heads,
        head_dim,
    };
    // Prefill of ragged lengths (one longer than a 32-row tile and a 64-key
    // tile), a second chunk continuing slot 3, then ragged decode steps.
    let mut steps = vec![
        step(&[
            (0, 0, vec![1; 100]),
            (2, 0, vec![1; 1]),
            (3, 0, vec![1; 37]),
        ]),
        step(&[(3, 37, vec![1; 70]), (1, 0, vec![1; 5])]),
    ];
    for i in 0..6 {
        steps.push(step(&[
            (0, 100 + i, vec![1]),
            (1, 5 + i, vec![1]),
            (2, 1 + i, vec![1]),
            (3, 107 + i, vec![1]),
        ]));
    }
    steps.push(step(&[(2, 7, vec![1])]));
    compare_attention(heads, 300, &steps, 5 + head_dim as u64, fused_rope);
}

#[test]
fn attention_prefill_and_decode_match_on_ragged_batches() {
    for fused_rope in [false, true] {
        attention_case(32, 8, 64, fused_rope);
        attention_case(9, 3, 64, fused_rope);
        attention_case(4, 2, 16, fused_rope);
        attention_case(8, 8, 128, fused_rope);
    }
}

/// Decode over a cache longer than 1024 positions (key ranges of several
/// tiles) and with more query heads per KV head than a decode block has warps.
#[test]
fn decode_attention_matches_on_long_caches_and_large_groups() {
    for (q_heads, kv_heads, head_dim) in [(8, 2, 64), (20, 2, 32), (4, 1, 128)] {
        let heads = HeadShape {
            q_heads,
            kv_heads,
            head_dim,
        };
        let mut steps = vec![step(&[(0, 0, vec![1; 1900]), (1, 0, vec![1; 3])])];
        for i in 0..3 {
            steps.push(step(&[(0, 1900 + i, vec![1]), (1, 3 + i, vec![1])]));
        }
        for fused_rope in [false, true] {
            compare_attention(heads, 3000, &steps, 40 + head_dim as u64, fused_rope);
        }
    }
}

/// Compares `x · Wᵀ` for several batch sizes: up to 8 rows take the GEMV
/// kernels (bound `tol_gemv`), more take cuBLAS (bound `tol_gemm`); the
/// product added to a residual (`matmul_add`) within the same bounds.
fn matmul_case(what: &str, w: &LinearWeight, tol_gemv: f64, tol_gemm: f64, seed: u64) {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(seed);
    let (out_f, in_f) = w.shape();
    let cw = c.upload_weight(w).unwrap();
    let gw = g.upload_weight(w).unwrap();
    for n in [1, 2, 5, 8, 9, 64, 200] {
        let x = randn(&mut rng, n * in_f, 1.0);
        let (cx, gx) = pair(&g, n, in_f, &x);
        let want = c.matmul(&cx, &cw).unwrap();
        let got = g.matmul(&gx, &gw).unwrap();
        let tol = if n <= 8 { tol_gemv } else { tol_gemm };
        check(&format!("matmul {what} n={n}"), &g, &got, &want, tol);
        // The same product added to a residual stream (the GEMV adds in place).
        let r = randn(&mut rng, n * out_f, 1.0);
        let (mut cr, mut gr) = pair(&g, n, out_f, &r);
        c.matmul_add(&mut cr, &cx, &cw).unwrap();
        g.matmul_add(&mut gr, &gx, &gw).unwrap();
        check(&format!("matmul_add {what} n={n}"), &g, &gr, &cr, tol);
    }
}

/// A bf16 weight with as many rows as an lm_head: batches of 2 to 8 take
/// the tensor-core kernel (`gemv_bf16_mma`, split inputs), which must stay
/// within the f32 GEMV's bound.
#[test]
fn dense_bf16_mma_matches_on_lm_head_shapes() {
    let mut rng = StdRng::seed_from_u64(12);
    let (out_f, in_f) = (40_000, 1024);
    let raw = randn(&mut rng, out_f * in_f, 0.05);
    matmul_case(
        "bf16 40000x1024",
        &dense(out_f, in_f, DType::BF16, &raw),
        1e-4,
        2e-3,
        13,
    );
}

#[test]
fn dense_matmul_matches_for_every_dtype() {
    let mut rng = StdRng::seed_from_u64(6);
    for (out_f, in_f) in [(256, 2048), (130, 72), (1000, 576)] {
        let w = randn(&mut rng, out_f * in_f, 1.0 / (in_f as f32).sqrt());
        // f32 weights multiply in full f32; half-precision weights meet f32
        // activations in the GEMV and f16 (or split bf16) activations in cuBLAS.
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-4)] {
            let lw = dense(out_f, in_f, dtype, &w);
            matmul_case(&format!("{dtype:?} {out_f}x{in_f}"), &lw, 1e-5, tol, 7);
        }
    }
}

fn bnb4(w: &[f32], out_f: usize, in_f: usize, t: Bnb4Type, dq: bool, cd: DType) -> LinearWeight {
    bnb4_stored(w, (out_f, in_f), t, dq, cd, DType::BF16)
}

/// A 4-bit weight whose dequantized values are stored as `wdt`.
fn bnb4_stored(
    w: &[f32],
    (out_f, in_f): (usize, usize),
    t: Bnb4Type,
    dq: bool,
    cd: DType,
    wdt: DType,
) -> LinearWeight {
    let opts = Bnb4Options {
        quant_type: t,
        blocksize: 64,
        double_quant: dq,
        compute_dtype: cd,
    };
    let m = Bnb4Matrix::quantize(w, out_f, in_f, wdt, opts).unwrap();
    LinearWeight::Quantized(Arc::new(m))
}

/// Bound of the 4-bit GEMV (rows a multiple of 32) against the CPU for
/// bf16-stored weights: it multiplies code x absmax in f32 instead of
/// rounding each weight to bf16 first, so results differ within the bf16
/// rounding of the weights (2^-9 relative each).
const Q4_BF16_WEIGHT_BOUND: f64 = 3e-3;

#[test]
fn bnb4_matmul_matches_nf4_fp4_with_and_without_double_quant() {
    let mut rng = StdRng::seed_from_u64(8);
    for (out_f, in_f) in [(512, 2048), (96, 200)] {
        let mut w = randn(&mut rng, out_f * in_f, 0.02);
        w.iter_mut().for_each(|v| *v = DType::BF16.round(*v));
        for t in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            for dq in [false, true] {
                // Products are rounded to the compute dtype like the CPU's.
                for (cd, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 2e-3)] {
                    let lw = bnb4(&w, out_f, in_f, t, dq, cd);
                    // The narrow GEMV rounds like the CPU; cuBLAS meets
                    // unrounded (bf16-split) activations.
                    let gemv_tol = if in_f % 32 == 0 {
                        Q4_BF16_WEIGHT_BOUND.max(tol / 2.0)
                    } else if cd == DType::F32 {
                        1e-5
                    } else {
                        tol / 4.0
                    };
                    matmul_case(&lw.format_name(), &lw, gemv_tol, tol, 9);
                }
            }
        }
        // Weights stored in f32 need no rounding: every GEMV is exact in f32.
        for (t, dq) in [(Bnb4Type::Nf4, true), (Bnb4Type::Fp4, false)] {
            let lw = bnb4_stored(&w, (out_f, in_f), t, dq, DType::F32, DType::F32);
            let what = format!("{} f32-stored", lw.format_name());
            matmul_case(&what, &lw, 1e-5, 1e-5, 9);
        }
    }
}

/// The fused gate/up/SiLU GEMV against the CPU's two products and activation.
fn gate_up_case(what: &str, gate: &LinearWeight, up: &LinearWeight, tol: f64, seed: u64) {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(seed);
    let (_, in_f) = gate.shape();
    let (cg, cu) = (c.upload_weight(gate).unwrap(), c.upload_weight(up).unwrap());
    let (gg, gu) = (g.upload_weight(gate).unwrap(), g.upload_weight(up).unwrap());
    for n in [1, 3, 8, 9] {
        let x = randn(&mut rng, n * in_f, 1.0);
        let (cx, gx) = pair(&g, n, in_f, &x);
        let want = c.gate_up_silu(&cx, &cg, &cu).unwrap();
        let got = g.gate_up_silu(&gx, &gg, &gu).unwrap();
        let tol = if n <= 8 { tol } else { 2e-3 };
        check(&format!("gate_up_silu {what} n={n}"), &g, &got, &want, tol);
    }
}

#[test]
fn fused_gate_up_silu_matches_for_each_format() {
    let mut rng = StdRng::seed_from_u64(21);
    let (out_f, in_f) = (384, 576);
    let wg = randn(&mut rng, out_f * in_f, 1.0 / (in_f as f32).sqrt());
    let wu = randn(&mut rng, out_f * in_f, 1.0 / (in_f as f32).sqrt());
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (a, b) = (
            dense(out_f, in_f, dtype, &wg),
            dense(out_f, in_f, dtype, &wu),
        );
        gate_up_case(&format!("{dtype:?}"), &a, &b, 1e-5, 22);
    }
    for cd in [DType::F32, DType::F16] {
        let a = bnb4(&wg, out_f, in_f, Bnb4Type::Nf4, true, cd);
        let b = bnb4(&wu, out_f, in_f, Bnb4Type::Nf4, true, cd);
        gate_up_case(&format!("nf4-dq {cd:?}"), &a, &b, Q4_BF16_WEIGHT_BOUND, 23);
    }
    for bits in [3, 4] {
        let a = packed(&mut rng, out_f, in_f, bits, 64, false);
        let b = packed(&mut rng, out_f, in_f, bits, 64, false);
        gate_up_case(&format!("packed{bits}"), &a, &b, 1e-5, 24);
    }
}

/// RMS norm folded into the projections that follow it (`norm_matmuls` for
/// Q/K/V-shaped weights, `norm_gate_up_silu`) against the CPU's separate
/// norm and products: single rows take the fused kernels, and so do batches
/// of 4-bit gate/up weights (the `b4` and `b8` instances, or from 4 rows
/// with an f16 or bf16 compute dtype the tensor-core kernels, which also
/// fold the norm into Q/K/V); other batches take the separate path.
fn norm_fused_case(
    what: &str,
    ws: &[LinearWeight],
    gate_up: (&LinearWeight, &LinearWeight),
    tol: f64,
) {
    let (c, g) = (CpuBackend::new(), gpu());
    let mut rng = StdRng::seed_from_u64(31);
    let in_f = ws[0].shape().1;
    let cws: Vec<_> = ws.iter().map(|w| c.upload_weight(w).unwrap()).collect();
    let gws: Vec<_> = ws.iter().map(|w| g.upload_weight(w).unwrap()).collect();
    let (cg, cu) = (
        c.upload_weight(gate_up.0).unwrap(),
        c.upload_weight(gate_up.1).unwrap(),
    );
    let (gg, gu) = (
        g.upload_weight(gate_up.0).unwrap(),
        g.upload_weight(gate_up.1).unwrap(),
    );
    let nw: Vec<f32> = (0..in_f).map(|_| rng.random_range(0.5f32..1.5)).collect();
    let (cn, gn) = (c.upload_vector(&nw).unwrap(), g.upload_vector(&nw).unwrap());
    let eps = 1e-5;
    for n in [1, 3, 8] {
        let x = randn(&mut rng, n * in_f, 2.0);
        let (cx, gx) = pair(&g, n, in_f, &x);
        for k in 1..=ws.len() {
            let cr: Vec<_> = cws[..k].iter().collect();
            let gr: Vec<_> = gws[..k].iter().collect();
            let want = c.norm_matmuls(&cx, &cn, eps, &cr).unwrap();
            let got = g.norm_matmuls(&gx, &gn, eps, &gr).unwrap();
            assert_eq!(got.len(), k, "{what}: one output per weight");
            for (i, (gy, cy)) in got.iter().zip(&want).enumerate() {
                check(
                    &format!("norm_matmuls {what} n={n} {i}/{k}"),
                    &g,
                    gy,
                    cy,
                    tol,
                );
            }
        }
        let want = c.norm_gate_up_silu(&cx, &cn, eps, &cg, &cu).unwrap();
        let got = g.norm_gate_up_silu(&gx, &gn, eps, &gg, &gu).unwrap();
        check(
            &format!("norm_gate_up_silu {what} n={n}"),
            &g,
            &got,
            &want,
            tol,
        );
    }
}

#[test]
fn norm_fused_projections_match_for_each_format() {
    let mut rng = StdRng::seed_from_u64(30);
    let in_f = 576;
    let shapes = [256, 64, 96];
    let mut w = |o: usize| randn(&mut rng, o * in_f, 1.0 / (in_f as f32).sqrt());
    let raw: Vec<Vec<f32>> = shapes.iter().map(|&o| w(o)).collect();
    let (wg, wu) = (w(384), w(384));
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let ws: Vec<_> = shapes
            .iter()
            .zip(&raw)
            .map(|(&o, r)| dense(o, in_f, dtype, r))
            .collect();
        let gu = (dense(384, in_f, dtype, &wg), dense(384, in_f, dtype, &wu));
        norm_fused_case(&format!("{dtype:?}"), &ws, (&gu.0, &gu.1), 1e-5);
    }
    for (t, dq, cd) in [
        (Bnb4Type::Nf4, true, DType::F32),
        (Bnb4Type::Nf4, true, DType::F16),
        (Bnb4Type::Fp4, false, DType::BF16),
    ] {
        let ws: Vec<_> = shapes
            .iter()
            .zip(&raw)
            .map(|(&o, r)| bnb4(r, o, in_f, t, dq, cd))
            .collect();
        let gu = (
            bnb4(&wg, 384, in_f, t, dq, cd),
            bnb4(&wu, 384, in_f, t, dq, cd),
        );
        let tol = if cd == DType::BF16 {
            2e-2
        } else {
            Q4_BF16_WEIGHT_BOUND
        };
        norm_fused_case(&ws[0].format_name(), &ws, (&gu.0, &gu.1), tol);
    }
    for (bits, gs) in [(4, 64), (4, 576), (3, 64)] {
        let ws: Vec<_> = shapes
            .iter()
            .map(|&o| packed(&mut rng, o, in_f, bits, gs, false))
            .collect();
        let gu = (
            packed(&mut rng, 384, in_f, bits, gs, false),
            packed(&mut rng, 384, in_f, bits, gs, false),
        );
        norm_fused_case(&format!("packed{bits} g{gs}"), &ws, (&gu.0, &gu.1), 1e-5);
    }
    // Mixed formats take the separate path.
    let ws = vec![
        dense(256, in_f, DType::F16, &raw[0]),
        bnb4(&raw[1], 64, in_f, Bnb4Type::Nf4, true, DType::F32),
    ];
    let gu = (
        dense(384, in_f, DType::F16, &wg),
        dense(384, in_f, DType::F32, &wu),
    );
    norm_fused_case("mixed", &ws, (&gu.0, &gu.1), Q4_BF16_WEIGHT_BOUND);
}

/// The 4-bit GEMVs at Llama sizes: grids larger than one wave of resident
/// blocks, blocks that loop over several row groups of the Q, K and V
/// matrices, and 3584-, 4096- and 8192-wide rows.
#[test]
fn q4_gemv_matches_on_llama_shapes() {
    let mut rng = StdRng::seed_from_u64(40);
    // The last shape, 3584-wide rows (Qwen2.5-7B's hidden size) with an
    // f32 compute dtype: the staged row and code-pair tables (under 48 KiB)
    // and the kernels' static shared memory pass 48 KiB together, so the
    // launch must raise its limit.
    for (in_f, qkv, ff, cd) in [
        (2048, [2048, 512, 512], 8192, DType::F16),
        (4096, [1024, 256, 256], 8192, DType::F16),
        (3584, [3584, 512, 512], 8192, DType::F32),
    ] {
        let mut w = |o: usize| randn(&mut rng, o * in_f, 1.0 / (in_f as f32).sqrt());
        let raw: Vec<Vec<f32>> = qkv.iter().map(|&o| w(o)).collect();
        let (wg, wu) = (w(ff), w(ff));
        let nf4 = |r: &[f32], o: usize| bnb4(r, o, in_f, Bnb4Type::Nf4, true, cd);
        let ws: Vec<_> = qkv.iter().zip(&raw).map(|(&o, r)| nf4(r, o)).collect();
        let gu = (nf4(&wg, ff), nf4(&wu, ff));
        norm_fused_case(
            &format!("nf4 {cd:?} in={in_f}"),
            &ws,
            (&gu.0, &gu.1),
            Q4_BF16_WEIGHT_BOUND,
        );
        let ws: Vec<_> = qkv
            .iter()
            .map(|&o| packed(&mut rng, o, in_f, 4, 128, false))
            .collect();
        let gu = (
            packed(&mut rng, ff, in_f, 4, 128, false),
            packed(&mut rng, ff, in_f, 4, 128, false),
        );
        norm_fused_case(&format!("packed4 in={in_f}"), &ws, (&gu.0, &gu.1), 1e-5);
    }
    let (out_f, in_f) = (8192, 8192);
    let lw = packed(&mut rng, out_f, in_f, 4, 128, false);
    matmul_case("packed4 8192x8192", &lw, 1e-5, 2e-3, 41);
    let raw = randn(&mut rng, out_f * in_f, 0.01);
    let lw = bnb4(&raw, out_f, in_f, Bnb4Type::Fp4, false, DType::BF16);
    matmul_case("fp4 8192x8192", &lw, 2e-2, 2e-2, 42);
}

#[test]
fn int8_matmul_matches_with_outliers() {
    let mut rng = StdRng::seed_from_u64(10);
    for (out_f, in_f, threshold) in [(384, 2048, 6.0), (100, 72, 6.0), (64, 256, 0.0)] {
        let w = randn(&mut rng, out_f * in_f, 0.05);
        let m = Int8Matrix::quantize(&w, out_f, in_f, threshold, DType::F32).unwrap();
        let lw = LinearWeight::Quantized(Arc::new(m));
        let (c, g) = (CpuBackend::new(), gpu());
        let cw = c.upload_weight(&lw).unwrap();
        let gw = g.upload_weight(&lw).unwrap();
        for n in [1, 3, 8, 9, 100] {
            let mut x = randn(&mut rng, n * in_f, 1.0);
            // Outlier columns: a few features far above the threshold.
            for t in 0..n {
                if t % 2 == 0 {
                    x[t * in_f + 3] = 9.0 + t as f32;
                }
                x[t * in_f + in_f - 1] = -7.5;
            }
            let (cx, gx) = pair(&g, n, in_f, &x);
            let want = c.matmul(&cx, &cw).unwrap();
            let got = g.matmul(&gx, &gw).unwrap();
            // Same int8 codes and i32 sums; only the f32 outlier sum order differs.
            check(
                &format!("matmul int8 {out_f}x{in_f} t={threshold} n={n}"),
                &g,
                &got,
                &want,
                1e-5,
            );
        }
    }
}

fn packed(
    rng: &mut StdRng,
    out_f: usize,
    in_f: usize,
    bits: u32,
    gs: usize,
    act: bool,
) -> LinearWeight {
    let maxq = (1u32 << bits) - 1;
    let codes: Vec<u8> = (0..out_f * in_f)
        .map(|_| rng.random_range(0..=maxq) as u8)
        .collect();
    let groups = in_f.div_ceil(gs);
    let scales: Vec<f16> = (0..groups * out_f)
        .map(|_| f16::from_f32(rng.random_range(0.001f32..0.02)))
        .collect();
    let zeros: Vec<u16> = (0..groups * out_f)
        .map(|_| rng.random_range(0..=maxq) as u16)
        .collect();
    let g_idx = act.then(|| {
        (0..in_f)
            .map(|_| rng.random_range(0..groups as u32))
            .collect()
    });
    let m = PackedIntMatrix::from_codes(
        out_f, in_f, bits, gs, &codes, scales, zeros, g_idx, false, "gptq",
    )
    .unwrap();
    LinearWeight::Quantized(Arc::new(m))
}

#[test]
fn packed_int_matmul_matches_every_bit_width_and_act_order() {
    let mut rng = StdRng::seed_from_u64(11);
    for (bits, gs, act) in [
        (4, 128, false),
        (4, 32, true),
        (3, 128, false),
        (2, 64, false),
        (8, 128, false),
        (4, 2048, false),
    ] {
        for (out_f, in_f) in [(512, 2048), (72, 320)] {
            let gs = gs.min(in_f);
            let lw = packed(&mut rng, out_f, in_f, bits, gs, act);
            // Weights are exact in f32 in the GEMV; cuBLAS meets them and the
            // activations in f16.
            matmul_case(
                &format!("{} {out_f}x{in_f}", lw.format_name()),
                &lw,
                1e-5,
                2e-3,
                12,
            );
        }
    }
}

/// `model`'s logits on the GPU against the CPU (bound `tol`): a 150-token
/// sequence, then 30 decode steps of a two-sequence batch (replayed CUDA
/// graphs), then identical greedy generations for fixed prompts.
fn model_logits_and_generations_match(model: &str, tol: f64) {
    let loaded = load_model(model).unwrap();
    let cpu = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let cuda = Model::new(gpu(), &loaded.weights).unwrap();
    let tokens: Vec<u32> = (0..150).map(|i| (i * 37 + 11) % 300).collect();
    let want = cpu.sequence_logits(&tokens).unwrap();
    let got = cuda.sequence_logits(&tokens).unwrap();
    let e = rel_err(&got, &want);
    println!("{model} logits (150 positions): relative error {e:.2e}");
    assert!(e < tol, "{model} logits: relative error {e}");
    // Decode steps (replayed CUDA graphs) against the CPU, step by step.
    let vocab = loaded.weights.config.vocab_size;
    let mut cc = cpu.new_cache(2, 200).unwrap();
    let mut gc = cuda.new_cache(2, 200).unwrap();
    let first = step(&[(0, 0, tokens[..20].to_vec()), (1, 0, tokens[..7].to_vec())]);
    cpu.forward(&first, &mut cc, false).unwrap();
    cuda.forward(&first, &mut gc, false).unwrap();
    let mut worst = 0f64;
    for i in 0..30 {
        let layout = step(&[
            (0, 20 + i, vec![tokens[20 + i]]),
            (1, 7 + i, vec![tokens[7 + i]]),
        ]);
        let w = cpu.forward(&layout, &mut cc, false).unwrap();
        let gt = cuda.forward(&layout, &mut gc, false).unwrap();
        let (_, cols, g) = cuda.backend().to_host(&gt).unwrap();
        assert_eq!(cols, vocab);
        let e = rel_err(&g, &w.data);
        worst = worst.max(e);
        assert!(e < tol, "{model} decode step {i}: relative error {e}");
    }
    println!("{model} 30 decode steps: largest relative error {worst:.2e}");
    let tok = &loaded.tokenizer;
    let prompts: Vec<Vec<u32>> = ["a", "The quick brown fox", "Q: where?\n\nA:"]
        .iter()
        .map(|t| tok.encode(t, true).unwrap())
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 32,
        stop_strings: vec![],
        stop_at_eos: false,
    };
    let a = generate(&cpu, tok, &prompts, &cfg).unwrap();
    let b = generate(&cuda, tok, &prompts, &cfg).unwrap();
    assert_eq!(a, b, "{model}: greedy generations differ");
    assert_eq!(a[1].as_ref().unwrap().tokens.len(), 32);
}

#[test]
fn full_model_logits_and_greedy_generations_match() {
    model_logits_and_generations_match("synth:tiny", 1e-4);
}

/// The real SmolLM2-135M (GGUF Q4_1 dequantized to f32; fetched on first use
/// into the model cache). Its head size 64 takes the tensor-core prefill
/// attention with f16 inputs, hence the looser bound.
#[test]
fn smollm2_logits_and_greedy_generations_match() {
    model_logits_and_generations_match("smollm2-135m", 2e-3);
}

/// `model` quantized by `quant` on the CPU backend and on the GPU.
fn quantized_models(model: &str, quant: &str) -> (Model<CpuBackend>, Model<CudaBackend>) {
    let spec = QuantSpec::parse(quant).unwrap();
    let loaded = quantbench::cli::common::load_quantized(
        model,
        Some(&spec),
        quantbench::backend::Device::Cpu,
    )
    .unwrap();
    let cpu = Model::new(CpuBackend::new(), &loaded.weights).unwrap();
    let cuda = Model::new(gpu(), &loaded.weights).unwrap();
    (cpu, cuda)
}

#[test]
fn quantized_models_match_the_cpu() {
    for (model, quant, tol) in [
        ("synth:tiny", "nf4", 1e-3),
        ("synth:tiny", "rtn,bits=4,group_size=32", 5e-3),
        ("synth:tiny", "int8", 1e-3),
        ("synth:smollm2-135m", "none", 2e-3),
    ] {
        let (cpu, cuda) = quantized_models(model, quant);
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 250).collect();
        let want = cpu.sequence_logits(&tokens).unwrap();
        let got = cuda.sequence_logits(&tokens).unwrap();
        let e = rel_err(&got, &want);
        println!("{model} {quant}: logits relative error {e:.2e}");
        assert!(e < tol, "{model} {quant}: relative error {e}");
    }
}

/// Single-sequence decode steps of 4-bit models (the single-row 4-bit
/// kernels, which batched steps do not take; with a bf16 compute dtype the
/// half-precision ones) against the CPU, step by step.
/// synth:smollm2-135m stores bf16 weights, which the CPU reference rounds
/// each dequantized NF4 weight to while the single-row kernels keep f32
/// products (see gemv_q4.cu), and prefills with f16 tensor-core attention:
/// hence its bound (4.5e-3 measured for NF4, 1.0e-3 for packed g64).
#[test]
fn quantized_single_sequence_decode_matches_the_cpu() {
    for (model, quant, tol) in [
        ("synth:tiny", "nf4", 1e-3),
        ("synth:smollm2-135m", "nf4", 2e-2),
        ("synth:smollm2-135m", "nf4,compute_dtype=bf16", 2e-2),
        ("synth:smollm2-135m", "rtn,bits=4,group_size=64", 2e-2),
    ] {
        let (cpu, cuda) = quantized_models(model, quant);
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 250).collect();
        let mut cc = cpu.new_cache(1, 64).unwrap();
        let mut gc = cuda.new_cache(1, 64).unwrap();
        let first = step(&[(0, 0, tokens[..20].to_vec())]);
        cpu.forward(&first, &mut cc, false).unwrap();
        cuda.forward(&first, &mut gc, false).unwrap();
        let mut worst = 0f64;
        for i in 0..12 {
            let layout = step(&[(0, 20 + i, vec![tokens[20 + i]])]);
            let w = cpu.forward(&layout, &mut cc, false).unwrap();
            let gt = cuda.forward(&layout, &mut gc, false).unwrap();
            let (_, _, g) = cuda.backend().to_host(&gt).unwrap();
            let e = rel_err(&g, &w.data);
            worst = worst.max(e);
            assert!(
                e < tol,
                "{model} {quant} decode step {i}: relative error {e}"
            );
        }
        println!(
            "{model} {quant}: 12 single-sequence decode steps, largest relative error {worst:.2e}"
        );
    }
}

#[test]
fn out_of_memory_names_bytes_requested_and_free() {
    let g = gpu();
    let err = g
        .new_cache(CacheShape {
            layers: 16,
            slots: 100_000,
            max_len: 4096,
            kv_heads: 8,
            head_dim: 64,
        })
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("out of memory") && msg.contains("free"),
        "{msg}"
    );
    assert!(
        msg.contains(&(16u64 * 2 * 100_000 * 4096 * 8 * 64 * 4).to_string()),
        "{msg}"
    );
    // The backend keeps working after the failure.
    let x = g.tensor_from_host(1, 3, &[1.0, 5.0, 2.0]).unwrap();
    assert_eq!(g.argmax_rows(&x).unwrap(), vec![1]);
}

#[test]
fn tensor_core_prefill_attention_matches_on_long_ragged_batches() {
    // Sequences of 1, 17, 130 and 512 tokens in one step (tiles of every
    // fill, keys over many key tiles), a chunk continuing two of them from
    // positions inside a key tile, then a decode step over what they wrote.
    // Grouped-query heads with even and odd groups, and plain multi-head.
    let steps = [
        step(&[
            (0, 0, vec![1; 1]),
            (1, 0, vec![1; 17]),
            (2, 0, vec![1; 130]),
            (3, 0, vec![1; 512]),
        ]),
        step(&[(1, 17, vec![1; 45]), (3, 512, vec![1; 33])]),
        step(&[
            (0, 1, vec![1]),
            (1, 62, vec![1]),
            (2, 130, vec![1]),
            (3, 545, vec![1]),
        ]),
    ];
    for (q_heads, kv_heads, head_dim) in [(32, 8, 64), (9, 3, 64), (8, 2, 128), (4, 4, 128)] {
        let heads = HeadShape {
            q_heads,
            kv_heads,
            head_dim,
        };
        compare_attention(heads, 600, &steps, 31 + head_dim as u64, false);
    }
}

#[test]
fn int8_gemm_path_matches_the_cpu_exactly() {
    let mut rng = StdRng::seed_from_u64(41);
    for (out_f, in_f, threshold, cd) in [
        (512, 2048, 6.0, DType::F32),
        (2048, 512, 6.0, DType::F16),
        (100, 72, 6.0, DType::BF16),
        (64, 256, 0.0, DType::F32),
        // Output rows not a multiple of 4: the GEMV kernel, 8 rows at a time.
        (70, 96, 6.0, DType::F32),
    ] {
        let w = randn(&mut rng, out_f * in_f, 0.05);
        let m = Int8Matrix::quantize(&w, out_f, in_f, threshold, cd).unwrap();
        let lw = LinearWeight::Quantized(Arc::new(m));
        let (c, g) = (CpuBackend::new(), gpu());
        let cw = c.upload_weight(&lw).unwrap();
        let gw = g.upload_weight(&lw).unwrap();
        for n in [9, 64, 512] {
            let mut x = randn(&mut rng, n * in_f, 1.0);
            // Outlier columns: one in every third token, one reached exactly
            // at the threshold, 40 in the last token (two chunks of the
            // dequantize kernel's outlier loop); -5.999 stays below.
            for t in (0..n).step_by(3) {
                x[t * in_f + 3] = 6.5 + (t % 7) as f32;
            }
            x[in_f + 11] = 6.0;
            x[2 * in_f + 13] = -5.999;
            for i in 0..40 {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                x[(n - 1) * in_f + (7 * i + 5) % in_f] = sign * (8.0 + i as f32);
            }
            let (cx, gx) = pair(&g, n, in_f, &x);
            let want = c.matmul(&cx, &cw).unwrap();
            let got = g.matmul(&gx, &gw).unwrap();
            // The cuBLAS path does the CPU's arithmetic step for step (same
            // codes, exact i32 sums, the same f32 operations in the same
            // order, outlier products summed in column order): identical
            // outputs. The GEMV kernel sums outlier products in another order.
            let tol = if out_f.is_multiple_of(4) { 0.0 } else { 1e-5 };
            check(
                &format!("matmul int8 {out_f}x{in_f} t={threshold} {cd:?} n={n}"),
                &g,
                &got,
                &want,
                tol,
            );
        }
    }
}
