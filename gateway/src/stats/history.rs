//! The fleet's last 15 minutes, one point a second: answers, refusals and goodput per
//! second and TTFT p99. Requests add to the current second (atomics, one short lock for
//! the TTFT histogram); a ticker closes the second and appends it to fixed rings of `f32`
//! (900 points, 3.6 KB a series).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Points kept: 15 minutes at one a second.
pub const POINTS: usize = 900;

/// How one request ended, as the history counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered in full; `good` when its first token came within [`super::GOOD_TTFT`].
    Served {
        /// Counts as goodput.
        good: bool,
    },
    /// Refused by admission (429, 503 overloaded).
    Refused,
    /// Any other error.
    Failed,
}

/// The fleet's per-second series.
#[derive(Debug)]
pub struct History {
    current: Current,
    rings: Mutex<Rings>,
}

#[derive(Debug)]
struct Current {
    answers: AtomicU64,
    refused: AtomicU64,
    good: AtomicU64,
    ttft_us: Mutex<Histogram<u64>>,
}

#[derive(Debug, Default)]
struct Rings {
    requests: VecDeque<f32>,
    refused: VecDeque<f32>,
    goodput: VecDeque<f32>,
    /// Milliseconds; NaN for a second without a first token (drawn as a gap).
    ttft_p99_ms: VecDeque<f32>,
}

/// The series as the admin API hands them out, oldest point first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    /// Seconds between points.
    pub interval_s: u64,
    /// Requests answered or refused per second.
    pub requests_per_s: Vec<f32>,
    /// Requests refused per second.
    pub refused_per_s: Vec<f32>,
    /// Complete answers with a prompt first token per second.
    pub goodput_per_s: Vec<f32>,
    /// TTFT p99 of each second, milliseconds (`null` for a second without one).
    pub ttft_p99_ms: Vec<Option<f32>>,
}

impl Default for History {
    fn default() -> Self {
        Self {
            current: Current {
                answers: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                good: AtomicU64::new(0),
                ttft_us: Mutex::new(super::ttft_histogram()),
            },
            rings: Mutex::new(Rings::default()),
        }
    }
}

impl History {
    /// Counts one finished request in the current second.
    pub fn record(&self, outcome: Outcome, ttft: Option<Duration>) {
        let c = &self.current;
        c.answers.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Served { good: true } => {
                c.good.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Refused => {
                c.refused.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Served { good: false } | Outcome::Failed => {}
        }
        if let Some(t) = ttft {
            let us = super::ttft_us(t);
            c.ttft_us
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(us);
        }
    }

    /// Closes the current second (`elapsed` long: the ticker's real interval) and starts
    /// the next.
    pub fn tick(&self, elapsed: Duration) {
        let c = &self.current;
        let per_s = |n: u64| (n as f64 / elapsed.as_secs_f64().max(1e-3)) as f32;
        let answers = per_s(c.answers.swap(0, Ordering::Relaxed));
        let refused = per_s(c.refused.swap(0, Ordering::Relaxed));
        let good = per_s(c.good.swap(0, Ordering::Relaxed));
        let p99 = {
            let mut h = c.ttft_us.lock().unwrap_or_else(|p| p.into_inner());
            let p = if h.is_empty() {
                f32::NAN
            } else {
                h.value_at_quantile(0.99) as f32 / 1e3
            };
            h.reset();
            p
        };
        let mut guard = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let r = &mut *guard;
        for (ring, v) in [
            (&mut r.requests, answers),
            (&mut r.refused, refused),
            (&mut r.goodput, good),
            (&mut r.ttft_p99_ms, p99),
        ] {
            if ring.len() == POINTS {
                ring.pop_front();
            }
            ring.push_back(v);
        }
    }

    /// The last `points` seconds (at most [`POINTS`]), oldest first.
    pub fn series(&self, points: usize) -> Series {
        let r = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let tail = |ring: &VecDeque<f32>| -> Vec<f32> {
            ring.iter()
                .skip(ring.len().saturating_sub(points))
                .copied()
                .collect()
        };
        Series {
            interval_s: 1,
            requests_per_s: tail(&r.requests),
            refused_per_s: tail(&r.refused),
            goodput_per_s: tail(&r.goodput),
            ttft_p99_ms: tail(&r.ttft_p99_ms)
                .into_iter()
                .map(|v| (!v.is_nan()).then_some(v))
                .collect(),
        }
    }

    /// Runs the ticker: one point a second until the task is dropped.
    pub async fn run_ticker(self: std::sync::Arc<Self>) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        let mut last = tokio::time::Instant::now();
        loop {
            interval.tick().await;
            let now = tokio::time::Instant::now();
            self.tick(now - last);
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_is_counted_then_closed() {
        let h = History::default();
        for i in 0..10u64 {
            h.record(
                Outcome::Served { good: i < 7 },
                Some(Duration::from_millis(100 * (i + 1))),
            );
        }
        h.record(Outcome::Refused, None);
        h.record(Outcome::Failed, None);
        h.tick(Duration::from_secs(1));
        let s = h.series(POINTS);
        assert_eq!(s.requests_per_s, vec![12.0]);
        assert_eq!(s.refused_per_s, vec![1.0]);
        assert_eq!(s.goodput_per_s, vec![7.0]);
        let p99 = s.ttft_p99_ms[0].unwrap();
        assert!((995.0..=1010.0).contains(&p99), "{p99}");
        // The next second starts empty; with no first token its p99 is a gap.
        h.tick(Duration::from_secs(2));
        let s = h.series(POINTS);
        assert_eq!(s.requests_per_s, vec![12.0, 0.0]);
        assert_eq!(s.ttft_p99_ms[1], None);
    }

    #[test]
    fn rates_follow_the_real_interval_and_the_rings_stay_bounded() {
        let h = History::default();
        for _ in 0..4 {
            h.record(Outcome::Served { good: true }, None);
        }
        h.tick(Duration::from_secs(2));
        assert_eq!(h.series(1).requests_per_s, vec![2.0]);
        for _ in 0..POINTS + 50 {
            h.tick(Duration::from_secs(1));
        }
        let s = h.series(POINTS * 2);
        assert_eq!(s.requests_per_s.len(), POINTS);
        assert_eq!(h.series(60).goodput_per_s.len(), 60);
    }
}
