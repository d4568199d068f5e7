//! What the accuracy-vs-storage plot puts on its axes: which accuracy metric
//! (CoQA F1 when the results have it), and which bits per parameter.

use crate::runner::result::{AccuracyMetrics, StorageMetrics};

/// An accuracy metric the y axis can show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccuracyMetric {
    CoqaF1,
    Top1Agreement,
    KlDivergence,
    Perplexity,
}

impl AccuracyMetric {
    /// Preference order when several metrics are available.
    pub const PREFERENCE: [AccuracyMetric; 4] = [
        AccuracyMetric::CoqaF1,
        AccuracyMetric::Top1Agreement,
        AccuracyMetric::KlDivergence,
        AccuracyMetric::Perplexity,
    ];

    /// The metric's value in `m`, if measured and finite.
    pub fn value(self, m: &AccuracyMetrics) -> Option<f64> {
        let v = match self {
            AccuracyMetric::CoqaF1 => m.coqa_f1,
            AccuracyMetric::Top1Agreement => m.top1_agreement,
            AccuracyMetric::KlDivergence => m.kl_divergence,
            AccuracyMetric::Perplexity => m.perplexity,
        };
        v.filter(|v| v.is_finite())
    }

    /// Whether larger values are better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, AccuracyMetric::CoqaF1 | AccuracyMetric::Top1Agreement)
    }

    /// The value as a score where higher is better (negated when lower is
    /// better); the frontier and the plot's y coordinate use scores.
    pub fn score(self, value: f64) -> f64 {
        if self.higher_is_better() {
            value
        } else {
            -value
        }
    }

    /// The value back from a score.
    pub fn value_of_score(self, score: f64) -> f64 {
        self.score(score)
    }

    /// Short name for tables and notes.
    pub fn name(self) -> &'static str {
        match self {
            AccuracyMetric::CoqaF1 => "CoQA F1",
            AccuracyMetric::Top1Agreement => "top-1 agreement",
            AccuracyMetric::KlDivergence => "KL divergence",
            AccuracyMetric::Perplexity => "perplexity",
        }
    }

    /// Axis caption, saying which direction is better. Lower-is-better metrics
    /// are drawn on an inverted axis so that better is always up.
    pub fn axis_label(self) -> &'static str {
        match self {
            AccuracyMetric::CoqaF1 => "CoQA F1 (higher is better)",
            AccuracyMetric::Top1Agreement => "top-1 agreement with base model (higher is better)",
            AccuracyMetric::KlDivergence => {
                "KL(base ‖ quantized) per token (lower is better, axis inverted)"
            }
            AccuracyMetric::Perplexity => "perplexity (lower is better, axis inverted)",
        }
    }
}

/// Chooses the y metric: the one measured by the most results, ties broken
/// by [`AccuracyMetric::PREFERENCE`] (so CoQA F1 whenever every result has
/// it). `None` when no result has any.
pub fn choose_metric<'a>(
    results: impl IntoIterator<Item = &'a AccuracyMetrics> + Clone,
) -> Option<AccuracyMetric> {
    let mut best: Option<(AccuracyMetric, usize)> = None;
    for metric in AccuracyMetric::PREFERENCE {
        let n = results
            .clone()
            .into_iter()
            .filter(|m| metric.value(m).is_some())
            .count();
        if n > 0 && best.is_none_or(|(_, b)| n > b) {
            best = Some((metric, n));
        }
    }
    best.map(|(m, _)| m)
}

/// Which bits per parameter the x axis shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitsAxis {
    /// Whole model: every weight, embeddings and norms included.
    WholeModel,
    /// Quantized linear layers only.
    QuantizedLayers,
}

impl BitsAxis {
    /// Bits per parameter of `s` on this axis; `None` for
    /// [`BitsAxis::QuantizedLayers`] when nothing is quantized.
    pub fn value(self, s: &StorageMetrics) -> Option<f64> {
        let v = match self {
            BitsAxis::WholeModel => Some(s.bits_per_parameter),
            BitsAxis::QuantizedLayers => s.quantized_bits_per_parameter,
        };
        v.filter(|v| v.is_finite())
    }

    /// Axis caption.
    pub fn axis_label(self) -> &'static str {
        match self {
            BitsAxis::WholeModel => "bits per parameter (whole model, exact storage)",
            BitsAxis::QuantizedLayers => "bits per parameter (quantized linear layers only)",
        }
    }

    /// File name stem of the plot.
    pub fn file_stem(self) -> &'static str {
        match self {
            BitsAxis::WholeModel => "accuracy_vs_bits",
            BitsAxis::QuantizedLayers => "accuracy_vs_quantized_bits",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(f1: Option<f64>, top1: Option<f64>, kl: Option<f64>) -> AccuracyMetrics {
        AccuracyMetrics {
            coqa_f1: f1,
            top1_agreement: top1,
            kl_divergence: kl,
            ..Default::default()
        }
    }

    #[test]
    fn prefers_f1_when_everyone_has_it() {
        let r = [
            acc(Some(0.6), Some(0.9), Some(0.1)),
            acc(Some(0.5), Some(0.8), None),
        ];
        assert_eq!(choose_metric(&r), Some(AccuracyMetric::CoqaF1));
    }

    #[test]
    fn falls_back_to_the_best_covered_metric() {
        let r = [
            acc(None, Some(0.9), Some(0.1)),
            acc(Some(0.5), Some(0.8), Some(0.2)),
        ];
        assert_eq!(choose_metric(&r), Some(AccuracyMetric::Top1Agreement));
        let r = [acc(None, None, Some(0.1)), acc(None, None, Some(0.2))];
        assert_eq!(choose_metric(&r), Some(AccuracyMetric::KlDivergence));
        let r = [acc(Some(f64::NAN), None, None)];
        assert_eq!(choose_metric(&r), None);
        assert_eq!(choose_metric(&[] as &[AccuracyMetrics]), None);
    }

    #[test]
    fn lower_is_better_metrics_are_negated_for_scores() {
        let kl = AccuracyMetric::KlDivergence;
        assert_eq!(kl.score(0.25), -0.25);
        assert_eq!(kl.value_of_score(-0.25), 0.25);
        assert_eq!(AccuracyMetric::CoqaF1.score(0.6), 0.6);
    }
}
