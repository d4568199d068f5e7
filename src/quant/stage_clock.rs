//! Wall time of a calibrated quantization, stage by stage: per block and in
//! total. The caller waits for its device before each lap, so that a lap
//! holds the work of its stage and not work queued earlier.

use std::fmt;
use std::time::Instant;

/// Seconds booked to named stages since the start and since the last block.
#[derive(Clone, Debug)]
pub struct StageClock {
    names: &'static [&'static str],
    total: Vec<f64>,
    block: Vec<f64>,
    last: Instant,
}

/// Seconds per stage, printed as `name 1.23 s, …, total 4.56 s`.
#[derive(Clone, Debug, PartialEq)]
pub struct StageTimes {
    names: &'static [&'static str],
    secs: Vec<f64>,
}

impl StageTimes {
    /// Seconds of stage `i`.
    pub fn secs(&self, i: usize) -> f64 {
        self.secs[i]
    }

    /// Seconds of all stages together.
    pub fn total(&self) -> f64 {
        self.secs.iter().sum()
    }
}

impl fmt::Display for StageTimes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, s) in self.names.iter().zip(&self.secs) {
            write!(f, "{name} {s:.2} s, ")?;
        }
        write!(f, "total {:.2} s", self.total())
    }
}

impl StageClock {
    /// A clock for the stages `names`, starting now.
    pub fn new(names: &'static [&'static str]) -> Self {
        StageClock {
            names,
            total: vec![0.0; names.len()],
            block: vec![0.0; names.len()],
            last: Instant::now(),
        }
    }

    /// Books the time since the last lap to stage `stage` (an index into the names).
    pub fn lap(&mut self, stage: usize) {
        let now = Instant::now();
        let s = (now - self.last).as_secs_f64();
        self.total[stage] += s;
        self.block[stage] += s;
        self.last = now;
    }

    /// The times since the last call (or the start), and starts the next block.
    pub fn end_block(&mut self) -> StageTimes {
        let secs = std::mem::replace(&mut self.block, vec![0.0; self.names.len()]);
        StageTimes {
            names: self.names,
            secs,
        }
    }

    /// The times since the start.
    pub fn totals(&self) -> StageTimes {
        StageTimes {
            names: self.names,
            secs: self.total.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_add_up_per_block_and_in_total() {
        const NAMES: &[&str] = &["a", "b"];
        let mut c = StageClock::new(NAMES);
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.lap(1);
        c.lap(0);
        let first = c.end_block();
        assert!(first.secs(1) >= 0.02 && first.secs(0) < first.secs(1));
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.lap(0);
        let second = c.end_block();
        assert_eq!(second.secs(1), 0.0);
        let all = c.totals();
        assert!((all.total() - first.total() - second.total()).abs() < 1e-12);
        let text = all.to_string();
        assert!(text.starts_with("a ") && text.contains(", b ") && text.contains("total "));
    }
}
