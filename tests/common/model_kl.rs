//! Comparing a model quantized on the GPU with the same quantization on the
//! CPU by what they compute: the KL divergence of their next-token
//! distributions from the unquantized model's.

use quantbench::backend::cpu::CpuBackend;
use quantbench::eval::divergence::compare_logits;
use quantbench::model::{LlamaWeights, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Runs the three models on the CPU over 200 seeded random tokens and checks
/// that KL(base‖gpu) is within 50% of KL(base‖cpu) and that the two
/// quantized models are closer to each other than half their distance to
/// the base. Prints the three KLs, labelled `quant`.
pub fn assert_gpu_quantization_agrees(
    quant: &str,
    base: &LlamaWeights,
    on_cpu: &LlamaWeights,
    on_gpu: &LlamaWeights,
) {
    let mut rng = StdRng::seed_from_u64(9);
    let tokens: Vec<u32> = (0..200).map(|_| rng.random_range(0..256)).collect();
    let logits = |w: &LlamaWeights| {
        Model::new(CpuBackend::new(), w)
            .unwrap()
            .sequence_logits(&tokens)
            .unwrap()
    };
    let (lb, lc, lg) = (logits(base), logits(on_cpu), logits(on_gpu));
    let v = base.config.vocab_size;
    let mean_kl = |p: &[f32], q: &[f32]| compare_logits(p, q, v).unwrap().mean_kl();
    let (kc, kg, kcg) = (mean_kl(&lb, &lc), mean_kl(&lb, &lg), mean_kl(&lc, &lg));
    println!("{quant}: KL(base||cpu) {kc:.5}, KL(base||gpu) {kg:.5}, KL(cpu||gpu) {kcg:.5}");
    assert!((kg - kc).abs() <= 0.5 * kc, "KL {kg} vs {kc}");
    assert!(kcg <= 0.5 * kc, "KL(cpu||gpu) {kcg} vs KL(base||cpu) {kc}");
}
