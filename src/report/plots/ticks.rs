//! A linear f64 axis whose tick marks sit exactly at given values (the
//! bands of a bar chart, the measured batch sizes), without light grid lines.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};

/// Linear axis over `range` with ticks at `ticks`.
#[derive(Clone, Debug, PartialEq)]
pub struct FixedTicks {
    pub range: Range<f64>,
    pub ticks: Vec<f64>,
}

impl FixedTicks {
    /// The axis over `lo..hi` with ticks at `ticks`.
    pub fn new(lo: f64, hi: f64, ticks: Vec<f64>) -> FixedTicks {
        FixedTicks {
            range: lo..hi,
            ticks,
        }
    }
}

impl Ranged for FixedTicks {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = self.range.end - self.range.start;
        if span == 0.0 {
            return limit.0;
        }
        let frac = (value - self.range.start) / span;
        limit.0 + (frac * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            vec![]
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_linearly() {
        let a = FixedTicks::new(0.0, 4.0, vec![0.5, 1.5]);
        assert_eq!(a.map(&0.0, (100, 500)), 100);
        assert_eq!(a.map(&1.0, (100, 500)), 200);
        assert_eq!(a.map(&4.0, (100, 500)), 500);
        // Pixel y grows downwards: the limit may run backwards.
        assert_eq!(a.map(&1.0, (500, 100)), 400);
    }
}
