//! Token buckets for a tenant's requests per minute and tokens per minute.
//!
//! A bucket holds up to a minute's allowance and refills continuously. Requests take one
//! unit from the RPM bucket; the TPM bucket is charged a request's estimated tokens at
//! admission and corrected by the `usage` its answer reports, so it may go into debt
//! (an answer longer than estimated), which later requests wait out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket: `per_minute` units a minute, at most `per_minute` saved up.
#[derive(Debug)]
pub struct Bucket {
    per_minute: u64,
    state: Mutex<Level>,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Units available now (negative: debt).
    units: f64,
    /// When `units` was last brought up to date.
    at: Instant,
}

/// What a bucket says about one request, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// The allowance per minute.
    pub limit: u64,
    /// Units left after this request (0 when refused).
    pub remaining: u64,
    /// Until the bucket is full again (refused: until this request would fit).
    pub reset: Duration,
}

impl Bucket {
    /// A full bucket of `per_minute` units.
    pub fn new(per_minute: u64) -> Self {
        Self::new_at(per_minute, Instant::now())
    }

    fn new_at(per_minute: u64, now: Instant) -> Self {
        Self {
            per_minute,
            state: Mutex::new(Level {
                units: per_minute as f64,
                at: now,
            }),
        }
    }

    /// The allowance per minute.
    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }

    fn rate_per_s(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    fn level(&self, now: Instant) -> std::sync::MutexGuard<'_, Level> {
        let mut l = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(l.at).as_secs_f64();
        l.units = (l.units + elapsed * self.rate_per_s()).min(self.per_minute as f64);
        l.at = now;
        l
    }

    fn quota(&self, units: f64) -> Quota {
        let missing = (self.per_minute as f64 - units).max(0.0);
        Quota {
            limit: self.per_minute,
            remaining: units.max(0.0) as u64,
            reset: Duration::from_secs_f64(missing / self.rate_per_s()),
        }
    }

    /// Takes `n` units if the bucket holds them (a request larger than the whole
    /// allowance passes when the bucket is full, and leaves it in debt). `Err` carries
    /// the quota with `reset` = how long until `n` would fit.
    pub fn take(&self, n: u64) -> Result<Quota, Quota> {
        self.take_at(n, Instant::now())
    }

    fn take_at(&self, n: u64, now: Instant) -> Result<Quota, Quota> {
        let mut l = self.level(now);
        let need = (n as f64).min(self.per_minute as f64);
        if l.units + 1e-9 < need {
            let wait = (need - l.units) / self.rate_per_s();
            return Err(Quota {
                limit: self.per_minute,
                remaining: 0,
                reset: Duration::from_secs_f64(wait),
            });
        }
        l.units -= n as f64;
        Ok(self.quota(l.units))
    }

    /// `Err` when the bucket is empty or in debt: no request could pass now. Takes nothing.
    pub fn check_not_empty(&self) -> Result<(), Quota> {
        let l = self.level(Instant::now());
        if l.units >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - l.units) / self.rate_per_s();
        Err(Quota {
            limit: self.per_minute,
            remaining: 0,
            reset: Duration::from_secs_f64(wait),
        })
    }

    /// Corrects an earlier charge: `charged` was taken, `actual` was used.
    pub fn correct(&self, charged: u64, actual: u64) {
        let mut l = self.level(Instant::now());
        l.units = (l.units + charged as f64 - actual as f64).min(self.per_minute as f64);
    }

    /// The quota now, without taking anything.
    pub fn peek(&self) -> Quota {
        let l = self.level(Instant::now());
        self.quota(l.units)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_minute_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let b = Bucket::new_at(60, t0);
        for i in 0..60 {
            let q = b.take_at(1, t0).unwrap();
            assert_eq!(q.remaining, 59 - i);
        }
        let refused = b.take_at(1, t0).unwrap_err();
        assert_eq!(refused.remaining, 0);
        assert!(
            (refused.reset.as_secs_f64() - 1.0).abs() < 1e-6,
            "{refused:?}"
        );
        // One unit a second comes back.
        assert!(b.take_at(1, t0 + Duration::from_millis(500)).is_err());
        assert!(b.take_at(1, t0 + Duration::from_millis(1000)).is_ok());
        // Never more than a minute's worth saved.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take_at(0, later).unwrap().remaining, 60);
    }

    #[test]
    fn a_request_larger_than_the_allowance_passes_from_a_full_bucket_and_leaves_debt() {
        let t0 = Instant::now();
        let b = Bucket::new_at(600, t0);
        assert!(b.take_at(1000, t0).is_ok());
        // 400 in debt: 10 units/s, so one unit needs 40.1 s.
        let refused = b.take_at(1, t0).unwrap_err();
        assert!(
            (refused.reset.as_secs_f64() - 40.1).abs() < 1e-6,
            "{refused:?}"
        );
    }

    #[test]
    fn usage_corrects_the_estimate_both_ways() {
        let b = Bucket::new(1000);
        b.take(500).unwrap();
        b.correct(500, 100);
        assert!(b.peek().remaining >= 899);
        b.correct(0, 2000);
        assert!(b.check_not_empty().is_err());
        assert_eq!(b.peek().remaining, 0);
    }
}
