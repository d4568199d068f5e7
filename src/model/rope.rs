//! RoPE inverse frequencies, with llama3 frequency scaling.

use super::config::{Llama3RopeScaling, LlamaConfig};

/// `inv_freq[i] = theta^(-2i/d)` for `i < d/2`, adjusted by llama3 scaling
/// when configured (see [`llama3_scaled`]).
pub fn inv_freq(config: &LlamaConfig) -> Vec<f32> {
    let d = config.head_dim;
    (0..d / 2)
        .map(|i| {
            let f = 1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64);
            match &config.rope_scaling {
                Some(s) => llama3_scaled(f, s) as f32,
                None => f as f32,
            }
        })
        .collect()
}

/// The inverse frequency `f` under llama3 scaling: long wavelengths are
/// divided by `factor`, short ones kept, and the band between is
/// interpolated smoothly.
pub fn llama3_scaled(f: f64, s: &Llama3RopeScaling) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / f;
    if wavelen < high_wavelen {
        f
    } else if wavelen > low_wavelen {
        f / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * f / s.factor + smooth * f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::synth_config;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let (cfg, _) = synth_config("llama-3.2-1b").unwrap();
        let f = inv_freq(&cfg);
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        // Lowest frequency: wavelength far above 8192 → divided by 32.
        let raw = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!(((f[31] as f64) - raw / 32.0).abs() < 1e-12);
        let plain = inv_freq(&crate::model::LlamaConfig {
            rope_scaling: None,
            ..cfg
        });
        assert!((plain[31] as f64 - raw).abs() < 1e-12);
    }
}
