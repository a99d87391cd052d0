//! Each shard's admission limit: how many tokens may be in flight on it, learned from
//! what it can start promptly — nobody writes an engine's batch slots into the policy.
//!
//! The rule is Netflix's Gradient2, fed with time to first token (queueing dominates it;
//! raw request latency grows with output length and would mislead the limiter), less the
//! request's estimated prefill time:
//!
//! - a baseline follows the shard's low TTFT: it drops to a lower sample at once and
//!   creeps up by 1/600 of the gap (Gradient2's long window) on samples within twice the
//!   tolerance of it — samples far above are queueing, not a new normal;
//! - gradient = clamp(tolerance × baseline / sample, 0.5, 1);
//! - target = limit × gradient + headroom (two average requests' tokens, Gradient2's queue
//!   size; while the gradient is 1, at least a tenth of the limit, so a limit in use grows
//!   by a fiftieth per prompt sample), not grown while less than half the limit is in use;
//! - limit ← 0.8 × limit + 0.2 × target, within the policy's floor and ceiling.
//!
//! A TTFT that jumps once the engine starts queueing (its batch slots are full) pulls the
//! limit down to what runs at once; while samples stay near the baseline and the limit is
//! in use it grows. A 429 from the shard cuts the limit by a fifth at once.
//!
//! With `[cluster]`, the limit is the shard's, not this replica's: the replicas divide it
//! by their demand as they divide the slots ([`ShardLimit::set_share`]); this replica fills
//! its share, and learns as if the shard's whole load were its in-flight tokens ÷ share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Weight of a new sample in the limit (Gradient2's smoothing).
const SMOOTHING: f64 = 0.2;
/// How fast the baseline follows higher samples (Gradient2's long window, 600 samples).
const BASELINE_RISE: f64 = 1.0 / 600.0;
/// The least headroom over the limit while first tokens come promptly, as a share of it.
const GROWTH: f64 = 0.1;
/// The least share of a limit a replica is set to (one with no demand still takes a
/// request when the shard is idle: [`ShardLimit::fits`]).
const MIN_SHARE: f64 = 0.01;

/// One shard's limit, in tokens in flight.
#[derive(Debug)]
pub struct ShardLimit {
    /// The limit now, tokens (read on every admission without a lock).
    tokens: AtomicU64,
    /// This replica's share of the limit among the gateway replicas, as `f64` bits (1.0:
    /// alone, or no `[cluster]`).
    share: AtomicU64,
    state: Mutex<Gradient>,
}

#[derive(Debug)]
struct Gradient {
    limit: f64,
    /// The shard's low TTFT, seconds; 0 until the first sample.
    baseline: f64,
    /// The capacity the bounds were computed for, tokens/s.
    capacity_tps: f64,
    floor: f64,
    ceiling: f64,
    tolerance: f64,
}

impl ShardLimit {
    /// A limit for a shard of `capacity_tps`, starting at `initial` of its capacity and
    /// kept between `min` and `max` of it; `tolerance` is the TTFT ratio over baseline at
    /// which the limit starts to fall.
    pub fn new(
        capacity_tps: f64,
        initial: Duration,
        min: Duration,
        max: Duration,
        tolerance: f64,
    ) -> Self {
        let tokens = |d: Duration| (capacity_tps * d.as_secs_f64()).max(1.0);
        let limit = tokens(initial);
        Self {
            tokens: AtomicU64::new(limit as u64),
            share: AtomicU64::new(1f64.to_bits()),
            state: Mutex::new(Gradient {
                limit,
                baseline: 0.0,
                capacity_tps,
                floor: tokens(min),
                ceiling: tokens(max),
                tolerance,
            }),
        }
    }

    /// New bounds from a reloaded policy, keeping what was learned: the limit scales with
    /// a changed capacity (it is tokens of work, capacity × time) and is clamped to the new
    /// floor and ceiling; the TTFT baseline stays.
    pub fn reconfigure(&self, capacity_tps: f64, min: Duration, max: Duration, tolerance: f64) {
        let tokens = |d: Duration| (capacity_tps * d.as_secs_f64()).max(1.0);
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let scale = capacity_tps / g.capacity_tps.max(1e-9);
        g.capacity_tps = capacity_tps;
        g.floor = tokens(min);
        g.ceiling = tokens(max);
        g.tolerance = tolerance;
        g.limit = (g.limit * scale).clamp(g.floor, g.ceiling);
        self.tokens.store(g.limit as u64, Ordering::Relaxed);
    }

    /// The limit now, tokens (the shard's, of which this replica fills [`Self::share`]).
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// This replica's share of the limit (1.0 unless gateway replicas divide it).
    pub fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    /// Sets this replica's share of the limit among the gateway replicas (`None`: all of
    /// it), kept within (0, 1].
    pub fn set_share(&self, share: Option<f64>) {
        let share = share
            .filter(|s| s.is_finite())
            .map_or(1.0, |s| s.clamp(MIN_SHARE, 1.0));
        self.share.store(share.to_bits(), Ordering::Relaxed);
    }

    /// Whether a request of `cost` tokens fits beside `inflight` on a shard health
    /// weighs at `weight` (1.0 healthy; less when degraded or in slow start: the limit
    /// shrinks with it, so a half-weight shard takes half the work even when every shard
    /// is full). An idle shard takes any request, however large: a request above the
    /// limit must still run somewhere.
    pub fn fits(&self, inflight: u64, cost: u64, weight: f64) -> bool {
        inflight == 0 || (inflight + cost) as f64 <= self.effective_tokens(weight)
    }

    /// The tokens this replica may keep in flight on the shard: the limit, times its share
    /// among the replicas, times the shard's health `weight` (clamped to 0–1).
    pub fn effective_tokens(&self, weight: f64) -> f64 {
        self.tokens() as f64 * self.share() * weight.clamp(0.0, 1.0)
    }

    /// Learns from one request's time to first token (`queueing`: TTFT less its
    /// estimated prefill), seen with `inflight` tokens on the shard from this replica,
    /// requests averaging `avg_request_tokens`.
    pub fn observe(&self, queueing: Duration, inflight: u64, avg_request_tokens: f64) {
        // The shard's whole load, as far as this replica can tell: what it sends ÷ its share.
        let inflight = inflight as f64 / self.share();
        let sample = queueing.as_secs_f64().max(1e-4);
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if g.baseline == 0.0 || sample < g.baseline {
            g.baseline = sample;
        } else if sample < 2.0 * g.tolerance * g.baseline {
            // A slow drift (longer prompts, a busier engine) is learned; samples far above
            // are queueing, and learning them would make queueing the new normal.
            g.baseline += (sample - g.baseline) * BASELINE_RISE;
        }
        let gradient = (g.tolerance * g.baseline / sample).clamp(0.5, 1.0);
        if gradient >= 1.0 && inflight < g.limit / 2.0 {
            return; // no evidence the shard could take more: it is not being used
        }
        // Two average requests (Gradient2's queue size); while first tokens come promptly
        // and the limit is in use, also a tenth of the limit, so it grows by a fiftieth per
        // sample: a shard whose requests decode for long needs many in flight, and adding
        // two requests a sample would take seconds of a surge to get there.
        let mut headroom = 2.0 * avg_request_tokens.max(1.0);
        if gradient >= 1.0 {
            headroom = headroom.max(g.limit * GROWTH);
        }
        let target = g.limit * gradient + headroom;
        g.limit = (g.limit * (1.0 - SMOOTHING) + target * SMOOTHING).clamp(g.floor, g.ceiling);
        self.tokens.store(g.limit as u64, Ordering::Relaxed);
    }

    /// The shard answered 429: it is over-admitted; cut the limit by a fifth.
    pub fn overloaded(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.limit = (g.limit * 0.8).max(g.floor);
        self.tokens.store(g.limit as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> ShardLimit {
        // 1,000 tokens/s: starts at 1,000 tokens, between 100 and 20,000.
        ShardLimit::new(
            1000.0,
            Duration::from_secs(1),
            Duration::from_millis(100),
            Duration::from_secs(20),
            1.5,
        )
    }

    #[test]
    fn a_reload_rescales_the_limit_with_the_capacity_and_keeps_the_new_bounds() {
        let l = limit();
        assert_eq!(l.tokens(), 1000);
        // Capacity tripled: the same time's worth of work is three times the tokens.
        l.reconfigure(
            3000.0,
            Duration::from_millis(100),
            Duration::from_secs(20),
            1.5,
        );
        assert_eq!(l.tokens(), 3000);
        // A ceiling lowered below it clamps it; one raised later does not lift it by itself.
        l.reconfigure(
            3000.0,
            Duration::from_millis(100),
            Duration::from_millis(500),
            1.5,
        );
        assert_eq!(l.tokens(), 1500);
        l.reconfigure(
            3000.0,
            Duration::from_millis(100),
            Duration::from_secs(20),
            1.5,
        );
        assert_eq!(l.tokens(), 1500);
        // A cut is floored by the new floor.
        l.reconfigure(3000.0, Duration::from_secs(1), Duration::from_secs(20), 1.5);
        assert_eq!(l.tokens(), 3000);
        l.overloaded();
        assert_eq!(l.tokens(), 3000);
    }

    #[test]
    fn a_shard_that_starts_everything_promptly_and_is_used_grows_its_limit() {
        let l = limit();
        for _ in 0..50 {
            l.observe(Duration::from_millis(50), l.tokens(), 100.0);
        }
        assert!(l.tokens() > 1500, "{}", l.tokens());
    }

    #[test]
    fn an_idle_shard_does_not_grow_its_limit() {
        let l = limit();
        for _ in 0..50 {
            l.observe(Duration::from_millis(50), 10, 100.0);
        }
        assert_eq!(l.tokens(), 1000);
    }

    #[test]
    fn queueing_behind_full_slots_pulls_the_limit_down_to_its_floor_at_most() {
        let l = limit();
        l.observe(Duration::from_millis(50), 900, 100.0);
        let before = l.tokens();
        for _ in 0..10 {
            l.observe(Duration::from_millis(400), l.tokens(), 100.0);
        }
        assert!(l.tokens() < before * 2 / 3, "{} vs {before}", l.tokens());
        for _ in 0..1000 {
            l.observe(Duration::from_secs(5), l.tokens(), 10.0);
        }
        assert_eq!(l.tokens(), 100);
        // Within the tolerance (1.5 × baseline) is not queueing.
        let l = limit();
        l.observe(Duration::from_millis(50), 900, 100.0);
        l.observe(Duration::from_millis(70), 900, 100.0);
        assert!(l.tokens() >= 1000);
    }

    #[test]
    fn a_429_cuts_a_fifth_and_an_idle_shard_takes_any_request() {
        let l = limit();
        l.overloaded();
        assert_eq!(l.tokens(), 800);
        assert!(l.fits(0, 50_000, 1.0));
        assert!(l.fits(700, 100, 1.0));
        assert!(!l.fits(700, 101, 1.0));
    }

    #[test]
    fn a_replica_fills_its_share_and_learns_from_the_shard_s_whole_load() {
        let l = limit();
        l.set_share(Some(0.25));
        assert!(l.fits(200, 50, 1.0));
        assert!(!l.fits(200, 51, 1.0), "a quarter of 1,000 tokens");
        // 300 tokens from this replica at a quarter is 1,200 on the shard: in use, so
        // prompt first tokens grow the limit (with the share ignored, 300 < 500 would not).
        l.observe(Duration::from_millis(50), 300, 100.0);
        assert!(l.tokens() > 1000, "{}", l.tokens());
        // No share, or nonsense, is the whole limit; a share is never zero.
        l.set_share(None);
        assert_eq!(l.share(), 1.0);
        l.set_share(Some(f64::NAN));
        assert_eq!(l.share(), 1.0);
        l.set_share(Some(0.0));
        assert!(l.share() > 0.0);
    }

    #[test]
    fn a_shard_weighed_at_half_fits_half_its_limit() {
        let l = limit();
        assert!(l.fits(400, 100, 0.5));
        assert!(!l.fits(400, 101, 0.5));
        assert!(
            l.fits(0, 50_000, 0.5),
            "an idle shard still takes any request"
        );
    }
}
