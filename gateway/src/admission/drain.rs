//! How fast the fleet gets through work: the tokens per second it releases (requests
//! finishing), which every predicted wait in the queue is divided by.
//!
//! Measured alone, the rate lags a surge by a whole request: when arrivals jump from a
//! tenth of capacity to capacity, the engines fill at once but nothing they started
//! finishes for a request's duration, and until then the rate still reads the quiet
//! phase — every waiter's predicted wait is ten times too long, and requests the fleet
//! could serve promptly are refused at the start of every surge. So the rate is also read
//! the other way, by Little's law: the tokens in flight ÷ the time a token spends in
//! flight (measured on the requests that finished, weighted by their tokens) is what the
//! fleet will release once they are done. That reading is current the moment the engines
//! fill; it counts work queued inside an engine as if it were running, so it is trusted
//! only up to the fleet's declared capacity. The rate is the larger of the two readings,
//! and never below a tenth of the declared capacity, so one quiet window cannot make every
//! prediction infinite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tokens per second through one counter, measured over windows of at least 100 ms and
/// smoothed (a window longer than a second, weighed less).
#[derive(Default)]
pub(super) struct TokenRate {
    total: AtomicU64,
    state: Mutex<RateState>,
}

#[derive(Default)]
struct RateState {
    at: Option<Instant>,
    seen: u64,
    rate: f64,
}

/// Shortest window a rate is measured over.
const RATE_WINDOW: Duration = Duration::from_millis(100);

impl TokenRate {
    /// A rate that starts at `initial` tokens/s.
    pub(super) fn starting_at(initial: f64) -> Self {
        Self {
            total: AtomicU64::new(0),
            state: Mutex::new(RateState {
                at: Some(Instant::now()),
                seen: 0,
                rate: initial,
            }),
        }
    }

    /// Counts `tokens` more.
    pub(super) fn add(&self, tokens: u64) {
        self.total.fetch_add(tokens, Ordering::Relaxed);
    }

    /// The rate now, per second.
    pub(super) fn rate(&self) -> f64 {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let total = self.total.load(Ordering::Relaxed);
        let Some(at) = s.at else {
            *s = RateState {
                at: Some(now),
                seen: total,
                rate: 0.0,
            };
            return 0.0;
        };
        let dt = now.saturating_duration_since(at);
        if dt >= RATE_WINDOW {
            let measured = (total - s.seen) as f64 / dt.as_secs_f64();
            // Windows longer than a second say little about now: weigh them less.
            let alpha = if dt > Duration::from_secs(1) {
                0.2
            } else {
                0.3
            };
            s.rate = s.rate * (1.0 - alpha) + measured * alpha;
            s.at = Some(now);
            s.seen = total;
        }
        s.rate
    }
}

/// The tokens per second the fleet releases (see the module's rule).
pub(super) struct DrainRate {
    /// Tokens released per second, starting at the declared capacity until measured.
    released: TokenRate,
    /// Tokens released per second, starting at 0: the denominator of `token_ms`.
    done: TokenRate,
    /// Tokens released × milliseconds they were in flight, per second: ÷ `done`, the time
    /// a token spends in flight.
    token_ms: TokenRate,
    /// Tokens charged to shards and not yet released.
    inflight: AtomicU64,
    /// The declared capacity, tokens/s (f64 bits).
    capacity: AtomicU64,
}

impl DrainRate {
    /// A rate for a fleet declaring `capacity_tps`, assumed until measured.
    pub(super) fn new(capacity_tps: f64) -> Self {
        Self {
            released: TokenRate::starting_at(capacity_tps.max(1.0)),
            done: TokenRate::starting_at(0.0),
            token_ms: TokenRate::starting_at(0.0),
            inflight: AtomicU64::new(0),
            capacity: AtomicU64::new(capacity_tps.to_bits()),
        }
    }

    /// The fleet's declared capacity changed (a reload).
    pub(super) fn set_capacity(&self, capacity_tps: f64) {
        self.capacity
            .store(capacity_tps.to_bits(), Ordering::Relaxed);
    }

    /// `tokens` were charged to a shard.
    pub(super) fn charged(&self, tokens: u64) {
        self.inflight.fetch_add(tokens, Ordering::Relaxed);
    }

    /// `tokens` charged `held` ago were released (the request ended).
    pub(super) fn released(&self, tokens: u64, held: Duration) {
        self.inflight.fetch_sub(tokens, Ordering::Relaxed);
        self.released.add(tokens);
        self.done.add(tokens);
        let ms = u64::try_from(held.as_millis()).unwrap_or(u64::MAX);
        self.token_ms.add(tokens.saturating_mul(ms));
    }

    /// The rate now, tokens/s.
    pub(super) fn rate(&self) -> f64 {
        let capacity = f64::from_bits(self.capacity.load(Ordering::Relaxed));
        let measured = self.released.rate();
        let done = self.done.rate();
        let in_flight_ms = self.token_ms.rate() / done.max(1e-9);
        let inflight = self.inflight.load(Ordering::Relaxed) as f64;
        let ahead = if done > 0.0 && in_flight_ms >= 1.0 {
            (inflight * 1e3 / in_flight_ms).min(capacity)
        } else {
            0.0
        };
        measured.max(ahead).max((capacity / 10.0).max(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `windows` rate windows, each releasing one request of `tokens` held `held`.
    fn quiet(d: &DrainRate, windows: usize, tokens: u64, held: Duration) {
        for _ in 0..windows {
            d.charged(tokens);
            d.released(tokens, held);
            std::thread::sleep(RATE_WINDOW + Duration::from_millis(5));
            d.rate();
        }
    }

    #[test]
    fn the_engines_filling_raise_the_rate_before_anything_finishes() {
        // Declared 10,000 tokens/s; a quiet phase releasing ~950 tokens/s, each held 1 s.
        let d = DrainRate::new(10_000.0);
        d.rate();
        quiet(&d, 8, 100, Duration::from_secs(1));
        let before = d.rate();
        // A surge fills the engines: 5,000 tokens in flight, nothing finished yet — the
        // fleet will release them within about a second.
        d.charged(5_000);
        let surge = d.rate();
        assert!(
            (4_500.0..5_500.0).contains(&surge) && surge > 2.0 * before,
            "{surge} tokens/s after the engines filled, {before} before"
        );
        // Work queued inside the engines reads as running: trusted only to the capacity.
        d.charged(50_000);
        assert_eq!(d.rate(), 10_000.0);
    }

    #[test]
    fn with_nothing_in_flight_the_rate_is_what_was_released_and_never_below_the_floor() {
        let d = DrainRate::new(1_000.0);
        assert_eq!(d.rate(), 1_000.0, "the declared capacity until measured");
        quiet(&d, 8, 0, Duration::ZERO);
        assert_eq!(d.rate(), 100.0, "a tenth of the declared capacity");
    }
}
