//! `cargo bench --bench cpu_kernels`: throughput of the CPU's batch-invariant
//! dense product at SmolLM2-135M and Llama-3.2-1B layer shapes, next to the
//! `gemm` crate on the same inputs and the fused NF4 (double quant, block 64)
//! dequantize-matmul.

use std::time::Instant;

use quantbench::backend::cpu::matmul::dense_matmul;
use quantbench::quant::QuantizedMatrix;
use quantbench::quant::bnb4::{Bnb4Matrix, Bnb4Options, Bnb4Type};
use quantbench::tensor::DType;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn main() {
    println!(
        "{:<28} {:>6} {:>12} {:>10}",
        "shape (out x in)", "rows", "ms/call", "GFLOP/s"
    );
    for (out_f, in_f) in [(1536, 576), (576, 1536), (8192, 2048)] {
        let w = random(out_f * in_f, 1);
        let opts = Bnb4Options {
            quant_type: Bnb4Type::Nf4,
            blocksize: 64,
            double_quant: true,
            compute_dtype: DType::F32,
        };
        let nf4 = Bnb4Matrix::quantize(&w, out_f, in_f, DType::F32, opts).expect("quantizes");
        for n in [1, 4, 64, 256] {
            let x = random(n * in_f, 2);
            let mut y = vec![0.0; n * out_f];
            dense_matmul(&x, n, &w, out_f, in_f, &mut y);
            let reps = (2e9 / (2.0 * (n * out_f * in_f) as f64)).clamp(3.0, 200.0) as usize;
            let start = Instant::now();
            for _ in 0..reps {
                dense_matmul(&x, n, &w, out_f, in_f, &mut y);
            }
            let s = start.elapsed().as_secs_f64() / reps as f64;
            let flops = 2.0 * (n * out_f * in_f) as f64 / s / 1e9;
            println!(
                "{:<28} {:>6} {:>12.3} {:>10.1}",
                format!("{out_f} x {in_f}"),
                n,
                s * 1e3,
                flops
            );
            let start = Instant::now();
            for _ in 0..reps {
                // SAFETY: x is [n, in_f], w is [out_f, in_f] read transposed
                // through its strides, y is [n, out_f]; all row-major.
                unsafe {
                    gemm::gemm(
                        n,
                        out_f,
                        in_f,
                        y.as_mut_ptr(),
                        1,
                        out_f as isize,
                        false,
                        x.as_ptr(),
                        1,
                        in_f as isize,
                        w.as_ptr(),
                        in_f as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    )
                };
            }
            let s = start.elapsed().as_secs_f64() / reps as f64;
            println!(
                "  gemm {:>12.3} {:>10.1}",
                s * 1e3,
                2.0 * (n * out_f * in_f) as f64 / s / 1e9
            );
            let start = Instant::now();
            for _ in 0..reps {
                nf4.matmul_cpu(&x, n, &mut y);
            }
            let s = start.elapsed().as_secs_f64() / reps as f64;
            println!(
                "  nf4  {:>12.3} {:>10.1}",
                s * 1e3,
                2.0 * (n * out_f * in_f) as f64 / s / 1e9
            );
        }
    }
}
