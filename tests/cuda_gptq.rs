//! GPTQ on the GPU against the CPU reference: Hessian accumulation, the
//! Cholesky factor of the inverse Hessian, the quantization of one layer
//! (codes, grids, output error) for every variant, and a whole model.
//! Needs a CUDA GPU (`cargo test --release --features cuda --test cuda_gptq`).
#![cfg(feature = "cuda")]

#[path = "common/model_kl.rs"]
mod model_kl;

use std::sync::Arc;

use model_kl::assert_gpu_quantization_agrees;
use quantbench::backend::Device;
use quantbench::backend::cuda::CudaBackend;
use quantbench::backend::cuda::gptq::CudaGptq;
use quantbench::io::synth_tokenizer;
use quantbench::model::synth::{synth_config, synth_weights};
use quantbench::quant::gptq::{
    GptqDevice, GptqParams, Hessian, gptq_quantize, inverse_cholesky_upper,
};
use quantbench::quant::packed::PackedIntMatrix;
use quantbench::quant::{
    LinearWeight, QuantContext, QuantSpec, QuantizedMatrix, quantize_model_on,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("cuda:0")
}

/// `rows` inputs of `dim` features, channel `c` scaled by `1 + (c % 7)` so
/// that the Hessian diagonal is uneven (act-order then reorders columns).
fn inputs(rng: &mut StdRng, rows: usize, dim: usize) -> Vec<f32> {
    let d = Normal::new(0f32, 1.0).unwrap();
    (0..rows * dim)
        .map(|i| d.sample(rng) * (1.0 + (i % dim % 7) as f32))
        .collect()
}

fn cpu_hessian(x: &[f32], rows: usize, dim: usize) -> Vec<f64> {
    let mut h = Hessian::new(dim);
    h.add_batch(x, rows).unwrap();
    h.matrix().unwrap()
}

/// Largest absolute difference relative to the largest reference magnitude.
fn rel_err<T: Copy + Into<f64>>(got: &[T], want: &[T]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want
        .iter()
        .fold(0f64, |m, &v| m.max(v.into().abs()))
        .max(1e-300);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a.into() - b.into()).abs()))
        / scale
}

#[test]
fn hessians_match_the_cpu() {
    let g = gpu();
    let dev = CudaGptq::new(&g).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    for (dim, batches) in [(96usize, vec![7usize]), (320, vec![1000, 2000, 33])] {
        let rows: usize = batches.iter().sum();
        let x = inputs(&mut rng, rows, dim);
        let want = cpu_hessian(&x, rows, dim);
        let mut acc = dev.accumulator(dim).unwrap();
        let mut start = 0;
        for b in batches {
            let t = g
                .tensor_from_host(b, dim, &x[start * dim..(start + b) * dim])
                .unwrap();
            dev.add_batch(&mut acc, &t).unwrap();
            start += b;
        }
        let h = dev.hessian(acc).unwrap();
        let got = dev.download_hessian(&h).unwrap();
        for i in 0..dim {
            for j in 0..i {
                assert_eq!(got[i * dim + j], got[j * dim + i], "symmetric");
            }
        }
        let e = rel_err(&got, &want);
        println!("Hessian {dim} features, {rows} rows: relative error {e:.2e}");
        assert!(e < 1e-5, "Hessian relative error {e:e}");
    }
    assert!(dev.hessian(dev.accumulator(8).unwrap()).is_err());
}

#[test]
fn inverse_cholesky_matches_the_cpu() {
    let g = gpu();
    let dev = CudaGptq::new(&g).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    for (n, rows, damp) in [
        (64usize, 512usize, 0.01),
        (512, 4096, 0.01),
        (300, 200, 0.1),
    ] {
        let x = inputs(&mut rng, rows, n);
        let h = cpu_hessian(&x, rows, n);
        let want = inverse_cholesky_upper(&h, n, damp).unwrap();
        let got = dev
            .inverse_cholesky_upper(&dev.upload_hessian(&h, n).unwrap(), damp)
            .unwrap();
        for i in 0..n {
            for j in 0..i {
                assert_eq!(got[i * n + j], 0.0, "upper triangular");
            }
        }
        let e = rel_err(&got, &want);
        println!("inverse Cholesky {n}x{n} ({rows} rows, damp {damp}): relative error {e:.2e}");
        assert!(e < 1e-5, "relative error {e:e}");
    }
}

/// Expected squared output error `Σ_r Δw_r H Δw_rᵀ` of a quantization.
fn output_error(h: &[f64], w: &[f32], q: &PackedIntMatrix) -> f64 {
    let (o, n) = (q.out_features, q.in_features);
    let wq = LinearWeight::Quantized(Arc::new(q.clone())).dequantize();
    let mut total = 0f64;
    for r in 0..o {
        let d: Vec<f64> = (0..n)
            .map(|c| (w[r * n + c] - wq[r * n + c]) as f64)
            .collect();
        for a in 0..n {
            let row: f64 = (0..n).map(|b| h[a * n + b] * d[b]).sum();
            total += d[a] * row;
        }
    }
    total
}

#[test]
fn layer_quantization_matches_the_cpu() {
    let g = gpu();
    let dev = CudaGptq::new(&g).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    // 600 inputs: a last lazy-update block of 88 columns and a short last group.
    let (o, n, rows) = (192usize, 600usize, 4096usize);
    let mut x = inputs(&mut rng, rows, n);
    // Input 5 is dead: its weights must come out zero on both devices.
    for r in 0..rows {
        x[r * n + 5] = 0.0;
    }
    let h = cpu_hessian(&x, rows, n);
    let normal = Normal::new(0f32, 0.05).unwrap();
    let w: Vec<f32> = (0..o * n).map(|_| normal.sample(&mut rng)).collect();
    let hd = dev.upload_hessian(&h, n).unwrap();
    let base = GptqParams::default();
    let cases = [
        ("4-bit g128 asym", base.clone()),
        (
            "4-bit g128 sym",
            GptqParams {
                sym: true,
                ..base.clone()
            },
        ),
        (
            "4-bit g128 act-order",
            GptqParams {
                desc_act: true,
                ..base.clone()
            },
        ),
        (
            "4-bit g128 act-order sym",
            GptqParams {
                desc_act: true,
                sym: true,
                ..base.clone()
            },
        ),
        (
            "4-bit g128 act-order static groups",
            GptqParams {
                desc_act: true,
                static_groups: true,
                ..base.clone()
            },
        ),
        (
            "3-bit g64 block 96",
            GptqParams {
                bits: 3,
                group_size: 64,
                block_size: 96,
                ..base.clone()
            },
        ),
        (
            "2-bit g32 act-order",
            GptqParams {
                bits: 2,
                group_size: 32,
                desc_act: true,
                ..base.clone()
            },
        ),
        (
            "8-bit per-channel",
            GptqParams {
                bits: 8,
                group_size: -1,
                ..base.clone()
            },
        ),
        (
            "4-bit g256 block 64 (groups span blocks)",
            GptqParams {
                group_size: 256,
                block_size: 64,
                ..base.clone()
            },
        ),
    ];
    for (name, p) in cases {
        let want = gptq_quantize(&w, o, n, &h, &p).unwrap();
        let got = dev.quantize(&w, o, n, &hd, &p).unwrap();
        assert_eq!(
            (got.bits, got.group_size, got.sym, &got.g_idx),
            (want.bits, want.group_size, want.sym, &want.g_idx),
            "{name}: format"
        );
        let (gc, wc) = (got.codes(), want.codes());
        let differ = gc.iter().zip(&wc).filter(|(a, b)| a != b).count();
        let far = gc
            .iter()
            .zip(&wc)
            .filter(|&(&a, &b)| (a as i32 - b as i32).abs() > 1)
            .count();
        let scales_differ = got
            .scales
            .iter()
            .zip(&want.scales)
            .filter(|(a, b)| a != b)
            .count();
        let (eg, ew) = (output_error(&h, &w, &got), output_error(&h, &w, &want));
        println!(
            "{name}: {differ} of {} codes differ ({far} by more than 1), {scales_differ} of {} scales; output error {eg:.6e} vs CPU {ew:.6e}",
            gc.len(),
            want.scales.len()
        );
        // A code that rounds the other way (f32 summation order) changes
        // the errors spread over its row's later columns, so a difference
        // comes with a few more in the same row.
        assert!(differ * 200 <= gc.len(), "{name}: {differ} codes differ");
        assert!(
            far * 2000 <= gc.len(),
            "{name}: {far} codes differ by more than 1"
        );
        assert!(
            scales_differ * 100 <= want.scales.len(),
            "{name}: {scales_differ} scales differ"
        );
        assert!(
            (eg - ew).abs() <= 0.01 * ew,
            "{name}: output error {eg} vs {ew}"
        );
        let mut row = vec![0f32; n];
        for r in 0..o {
            got.dequantize_row(r, &mut row);
            assert_eq!(row[5], 0.0, "{name}: dead input of row {r}");
        }
    }
    let p = GptqParams {
        block_size: 2048,
        ..base
    };
    let e = format!("{:#}", dev.quantize(&w, o, n, &hd, &p).unwrap_err());
    assert!(e.contains("block_size up to"), "{e}");
}

/// GPTQ of a whole synthetic model on the GPU (through the same entry point
/// as `--device cuda`) against the CPU: the first block's q/k/v (whose
/// inputs differ only by the rounding of the embedding and norm) get nearly
/// the same codes; later layers calibrate on activations that the GPU
/// computed at half precision, so the models are compared by what they
/// predict: KL(base‖GPU) within 10% of KL(base‖CPU), and the two quantized
/// models closer to each other than either is to the base.
#[test]
fn whole_model_matches_the_cpu() {
    let (cfg, dtype) = synth_config("tiny").unwrap();
    let base = synth_weights(&cfg, dtype, 5).unwrap();
    let tokenizer = synth_tokenizer(&cfg).unwrap();
    let ctx = QuantContext {
        tokenizer: &tokenizer,
    };
    for quant in [
        "gptq,bits=4,group_size=32,calib_samples=8,calib_seq_len=256",
        "gptq,bits=4,group_size=32,desc_act=true,sym=true,calib_samples=8,calib_seq_len=256",
    ] {
        let spec = QuantSpec::parse(quant).unwrap();
        let mut on_cpu = base.clone();
        quantize_model_on(&mut on_cpu, &spec, &ctx, Device::Cpu).unwrap();
        let mut on_gpu = base.clone();
        quantize_model_on(&mut on_gpu, &spec, &ctx, Device::Cuda(0)).unwrap();
        for (name, w) in on_gpu.layers[0].linears().into_iter().take(3) {
            let want = on_cpu.layers[0].linears()[..3]
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
                .dequantize();
            let got = w.dequantize();
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!(
                "{quant}: layer 0 {name}: {differ} of {} weights differ",
                got.len()
            );
            assert!(differ * 50 <= got.len(), "{name}: {differ} weights differ");
        }
        // Layer 0 sees identical inputs and matches; later blocks see the
        // GPU forward's activations (half-precision GEMM inputs, tensor-core
        // attention), which differ within rounding, and GPTQ's discrete
        // choices (act-order ties, rounding) amplify that. Measured on an H100:
        // KL(base||cpu) 0.00984, KL(base||gpu) 0.01337, KL(cpu||gpu) 0.00335
        // with act-order.
        assert_gpu_quantization_agrees(quant, &base, &on_cpu, &on_gpu);
    }
}
