//! The retry budget: retries in flight may be at most a share of requests in flight (with
//! a floor), so that when a dependency is failing, retries stop adding load instead of
//! multiplying it. Envoy's `retry_budget` and tower's `retry::budget` are the models; the
//! defaults (20 %, at least 3) are Envoy's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::policy::RetrySettings;

/// Requests and retries in flight, and the rule between them.
#[derive(Debug)]
pub struct RetryBudget {
    active: AtomicU64,
    retrying: AtomicU64,
    settings: RetrySettings,
}

impl RetryBudget {
    /// An empty budget.
    pub fn new(settings: RetrySettings) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicU64::new(0),
            retrying: AtomicU64::new(0),
            settings,
        })
    }

    /// Counts a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight {
            budget: Arc::clone(self),
            retrying: false,
        }
    }

    fn allowance(&self) -> u64 {
        let active = self.active.load(Ordering::Relaxed) as f64;
        ((active * self.settings.budget_ratio) as u64).max(self.settings.min_concurrent)
    }

    /// The backoff before retry number `retry` (1 for the first): full jitter over
    /// `base × 2^(retry-1)`, capped.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .settings
            .backoff_base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(self.settings.backoff_max);
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
    fn backoff_doubles_and_is_capped() {
        let budget = RetryBudget::new(RetrySettings::default());
        for _ in 0..100 {
            assert!(budget.backoff(1) <= Duration::from_millis(25));
            assert!(budget.backoff(3) <= Duration::from_millis(100));
            assert!(budget.backoff(10) <= Duration::from_millis(250));
        }
    }
}
