//! A sliding minute of one shard's answers: six 10-second slots, each an hdrhistogram of
//! time to first token and a count of answers. Reading merges the slots that are still
//! inside the minute; recording into a slot whose time has passed clears it first.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Seconds one slot covers.
const SLOT_S: u64 = 10;
/// Slots in the window: 6 × 10 s = one minute.
const SLOTS: usize = 6;

/// One shard's last minute.
#[derive(Debug)]
pub struct LatencyWindow {
    slots: Mutex<[Slot; SLOTS]>,
}

#[derive(Debug)]
struct Slot {
    /// Which 10-second period the slot holds (`now_s / SLOT_S`).
    period: u64,
    answers: u64,
    /// Made on the slot's first sample: a shard that serves nothing costs no histogram
    /// (about 25 KB each; six per shard).
    ttft_us: Option<Histogram<u64>>,
}

/// The last minute of one shard, as the dashboard shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WindowSummary {
    /// Answers per second over the window (the part of it the process has lived).
    pub requests_per_s: f64,
    /// Median time to first token, milliseconds; `None` with no sample.
    pub ttft_p50_ms: Option<f64>,
    /// 99th percentile time to first token, milliseconds; `None` with no sample.
    pub ttft_p99_ms: Option<f64>,
    /// TTFT samples behind the percentiles.
    pub ttft_samples: u64,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            slots: Mutex::new(std::array::from_fn(|_| Slot {
                period: u64::MAX,
                answers: 0,
                ttft_us: None,
            })),
        }
    }
}

impl LatencyWindow {
    /// Records one answer at `now_s` (see [`super::now_s`]), with its time to first token
    /// when it had one.
    pub fn record(&self, now_s: u64, ttft: Option<Duration>) {
        let period = now_s / SLOT_S;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut slots[(period % SLOTS as u64) as usize];
        if slot.period != period {
            slot.period = period;
            slot.answers = 0;
            if let Some(h) = &mut slot.ttft_us {
                h.reset();
            }
        }
        slot.answers += 1;
        if let Some(t) = ttft {
            let us = super::ttft_us(t);
            slot.ttft_us
                .get_or_insert_with(super::ttft_histogram)
                .saturating_record(us);
        }
    }

    /// The minute up to `now_s`. `uptime_s`, the process's age, keeps a young process's
    /// rate from being diluted over a minute it did not live.
    pub fn summary(&self, now_s: u64, uptime_s: u64) -> WindowSummary {
        let period = now_s / SLOT_S;
        let oldest = period.saturating_sub(SLOTS as u64 - 1);
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut merged = super::ttft_histogram();
        let mut answers = 0;
        for s in slots
            .iter()
            .filter(|s| (oldest..=period).contains(&s.period))
        {
            answers += s.answers;
            if let Some(h) = &s.ttft_us {
                let _ = merged.add(h);
            }
        }
        drop(slots);
        // The window spans the five whole slots before this one and the part of this one
        // that has passed.
        let span = ((SLOTS as u64 - 1) * SLOT_S + now_s % SLOT_S + 1).min(uptime_s.max(1));
        let ms = |q: f64| (!merged.is_empty()).then(|| merged.value_at_quantile(q) as f64 / 1e3);
        WindowSummary {
            requests_per_s: answers as f64 / span as f64,
            ttft_p50_ms: ms(0.5),
            ttft_p99_ms: ms(0.99),
            ttft_samples: merged.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rate_over_the_minute() {
        let w = LatencyWindow::default();
        for i in 0..100u64 {
            w.record(100 + i % 30, Some(Duration::from_millis(10 + i)));
        }
        let s = w.summary(129, 1000);
        assert_eq!(s.ttft_samples, 100);
        let p50 = s.ttft_p50_ms.unwrap();
        let p99 = s.ttft_p99_ms.unwrap();
        assert!((58.0..=61.0).contains(&p50), "{p50}");
        assert!((107.0..=110.0).contains(&p99), "{p99}");
        // 100 answers over 60 s (five whole slots and all of the current one).
        assert!((s.requests_per_s - 100.0 / 60.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn slots_older_than_a_minute_drop_out_and_are_reused() {
        let w = LatencyWindow::default();
        w.record(5, Some(Duration::from_secs(2)));
        assert_eq!(w.summary(59, 1000).ttft_samples, 1);
        // 60 s later the slot is outside the window...
        let s = w.summary(60, 1000);
        assert_eq!((s.ttft_samples, s.ttft_p99_ms), (0, None));
        assert_eq!(s.requests_per_s, 0.0);
        // ...and a new answer in the same slot position clears it first.
        w.record(65, Some(Duration::from_millis(3)));
        let s = w.summary(65, 1000);
        assert_eq!(s.ttft_samples, 1);
        assert!(s.ttft_p99_ms.unwrap() < 4.0, "{s:?}");
    }

    #[test]
    fn answers_without_a_first_token_count_in_the_rate_only_and_a_young_process_is_not_diluted() {
        let w = LatencyWindow::default();
        for _ in 0..10 {
            w.record(4, None);
        }
        let s = w.summary(4, 5);
        assert_eq!(s.ttft_samples, 0);
        assert!((s.requests_per_s - 2.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn a_huge_ttft_is_clamped_not_lost() {
        let w = LatencyWindow::default();
        w.record(1, Some(Duration::from_secs(3600)));
        let s = w.summary(1, 100);
        assert_eq!(s.ttft_samples, 1);
        assert!(s.ttft_p99_ms.unwrap() >= 119_000.0);
    }
}
