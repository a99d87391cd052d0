//! How long the queue may be when the policy leaves `queue_target_ms` unset: long enough
//! to keep the engines' slots busy while requests arrive at random at about capacity,
//! short enough that an admitted request's first token still comes promptly.
//!
//! - **Slots busy**: with N requests in flight, a buffer of about √N waiters keeps N
//!   servers busy under random arrivals (square-root staffing): the buffer is √N
//!   requests at the rate requests finish. A fleet of 64 slots finishing 134 requests/s
//!   may queue 60 ms; one of 16 slots finishing 18/s, 220 ms.
//! - **Prompt first tokens**: a request's wait in the queue adds to its time to first
//!   token, so the wait is capped at what keeps it and the fleet's current TTFT within
//!   [`TTFT_BUDGET`] × the fleet's unloaded TTFT — an engine whose first tokens slow as its
//!   batch grows leaves the queue less. The TTFT is read in two parts, as the shards'
//!   limits read it: the estimated prefill (its mean) and the rest, the engine's own
//!   queueing and first step, whose unloaded value is a low percentile of the samples (so
//!   long prompts do not read as load, and a surge does not read as the new normal). A
//!   prefill estimate too long (`capacity_tps` declared low) lets the queue a little more;
//!   too short, a little less.
//! - **Near capacity, more**: both hold under sustained overload, where the queue stands
//!   at its target whatever its length and every admitted request waits about that long.
//!   Arrivals at about what the fleet finishes make the queue come and go instead, and a
//!   buffer of √N leaves slots idle after each time it empties while it refused requests
//!   it could have served. So the buffer is widened while requests arrive (placed or
//!   refused) at up to [`NEAR_CAPACITY`] × the rate they finish — to [`NEAR_WIDEN`] × √N
//!   waiters within [`NEAR_TTFT_BUDGET`] × the unloaded TTFT — and narrows back in step
//!   with the excess until [`OVERLOADED`] ×, where it is as above.
//!
//! Until the first streamed answer has been timed the queue target is the policy's default.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::drain::TokenRate;

/// An admitted request's time to first token (queue wait and the engine's own) is kept
/// within this multiple of the fleet's unloaded TTFT.
pub const TTFT_BUDGET: f64 = 1.8;
/// How fast the unloaded TTFT follows a lower sample (and, [`BASE_RISE`], a higher one):
/// the baseline settles at a low percentile of the samples that are not queueing, and a
/// surge that keeps first tokens at 1.3x for a minute moves it by a few percent only.
const BASE_FALL: f64 = 1.0 / 20.0;
/// See [`BASE_FALL`].
const BASE_RISE: f64 = 1.0 / 5_000.0;
/// Samples above this multiple of the baseline are queueing, not a new normal.
const QUEUEING: f64 = 2.0;
/// Arrivals up to this multiple of the finish rate are near capacity: the widest buffer.
pub const NEAR_CAPACITY: f64 = 1.2;
/// Arrivals from this multiple of the finish rate on are sustained overload: the buffer
/// of √N within [`TTFT_BUDGET`].
pub const OVERLOADED: f64 = 1.5;
/// How many times √N waiters the buffer may hold near capacity.
pub const NEAR_WIDEN: f64 = 2.0;
/// The TTFT budget near capacity, a multiple of the unloaded TTFT.
pub const NEAR_TTFT_BUDGET: f64 = 2.5;
/// Weight of a new sample in the fleet's current TTFT.
const RECENT: f64 = 0.05;
/// Below this many requests finishing a second the rate says too little to size a buffer.
const MIN_FINISH_RATE: f64 = 1.0;

/// The fleet-wide readings the queue is sized from. Lock-free on the request path: the
/// TTFT readings are plain loads and stores (a sample lost to a race changes nothing).
pub struct QueueBudget {
    inflight: AtomicU64,
    finished: TokenRate,
    /// Requests placed or refused for want of room: what arrives.
    arrived: TokenRate,
    /// The fleet's unloaded time to first token less prefill, seconds (f64 bits; 0: no
    /// sample yet).
    base_ttft: AtomicU64,
    /// The fleet's current time to first token less prefill, seconds (f64 bits).
    recent_ttft: AtomicU64,
    /// The mean estimated prefill, seconds (f64 bits).
    prefill: AtomicU64,
}

impl Default for QueueBudget {
    fn default() -> Self {
        Self {
            inflight: AtomicU64::new(0),
            finished: TokenRate::starting_at(0.0),
            arrived: TokenRate::starting_at(0.0),
            base_ttft: AtomicU64::new(0),
            recent_ttft: AtomicU64::new(0),
            prefill: AtomicU64::new(0),
        }
    }
}

impl QueueBudget {
    /// A request was placed on a shard.
    pub fn started(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.arrived.add(1);
    }

    /// A request was refused for want of room (it arrived, and nothing started).
    pub fn refused(&self) {
        self.arrived.add(1);
    }

    /// A placed request ended (its slot was released).
    pub fn finished(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.finished.add(1);
    }

    /// Learns from one answer's time to first token as the engine gave it (from the
    /// request sent upstream to its first token, the gateway's queue not included) and
    /// its estimated prefill.
    pub fn observe_ttft(&self, ttft: Duration, prefill: Duration) {
        let sample = ttft.saturating_sub(prefill).as_secs_f64().max(1e-4);
        let load = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        let store = |a: &AtomicU64, v: f64| a.store(v.to_bits(), Ordering::Relaxed);
        let prefill = prefill.as_secs_f64();
        let base = load(&self.base_ttft);
        if base == 0.0 {
            store(&self.base_ttft, sample);
            store(&self.recent_ttft, sample);
            store(&self.prefill, prefill);
            return;
        }
        let mean = load(&self.prefill);
        store(&self.prefill, mean + (prefill - mean) * RECENT);
        if sample < base {
            store(&self.base_ttft, base - (base - sample) * BASE_FALL);
        } else if sample < QUEUEING * base {
            store(&self.base_ttft, base + (sample - base) * BASE_RISE);
        }
        let recent = load(&self.recent_ttft);
        store(&self.recent_ttft, recent + (sample - recent) * RECENT);
    }

    /// The fleet's unloaded TTFT (with the mean prefill), once an answer has been timed.
    pub fn base_ttft(&self) -> Option<Duration> {
        let base = f64::from_bits(self.base_ttft.load(Ordering::Relaxed));
        let prefill = f64::from_bits(self.prefill.load(Ordering::Relaxed));
        (base > 0.0).then(|| Duration::from_secs_f64(base + prefill))
    }

    /// Requests arriving (placed or refused for want of room) per request finishing, once
    /// requests finish: about 1 near capacity, over [`OVERLOADED`] in sustained overload.
    pub fn arrivals_per_finish(&self) -> Option<f64> {
        let finish_rate = self.finished.rate();
        (finish_rate >= MIN_FINISH_RATE).then(|| self.arrived.rate() / finish_rate)
    }

    /// Whether requests arrive at [`OVERLOADED`] times the rate they finish or more:
    /// sustained overload, not a fleet near capacity.
    pub fn overloaded(&self) -> bool {
        self.arrivals_per_finish().is_some_and(|r| r >= OVERLOADED)
    }

    /// The longest the queue may be now (see the module's rule), or `None` while nothing
    /// has been measured to size it from.
    pub fn target(&self) -> Option<Duration> {
        let base = f64::from_bits(self.base_ttft.load(Ordering::Relaxed));
        let finish_rate = self.finished.rate();
        if base == 0.0 || finish_rate < MIN_FINISH_RATE {
            return None;
        }
        let inflight = self.inflight.load(Ordering::Relaxed).max(1) as f64;
        // 1 near capacity, 0 in sustained overload.
        let overload = self.arrived.rate() / finish_rate;
        let near = ((OVERLOADED - overload) / (OVERLOADED - NEAR_CAPACITY)).clamp(0.0, 1.0);
        let busy = inflight.sqrt() * (1.0 + (NEAR_WIDEN - 1.0) * near) / finish_rate;
        let budget = TTFT_BUDGET + (NEAR_TTFT_BUDGET - TTFT_BUDGET) * near;
        let recent = f64::from_bits(self.recent_ttft.load(Ordering::Relaxed));
        let prefill = f64::from_bits(self.prefill.load(Ordering::Relaxed));
        let prompt = (budget * (base + prefill) - (recent + prefill)).max(0.0);
        Some(Duration::from_secs_f64(busy.min(prompt)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn the_baseline_settles_low_and_ignores_queueing() {
        let b = QueueBudget::default();
        for i in 0..2_000 {
            // 70–90 ms, now and then a queued 900 ms
            let v = if i % 10 == 0 { 900 } else { 70 + (i * 7) % 21 };
            b.observe_ttft(ms(v), Duration::ZERO);
        }
        let base = b.base_ttft().unwrap().as_secs_f64() * 1e3;
        assert!((69.0..76.0).contains(&base), "{base} ms");
    }

    #[test]
    fn nothing_measured_leaves_the_policy_default() {
        let b = QueueBudget::default();
        assert_eq!(b.target(), None);
        b.observe_ttft(ms(50), Duration::ZERO);
        // no request has finished: no rate to size the buffer from
        assert_eq!(b.target(), None);
    }

    /// 64 in flight, then 100 requests started and finished and `refused` more refused,
    /// over ≥ 110 ms.
    fn fleet_of_64(refused: usize) -> QueueBudget {
        let b = QueueBudget::default();
        b.observe_ttft(ms(500), Duration::ZERO);
        // in flight since before the rates' windows: not arrivals in them
        b.inflight.store(64, Ordering::Relaxed);
        b.finished.rate();
        b.arrived.rate();
        for _ in 0..100 {
            b.started();
            b.finished();
        }
        for _ in 0..refused {
            b.refused();
        }
        std::thread::sleep(ms(110));
        b
    }

    #[test]
    fn the_buffer_is_root_n_requests_at_the_finish_rate() {
        // Twice as many arrive as finish: sustained overload.
        let b = fleet_of_64(100);
        let rate = b.finished.rate();
        let want = 8.0 / rate;
        let got = b.target().unwrap().as_secs_f64();
        assert!(
            (got - want).abs() < want * 0.05,
            "{got} against √64 / {rate}"
        );
    }

    #[test]
    fn near_capacity_the_buffer_is_wider() {
        // As many arrive as finish: the queue comes and goes, and holds twice √N.
        let b = fleet_of_64(0);
        let rate = b.finished.rate();
        let want = 2.0 * 8.0 / rate;
        let got = b.target().unwrap().as_secs_f64();
        assert!(
            (got - want).abs() < want * 0.05,
            "{got} against 2 × √64 / {rate}"
        );
        // Past the overloaded mark it narrows back to √N.
        for _ in 0..300 {
            b.refused();
        }
        std::thread::sleep(ms(110));
        let got = b.target().unwrap().as_secs_f64();
        let rate = b.finished.rate();
        assert!(got < 1.6 * 8.0 / rate, "{got} against √64 / {rate}");
    }

    #[test]
    fn an_engine_whose_first_tokens_slow_leaves_the_queue_less() {
        let b = QueueBudget::default();
        b.observe_ttft(ms(30), Duration::ZERO);
        for _ in 0..64 {
            b.started();
        }
        for _ in 0..20 {
            b.finished();
            b.started();
        }
        std::thread::sleep(ms(110));
        b.finished.rate();
        // TTFT now 50 ms against 30 unloaded: 1.8 × 30 − 50 = 4 ms of queue (the
        // baseline itself creeps up by under a millisecond meanwhile)
        for _ in 0..200 {
            b.observe_ttft(ms(50), Duration::ZERO);
        }
        let got = b.target().unwrap().as_secs_f64() * 1e3;
        assert!((3.0..6.0).contains(&got), "{got} ms");
        // and first tokens at 1.8x or more: no queue
        for _ in 0..200 {
            b.observe_ttft(ms(60), Duration::ZERO);
        }
        assert_eq!(b.target(), Some(Duration::ZERO));
    }

    #[test]
    fn long_prompts_are_not_load_and_their_prefill_counts_in_the_budget() {
        let b = QueueBudget::default();
        for _ in 0..64 {
            b.started();
        }
        for _ in 0..20 {
            b.finished();
            b.started();
        }
        std::thread::sleep(ms(110));
        b.finished.rate();
        // 20 ms of engine time and 20–180 ms of prefill, unloaded
        for i in 0..400u64 {
            let prefill = 20 + (i * 37) % 161;
            b.observe_ttft(ms(20 + prefill), ms(prefill));
        }
        let base = b.base_ttft().unwrap().as_secs_f64() * 1e3;
        assert!(
            (100.0..140.0).contains(&base),
            "{base} ms: 20 + the mean prefill"
        );
        // unloaded: 0.8 × the whole TTFT may be queued (capped by the slots' buffer,
        // which is long here: 84 finished over 110 ms)
        let got = b.target().unwrap().as_secs_f64() * 1e3;
        assert!(
            (0.8 * base - 2.0..0.8 * base + 2.0).contains(&got),
            "{got} ms"
        );
    }
}
