//! Per-shard load accounting: the tokens and requests in flight on each shard.
//!
//! A request is charged at dispatch with its estimated token cost and released exactly once
//! when its [`LoadCharge`] is dropped — on completion, error, timeout or client abort alike —
//! so the ledger cannot drift however the request ends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// One shard's live load, and whether an operator drained it. Shared between routing
/// (reads), requests (charge/release) and the admin API (reads, drains). The drain flag
/// lives here, beside what every pick reads, so examining a shard costs one cache line, not
/// two — it matters once a fleet's shards no longer fit in the cache.
#[derive(Debug, Default)]
pub struct ShardLoad {
    inflight_tokens: AtomicU64,
    inflight_requests: AtomicU64,
    dispatched_tokens_total: AtomicU64,
    dispatched_requests_total: AtomicU64,
    drained: AtomicBool,
}

impl ShardLoad {
    /// Whether an operator has drained the shard.
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Drains (`true`) or undrains the shard; returns whether it was drained before.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::Relaxed)
    }

    /// Charges `tokens` to this shard; the returned guard releases them when dropped.
    pub fn charge(self: &Arc<Self>, tokens: u64) -> LoadCharge {
        self.inflight_tokens.fetch_add(tokens, Ordering::Relaxed);
        self.inflight_requests.fetch_add(1, Ordering::Relaxed);
        self.dispatched_tokens_total
            .fetch_add(tokens, Ordering::Relaxed);
        self.dispatched_requests_total
            .fetch_add(1, Ordering::Relaxed);
        LoadCharge {
            load: Arc::clone(self),
            tokens,
        }
    }

    /// Estimated tokens of the requests in flight.
    pub fn inflight_tokens(&self) -> u64 {
        self.inflight_tokens.load(Ordering::Relaxed)
    }

    /// Requests in flight.
    pub fn inflight_requests(&self) -> u64 {
        self.inflight_requests.load(Ordering::Relaxed)
    }

    /// Estimated tokens ever dispatched here.
    pub fn dispatched_tokens_total(&self) -> u64 {
        self.dispatched_tokens_total.load(Ordering::Relaxed)
    }

    /// Requests ever dispatched here.
    pub fn dispatched_requests_total(&self) -> u64 {
        self.dispatched_requests_total.load(Ordering::Relaxed)
    }
}

/// A request's charge on one shard, released when dropped.
#[derive(Debug)]
pub struct LoadCharge {
    load: Arc<ShardLoad>,
    tokens: u64,
}

impl LoadCharge {
    /// The tokens charged.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl Drop for LoadCharge {
    fn drop(&mut self) {
        self.load
            .inflight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        self.load.inflight_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_released_exactly_once() {
        let load = Arc::new(ShardLoad::default());
        let a = load.charge(100);
        let b = load.charge(30);
        assert_eq!(load.inflight_tokens(), 130);
        assert_eq!(load.inflight_requests(), 2);
        drop(a);
        assert_eq!(load.inflight_tokens(), 30);
        drop(b);
        assert_eq!(load.inflight_tokens(), 0);
        assert_eq!(load.inflight_requests(), 0);
        assert_eq!(load.dispatched_tokens_total(), 130);
    }
}
