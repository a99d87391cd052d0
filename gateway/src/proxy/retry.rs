//! The retry budget, so that when shards are failing, retries stop adding load instead of
//! multiplying it. A retry may go ahead when either
//! - retries in flight stay under a share of requests in flight, with a floor (Envoy's
//!   `retry_budget`: 20 %, at least 3), or
//! - it can spend a token earned by recent successes (tower's `retry::budget` idea: each
//!   success deposits the same 20 % of a retry, up to a reserve of 100 retries).
//!
//! The second rule is what lets a gateway retry every request that was in flight on a shard
//! the moment it died — a burst far above 20 % of what is in flight — after a period of
//! normal service, while under sustained failure no success refills the reserve and only the
//! first rule applies, bounding amplification.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;

use crate::policy::RetrySettings;

/// Requests and retries in flight, and the rule between them.
#[derive(Debug)]
pub struct RetryBudget {
    active: AtomicU64,
    retrying: AtomicU64,
    /// Earned retries, in thousandths.
    reserve_milli: AtomicU64,
    settings: ArcSwap<RetrySettings>,
}

/// Most retries the reserve holds.
const MAX_RESERVE: u64 = 100;

impl RetryBudget {
    /// An empty budget.
    pub fn new(settings: RetrySettings) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicU64::new(0),
            retrying: AtomicU64::new(0),
            reserve_milli: AtomicU64::new(0),
            settings: ArcSwap::from_pointee(settings),
        })
    }

    /// New settings (a reloaded policy); what is in flight and in reserve stays.
    pub fn reconfigure(&self, settings: RetrySettings) {
        self.settings.store(Arc::new(settings));
    }

    /// Counts a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight {
            budget: Arc::clone(self),
            retrying: false,
        }
    }

    /// A request succeeded: it earns the reserve a share of a retry.
    pub fn deposit(&self) {
        let add = (self.settings.load().budget_ratio * 1000.0) as u64;
        let _ = self
            .reserve_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some((r + add).min(MAX_RESERVE * 1000))
            });
    }

    fn withdraw(&self) -> bool {
        self.reserve_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                r.checked_sub(1000)
            })
            .is_ok()
    }

    fn allowance(&self) -> u64 {
        let active = self.active.load(Ordering::Relaxed) as f64;
        let s = self.settings.load();
        ((active * s.budget_ratio) as u64).max(s.min_concurrent)
    }

    /// The backoff before retry number `retry` (1 for the first): full jitter over
    /// `base × 2^(retry-1)`, capped.
    pub fn backoff(&self, retry: u32) -> Duration {
        let s = self.settings.load();
        let ceiling = s
            .backoff_base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(s.backoff_max);
        if ceiling.is_zero() {
            return ceiling;
        }
        rand::thread_rng().gen_range(Duration::ZERO..=ceiling)
    }
}

/// One request in flight; may become a retry while the budget allows.
#[derive(Debug)]
pub struct InFlight {
    budget: Arc<RetryBudget>,
    retrying: bool,
}

impl InFlight {
    /// Asks to retry. `false`: the budget is spent; answer the client now.
    pub fn try_retry(&mut self) -> bool {
        if self.retrying {
            return true;
        }
        let b = &self.budget;
        let allowance = b.allowance();
        let mut current = b.retrying.load(Ordering::Relaxed);
        loop {
            if current >= allowance {
                if b.withdraw() {
                    b.retrying.fetch_add(1, Ordering::Relaxed);
                    self.retrying = true;
                    return true;
                }
                return false;
            }
            match b.retrying.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.retrying = true;
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.budget.active.fetch_sub(1, Ordering::Relaxed);
        if self.retrying {
            self.budget.retrying.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_a_share_of_requests_with_a_floor() {
        let budget = RetryBudget::new(RetrySettings::default());
        let mut requests: Vec<InFlight> = (0..50).map(|_| budget.request()).collect();
        // 20 % of 50 = 10 retries may be in flight.
        let granted = requests
            .iter_mut()
            .filter_map(|r| r.try_retry().then_some(()))
            .count();
        assert_eq!(granted, 10);
        // A request already retrying keeps its place.
        assert!(requests[0].try_retry());
        requests.truncate(5);
        // With 5 requests the floor of 3 applies; the 5 kept include 5 retriers already.
        let fresh = &mut budget.request();
        assert!(!fresh.try_retry());
        drop(requests);
        assert!(budget.request().try_retry());
    }

    #[test]
    fn successes_earn_a_reserve_for_bursts_and_it_runs_dry() {
        let budget = RetryBudget::new(RetrySettings::default());
        for _ in 0..50 {
            budget.deposit();
        }
        // 50 successes × 0.2 = 10 earned retries, beyond the floor of 3 concurrent.
        let mut requests: Vec<InFlight> = (0..20).map(|_| budget.request()).collect();
        let granted = requests
            .iter_mut()
            .map(|r| r.try_retry())
            .filter(|ok| *ok)
            .count();
        assert_eq!(granted, 4 + 10);
        drop(requests);
        let mut requests: Vec<InFlight> = (0..20).map(|_| budget.request()).collect();
        assert_eq!(
            requests
                .iter_mut()
                .map(|r| r.try_retry())
                .filter(|ok| *ok)
                .count(),
            4
        );
        // The reserve is capped.
        for _ in 0..10_000 {
            budget.deposit();
        }
        assert_eq!(
            budget.reserve_milli.load(Ordering::Relaxed),
            MAX_RESERVE * 1000
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let budget = RetryBudget::new(RetrySettings::default());
        // Full jitter over 25 ms, 100 ms (25 × 2²) and the 250 ms cap: every draw within
        // its ceiling, and the largest of many draws close to it (so neither zero nor a
        // ceiling that stopped doubling passes).
        for (retry, ceiling) in [(1, 25), (3, 100), (10, 250)] {
            let draws: Vec<Duration> = (0..400).map(|_| budget.backoff(retry)).collect();
            let ceiling = Duration::from_millis(ceiling);
            assert!(draws.iter().all(|d| *d <= ceiling), "retry {retry}");
            let max = draws.iter().max().copied().unwrap_or_default();
            assert!(
                max >= ceiling * 9 / 10,
                "retry {retry}: largest draw {max:?}"
            );
            let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
            assert!(
                mean >= ceiling * 2 / 5 && mean <= ceiling * 3 / 5,
                "retry {retry}: mean {mean:?} is not that of a uniform draw"
            );
        }
    }
}
