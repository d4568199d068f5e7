//! Per-block timelines of GPU steps. With `QUANTBENCH_CUDA_TRACE=FILE` the
//! CUDA backend compiles its kernels with recording on: thread 0 of every
//! block writes a timestamped event into a ring in device memory when it
//! enters a GEMV, when its programmatic-launch wait returns, and when it is
//! done; the ring is written to FILE when the device is closed. This module
//! reads such a file, cuts out the last step and tells, kernel by kernel, when
//! its blocks entered, waited and finished.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{Result, bail};

/// First bytes of a timeline file.
pub const MAGIC: &[u8; 8] = b"QBTRACE1";

/// What a block recorded (`trace_event` in common.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Entered a GEMV (before loading its first weights).
    Enter,
    /// Its programmatic-launch wait returned.
    Waited,
    /// Finished its last piece of work.
    Done,
    /// Left after writing partial results that another block merges.
    PartialDone,
}

impl EventKind {
    fn from_code(code: u64) -> Result<Self> {
        Ok(match code {
            0 => EventKind::Enter,
            1 => EventKind::Waited,
            2 => EventKind::Done,
            3 => EventKind::PartialDone,
            _ => bail!("unknown timeline event kind {code}"),
        })
    }

    fn code(self) -> u64 {
        match self {
            EventKind::Enter => 0,
            EventKind::Waited => 1,
            EventKind::Done => 2,
            EventKind::PartialDone => 3,
        }
    }
}

/// One recorded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The launch (`%gridid`; a replayed graph reuses its nodes' ids).
    pub grid: u64,
    /// Device clock (`%globaltimer`), nanoseconds.
    pub time_ns: u64,
    pub kind: EventKind,
    /// The SM the block ran on.
    pub sm: u8,
    /// The block's linear index in its grid.
    pub block: u64,
}

impl Event {
    /// The three words a block writes (see `trace_event`).
    pub fn words(&self) -> [u64; 3] {
        let meta = self.kind.code() | (u64::from(self.sm) << 8) | (self.block << 16);
        [self.grid, self.time_ns, meta]
    }

    fn from_words(w: [u64; 3]) -> Result<Self> {
        Ok(Event {
            grid: w[0],
            time_ns: w[1],
            kind: EventKind::from_code(w[2] & 0xff)?,
            sm: ((w[2] >> 8) & 0xff) as u8,
            block: w[2] >> 16,
        })
    }
}

/// A timeline file: the magic, the number of events ever recorded, the
/// ring's capacity in events, then the ring (three little-endian words per
/// slot, event i in slot i mod capacity).
pub fn encode(recorded: u64, ring: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + ring.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&recorded.to_le_bytes());
    out.extend_from_slice(&((ring.len() / 3) as u64).to_le_bytes());
    for w in ring {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// The events a timeline file holds, oldest first (the newest `capacity`
/// when the ring wrapped).
pub fn decode(bytes: &[u8]) -> Result<Vec<Event>> {
    if bytes.len() < 24 || &bytes[..8] != MAGIC {
        bail!(
            "not a quantbench timeline (it should start with \"{}\")",
            String::from_utf8_lossy(MAGIC)
        );
    }
    let word = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap());
    let (recorded, capacity) = (word(1), word(2) as usize);
    if capacity == 0 || bytes.len() != 24 + capacity * 24 {
        bail!(
            "timeline of {} bytes does not hold the {capacity} events its header announces",
            bytes.len()
        );
    }
    let kept = (recorded as usize).min(capacity);
    let first = if recorded as usize > capacity {
        recorded as usize % capacity
    } else {
        0
    };
    (0..kept)
        .map(|i| {
            let slot = (first + i) % capacity;
            let at = 3 + 3 * slot;
            Event::from_words([word(at), word(at + 1), word(at + 2)])
        })
        .collect()
}

/// The events of the last step of a replayed graph, sorted by time. A graph
/// launches its kernels with the same grid ids at every replay, so a launch's
/// events come in bursts a step period apart; the period is the median over
/// launches of the longest pause between a launch's consecutive events. The
/// last step holds, of every launch that ran within one period of the last
/// event, its events within half a period of its own last one. Without
/// repeated launches (no graph) all events are returned.
pub fn last_step(events: &[Event]) -> Vec<Event> {
    let mut sorted = events.to_vec();
    sorted.sort_by_key(|e| e.time_ns);
    let mut times: HashMap<u64, Vec<u64>> = HashMap::new();
    for e in &sorted {
        times.entry(e.grid).or_default().push(e.time_ns);
    }
    let mut pauses: Vec<u64> = times
        .values()
        .filter_map(|t| t.windows(2).map(|w| w[1] - w[0]).max())
        .collect();
    if pauses.is_empty() {
        return sorted;
    }
    pauses.sort_unstable();
    let period = pauses[pauses.len() / 2];
    let end = sorted.last().map_or(0, |e| e.time_ns);
    sorted.retain(|e| {
        let last = *times[&e.grid].last().expect("a launch has events");
        last + period > end && e.time_ns + period / 2 > last
    });
    sorted
}

/// When one launch's blocks entered, waited and finished, in microseconds
/// from the first event of the step.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSpan {
    pub grid: u64,
    /// Blocks whose wait returned.
    pub blocks: usize,
    pub first_enter: Option<f64>,
    pub first_wait: Option<f64>,
    pub last_wait: Option<f64>,
    pub last_partial: Option<f64>,
    pub last_done: Option<f64>,
}

/// The launches of a step in the order their first event came.
pub fn kernel_spans(step: &[Event]) -> Vec<KernelSpan> {
    let Some(t0) = step.iter().map(|e| e.time_ns).min() else {
        return Vec::new();
    };
    let mut order: Vec<(u64, u64)> = Vec::new();
    for e in step {
        match order.iter_mut().find(|(g, _)| *g == e.grid) {
            Some((_, first)) => *first = (*first).min(e.time_ns),
            None => order.push((e.grid, e.time_ns)),
        }
    }
    order.sort_by_key(|&(_, first)| first);
    let us = |t: u64| (t - t0) as f64 / 1e3;
    order
        .iter()
        .map(|&(grid, _)| {
            let of = |kind: EventKind| {
                step.iter()
                    .filter(move |e| e.grid == grid && e.kind == kind)
                    .map(|e| e.time_ns)
            };
            KernelSpan {
                grid,
                blocks: of(EventKind::Waited).count(),
                first_enter: of(EventKind::Enter).min().map(us),
                first_wait: of(EventKind::Waited).min().map(us),
                last_wait: of(EventKind::Waited).max().map(us),
                last_partial: of(EventKind::PartialDone).max().map(us),
                last_done: of(EventKind::Done).max().map(us),
            }
        })
        .collect()
}

/// A table of `spans`: one row per launch, times in microseconds from the
/// step's first event, and from each launch's first wait to its last block
/// done.
pub fn render(spans: &[KernelSpan]) -> String {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |t| format!("{t:.2}"));
    let mut out = String::from(
        "launch  blocks  first enter  first wait  last wait  last partial  last done  wait->done\n",
    );
    for s in spans {
        let span = match (s.first_wait, s.last_done) {
            (Some(w), Some(d)) => Some(d - w),
            _ => None,
        };
        let _ = writeln!(
            out,
            "{:>6}  {:>6}  {:>11}  {:>10}  {:>9}  {:>12}  {:>9}  {:>10}",
            s.grid,
            s.blocks,
            cell(s.first_enter),
            cell(s.first_wait),
            cell(s.last_wait),
            cell(s.last_partial),
            cell(s.last_done),
            cell(span)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(grid: u64, time_ns: u64, kind: EventKind, block: u64) -> Event {
        Event {
            grid,
            time_ns,
            kind,
            sm: (block % 132) as u8,
            block,
        }
    }

    fn ring(events: &[Event], capacity: usize, recorded: u64) -> Vec<u64> {
        let mut r = vec![0u64; 3 * capacity];
        for (i, e) in events.iter().enumerate() {
            let slot = i % capacity;
            r[3 * slot..3 * slot + 3].copy_from_slice(&e.words());
        }
        assert_eq!(recorded as usize, events.len());
        r
    }

    #[test]
    fn files_round_trip_with_and_without_a_wrapped_ring() {
        let events: Vec<Event> = (0..7)
            .map(|i| ev(40 + i % 2, 1000 * i, EventKind::Waited, i * 70_000))
            .collect();
        let whole = encode(7, &ring(&events, 8, 7));
        assert_eq!(decode(&whole).unwrap(), events);
        // Seven events in a ring of four: the last four survive, oldest first.
        let wrapped = encode(7, &ring(&events, 4, 7));
        assert_eq!(decode(&wrapped).unwrap(), events[3..].to_vec());
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(decode(b"QBTRACE0").is_err());
        let mut short = encode(1, &[1, 2, 1]);
        short.pop();
        assert!(decode(&short).is_err());
        let bad_kind = encode(1, &[1, 2, 9]);
        assert!(decode(&bad_kind).is_err());
    }

    #[test]
    fn the_last_step_is_the_last_burst_of_each_replayed_launch() {
        // Two replays, 100 µs apart, of launches 1 (two blocks) and 2 (one
        // block); launch 3 ran once, before them; launch 4 only in the last
        // replay, between 1 and 2.
        let us = 1000;
        let mut events = vec![ev(3, 0, EventKind::Waited, 0)];
        for (step, t0) in [(0u64, 10 * us), (1, 110 * us)] {
            events.push(ev(1, t0, EventKind::Waited, 0));
            events.push(ev(1, t0 + 2 * us, EventKind::Waited, 1));
            if step == 1 {
                events.push(ev(4, t0 + 3 * us, EventKind::Waited, 0));
            }
            events.push(ev(2, t0 + 5 * us, EventKind::Waited, 0));
        }
        events.reverse();
        let step = last_step(&events);
        let got: Vec<(u64, u64)> = step.iter().map(|e| (e.grid, e.time_ns / us)).collect();
        assert_eq!(got, [(1, 110), (1, 112), (4, 113), (2, 115)]);
        // Without repeated launches every event is kept.
        let once = [
            ev(8, 5, EventKind::Enter, 0),
            ev(9, 3, EventKind::Waited, 0),
        ];
        assert_eq!(last_step(&once).len(), 2);
    }

    #[test]
    fn spans_of_a_step_by_hand() {
        // Launch 7: two blocks entering at 0 and 400 ns, waiting at 1000
        // and 1500, done at 3000 and 2500. Launch 5 (later): one block that
        // waits at 3500 and writes partials at 4000, one that merges at 6000.
        let step = [
            ev(7, 10_000, EventKind::Enter, 0),
            ev(7, 10_400, EventKind::Enter, 1),
            ev(7, 11_000, EventKind::Waited, 0),
            ev(7, 11_500, EventKind::Waited, 1),
            ev(7, 13_000, EventKind::Done, 0),
            ev(7, 12_500, EventKind::Done, 1),
            ev(5, 13_500, EventKind::Waited, 0),
            ev(5, 13_600, EventKind::Waited, 1),
            ev(5, 14_000, EventKind::PartialDone, 0),
            ev(5, 16_000, EventKind::Done, 1),
        ];
        let spans = kernel_spans(&step);
        assert_eq!(
            spans,
            [
                KernelSpan {
                    grid: 7,
                    blocks: 2,
                    first_enter: Some(0.0),
                    first_wait: Some(1.0),
                    last_wait: Some(1.5),
                    last_partial: None,
                    last_done: Some(3.0),
                },
                KernelSpan {
                    grid: 5,
                    blocks: 2,
                    first_enter: None,
                    first_wait: Some(3.5),
                    last_wait: Some(3.6),
                    last_partial: Some(4.0),
                    last_done: Some(6.0),
                },
            ]
        );
        let table = render(&spans);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[1].trim_start().starts_with("7"));
        assert!(rows[1].trim_end().ends_with("2.00"), "{}", rows[1]);
        assert!(rows[2].contains("4.00") && rows[2].trim_end().ends_with("2.50"));
        assert!(kernel_spans(&[]).is_empty());
    }
}
