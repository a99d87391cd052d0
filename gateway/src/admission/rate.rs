//! Token buckets for a tenant's requests per minute and tokens per minute.
//!
//! A bucket holds up to a minute's allowance and refills continuously. Requests take one
//! unit from the RPM bucket; the TPM bucket is charged a request's estimated tokens at
//! admission and corrected by the `usage` its answer reports, so it may go into debt
//! (an answer longer than estimated), which later requests wait out.
//!
//! With `[cluster]`, a bucket is *leased*: the bucket itself lives in the store, shared by
//! every replica, and what this one holds is the part it has taken from there
//! ([`crate::cluster`] settles it every `sync_ms`: the units asked for since the last
//! settling size the next lease, debt goes back to the store, an idle replica returns what
//! it holds). A request never waits on the store: it takes from the lease, or is refused.
//! While the store is unreachable the bucket refills here, at this replica's share of the
//! tenant's rate.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket: `per_minute` units a minute, at most `per_minute` saved up.
#[derive(Debug)]
pub struct Bucket {
    per_minute: u64,
    state: Mutex<Level>,
}

/// Where a bucket's units come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    /// This replica alone: it refills at the tenant's rate.
    Local,
    /// Leases from the store's bucket, settled by the cluster task; no refill here.
    Leased,
    /// The store is unreachable: it refills at `share` of the tenant's rate, up to `share`
    /// of a minute's allowance.
    Fallback {
        /// This replica's share of the tenant (1 ÷ the replicas last seen).
        share: f64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Level {
    /// Units available now (negative: debt).
    units: f64,
    /// When `units` was last brought up to date.
    at: Instant,
    source: Source,
    /// Units asked for (taken or refused) since the last settling with the store.
    asked: f64,
    /// The largest request refused since then (a lease must be able to hold it).
    largest_refused: f64,
    /// The store's level at the last settling (what the other replicas can still lease).
    store_level: f64,
    /// When that was (`None`: never).
    settled_at: Option<Instant>,
    /// Units refilled here while the store was unreachable: the store refilled the same
    /// allowance meanwhile, so they are handed back when leasing resumes.
    fallback_refill: f64,
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

impl Source {
    /// `local`, `store` or `fallback`, for the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Leased => "store",
            Self::Fallback { .. } => "fallback",
        }
    }
}

/// One settling with the store: what a leased bucket holds and wants to hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseAsk {
    /// Units held now (negative: debt, which the store takes over).
    pub held: f64,
    /// Units to hold after the settling (less than `held`: the rest goes back).
    pub want: f64,
}

impl Bucket {
    /// A full bucket of `per_minute` units.
    pub fn new(per_minute: u64) -> Self {
        Self::new_at(per_minute, Instant::now(), Source::Local)
    }

    /// An empty bucket whose units are leased from the store's (see [`Source::Leased`]).
    pub fn leased(per_minute: u64) -> Self {
        Self::new_at(per_minute, Instant::now(), Source::Leased)
    }

    fn new_at(per_minute: u64, now: Instant, source: Source) -> Self {
        let units = match source {
            Source::Local => per_minute as f64,
            _ => 0.0,
        };
        Self {
            per_minute,
            state: Mutex::new(Level {
                units,
                at: now,
                source,
                asked: 0.0,
                largest_refused: 0.0,
                store_level: per_minute as f64,
                settled_at: None,
                fallback_refill: 0.0,
            }),
        }
    }

    /// The allowance per minute.
    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }

    /// The units this replica holds now (leased: its lease; negative: debt).
    pub fn held(&self) -> f64 {
        self.level(Instant::now()).units
    }

    /// Where its units come from now.
    pub fn source(&self) -> Source {
        self.lock().source
    }

    fn rate_per_s(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Level> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn level(&self, now: Instant) -> std::sync::MutexGuard<'_, Level> {
        let mut l = self.lock();
        let share = match l.source {
            Source::Local => 1.0,
            Source::Leased => 0.0,
            Source::Fallback { share } => share,
        };
        if share > 0.0 {
            let elapsed = now.saturating_duration_since(l.at).as_secs_f64();
            let cap = self.per_minute as f64 * share;
            let before = l.units;
            l.units = (l.units + elapsed * self.rate_per_s() * share).min(cap.max(l.units));
            if matches!(l.source, Source::Fallback { .. }) {
                l.fallback_refill += l.units - before;
            }
        }
        l.at = now;
        l
    }

    fn quota(&self, l: &Level) -> Quota {
        let shared = match l.source {
            Source::Leased => l.store_level.max(0.0),
            _ => 0.0,
        };
        let units = l.units + shared;
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
        l.asked += n as f64;
        if l.units + 1e-9 < need {
            l.largest_refused = l.largest_refused.max(need);
            let wait = (need - l.units) / self.rate_per_s();
            return Err(Quota {
                limit: self.per_minute,
                remaining: 0,
                reset: Duration::from_secs_f64(wait),
            });
        }
        l.units -= n as f64;
        Ok(self.quota(&l))
    }

    /// `Err` when the bucket is empty or in debt: no request could pass now. Takes nothing.
    pub fn check_not_empty(&self) -> Result<(), Quota> {
        let mut l = self.level(Instant::now());
        if l.units >= 1.0 {
            return Ok(());
        }
        l.largest_refused = l.largest_refused.max(1.0);
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
        let cap = match l.source {
            Source::Leased => f64::INFINITY,
            _ => self.per_minute as f64,
        };
        l.units = (l.units + charged as f64 - actual as f64).min(cap);
        l.asked += actual as f64 - charged as f64;
    }

    /// The quota now, without taking anything.
    pub fn peek(&self) -> Quota {
        let l = self.level(Instant::now());
        self.quota(&l)
    }

    /// What to settle with the store now, for a leased bucket: the units held and the
    /// lease wanted — what was asked for over the last `elapsed`, for the next `ahead`; at
    /// least the largest request refused; and at least a `1 ÷ (2 × replicas)` share of the
    /// store's level, so a burst or a lone request the bucket allows is not refused for want
    /// of a lease (idle replicas together hold under half of what the store has; as it runs
    /// low, they hand it back). Restarts the count of what was asked. `None` when not leased.
    pub fn lease_ask(
        &self,
        elapsed: Duration,
        ahead: Duration,
        replicas: usize,
    ) -> Option<LeaseAsk> {
        let mut l = self.level(Instant::now());
        if l.source != Source::Leased {
            return None;
        }
        let demand = l.asked.max(0.0) / elapsed.as_secs_f64().max(1e-3);
        let share = l.store_level.max(0.0) / (2 * replicas.max(1)) as f64;
        let want = (demand * ahead.as_secs_f64())
            .max(l.largest_refused)
            .max(share)
            .min(self.per_minute as f64);
        l.asked = 0.0;
        l.largest_refused = 0.0;
        Some(LeaseAsk {
            held: l.units,
            want,
        })
    }

    /// The store's answer to `ask`: `granted` units more (negative: returned) and its
    /// level after. Debt `ask` held was handed over to the store.
    pub fn lease_settled(&self, ask: LeaseAsk, granted: f64, store_level: f64) {
        let mut l = self.level(Instant::now());
        if l.source != Source::Leased {
            return;
        }
        l.units += granted - ask.held.min(0.0);
        l.store_level = store_level;
        l.settled_at = Some(Instant::now());
    }

    /// The store's level as it stands now, by the last settling and the refill since (a
    /// minute's allowance before the first): what a store that lost the bucket (restarted
    /// empty) recreates it at, so that it hands out neither a fresh minute nor less than
    /// it would have had.
    pub fn store_level(&self) -> f64 {
        let l = self.lock();
        let since = l
            .settled_at
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * self.rate_per_s());
        (l.store_level + since).min(self.per_minute as f64)
    }

    /// The store is unreachable: refill here at `share` of the rate, from what is held.
    pub fn fall_back(&self, share: f64) {
        let mut l = self.level(Instant::now());
        if l.source != Source::Local {
            l.source = Source::Fallback {
                share: share.clamp(0.0, 1.0),
            };
        }
    }

    /// The store is back: lease again, keeping what is held less what was refilled here
    /// meanwhile (at most this replica's share of a minute): the store refilled that
    /// allowance too, and the next settling takes any debt this leaves.
    pub fn resume_leasing(&self) {
        let mut l = self.level(Instant::now());
        if let Source::Fallback { share } = l.source {
            let refilled = l.fallback_refill.min(share * self.per_minute as f64);
            l.units -= refilled;
            l.fallback_refill = 0.0;
            l.source = Source::Leased;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_minute_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let b = Bucket::new_at(60, t0, Source::Local);
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
        let b = Bucket::new_at(600, t0, Source::Local);
        assert!(b.take_at(1000, t0).is_ok());
        // 400 in debt: 10 units/s, so one unit needs 40.1 s.
        let refused = b.take_at(1, t0).unwrap_err();
        assert!(
            (refused.reset.as_secs_f64() - 40.1).abs() < 1e-6,
            "{refused:?}"
        );
    }

    fn settle(b: &Bucket, granted: impl Fn(LeaseAsk) -> f64, store_level: f64) -> LeaseAsk {
        let ask = b
            .lease_ask(Duration::from_millis(100), Duration::from_millis(200), 3)
            .expect("leased");
        b.lease_settled(ask, granted(ask), store_level);
        ask
    }

    #[test]
    fn a_leased_bucket_spends_only_what_the_store_granted() {
        let b = Bucket::leased(600);
        assert_eq!(b.source(), Source::Leased);
        assert!(
            b.take(1).is_err(),
            "nothing is held before the first settling"
        );
        // The store is full: the lease is a sixth of it (two shares per replica, three).
        let ask = settle(&b, |a| a.want - a.held, 500.0);
        assert_eq!(ask.want, 100.0);
        for _ in 0..100 {
            b.take(1).expect("within the lease");
        }
        let refused = b.take(1).unwrap_err();
        assert_eq!(refused.remaining, 0);
        // Remaining counts what the store still has.
        settle(&b, |_| 1.0, 499.0);
        assert_eq!(b.take(1).expect("granted").remaining, 499);
    }

    #[test]
    fn what_was_asked_sizes_the_next_lease_and_an_empty_store_grants_nothing() {
        let b = Bucket::leased(6000);
        settle(&b, |_| 0.0, 0.0);
        for _ in 0..30 {
            let _ = b.take(1);
        }
        // 30 asked in 100 ms is 300/s: 60 for the next 200 ms.
        let ask = settle(&b, |_| 0.0, 0.0);
        assert_eq!((ask.held, ask.want), (0.0, 60.0));
        // A refused request larger than what was asked for sets the floor.
        let _ = b.take(500);
        let ask = b
            .lease_ask(Duration::from_secs(10), Duration::from_millis(200), 3)
            .expect("leased");
        assert_eq!(ask.want, 500.0);
    }

    #[test]
    fn debt_goes_to_the_store_and_an_unneeded_lease_goes_back() {
        let b = Bucket::leased(60_000);
        settle(&b, |_| 100.0, 0.0);
        b.take(100).expect("held");
        b.correct(100, 250);
        assert!(b.check_not_empty().is_err(), "150 in debt");
        let ask = settle(&b, |_| 40.0, 0.0);
        assert!((ask.held + 150.0).abs() < 1e-6, "{ask:?}");
        assert!(
            (b.held() - 40.0).abs() < 1e-6,
            "the debt is the store's now"
        );
        // Nothing asked, store empty: all of it goes back.
        let ask = settle(&b, |a| a.want - a.held, 0.0);
        assert_eq!(ask.want, 0.0);
        assert!(b.held().abs() < 1e-6);
    }

    #[test]
    fn without_the_store_a_leased_bucket_refills_at_its_share() {
        let b = Bucket::leased(600);
        settle(&b, |_| 5.0, 0.0);
        b.fall_back(0.5);
        assert_eq!(b.source().as_str(), "fallback");
        assert_eq!(
            b.lease_ask(Duration::from_secs(1), Duration::from_secs(1), 1),
            None
        );
        // 10/s at half: 5/s on top of the 5 held, up to half a minute's allowance (300).
        let later = Instant::now() + Duration::from_secs(6);
        b.take_at(35, later).expect("5 held + 30 refilled");
        assert!(b.take_at(1, later).is_err());
        // The store refilled meanwhile too: what was refilled here is handed back, and what
        // was spent beyond the 5 held becomes debt for the store.
        b.resume_leasing();
        assert_eq!(b.source(), Source::Leased);
        assert!((b.held() + 30.0).abs() < 0.01, "{}", b.held());
        // At most a minute's share is refilled here, and handed back.
        let b = Bucket::leased(600);
        b.fall_back(0.5);
        let much_later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(b.take_at(0, much_later).unwrap().remaining, 300);
        b.resume_leasing();
        assert!(b.held().abs() < 0.01, "{}", b.held());
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
