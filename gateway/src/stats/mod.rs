//! What the dashboard draws: each shard's last minute (requests per second, TTFT p50/p99)
//! and the fleet's last 15 minutes, one point a second. Kept in memory, bounded, fed from
//! the access log's hook at the end of every request.
//!
//! # Layout
//! - [`window`]: a sliding minute of latencies and counts (hdrhistogram per 10 s slot).
//! - [`history`]: the fleet's per-second series (requests, refusals, goodput, TTFT p99).
//! - [`journal`]: reloads and drains, for the timeline.

pub mod history;
pub mod journal;
pub mod window;

use std::time::{Duration, Instant};

pub use history::History;
pub use journal::Journal;
pub use window::{LatencyWindow, WindowSummary};

/// A first token later than this does not count as goodput (the same bar the surge
/// benchmark uses).
pub const GOOD_TTFT: Duration = Duration::from_secs(1);

/// Now, in milliseconds since the Unix epoch (what every `*_unix_ms` field holds).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The process's clock anchor: a monotonic instant and the Unix time it was taken at.
fn anchor() -> &'static (Instant, u64) {
    static ANCHOR: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    ANCHOR.get_or_init(|| (Instant::now(), unix_ms()))
}

/// Seconds on a monotonic clock shared by every window and history of the process.
pub fn now_s() -> u64 {
    seconds_at(Instant::now())
}

/// [`now_s`] at instant `t` (a time the caller already read: no clock read here).
pub fn seconds_at(t: Instant) -> u64 {
    t.saturating_duration_since(anchor().0).as_secs()
}

/// Unix milliseconds at instant `t`, from the monotonic clock (no clock read here).
pub fn unix_ms_at(t: Instant) -> u64 {
    let (at, unix) = anchor();
    unix + t.saturating_duration_since(*at).as_millis() as u64
}

/// The largest TTFT recorded, microseconds (longer ones are clamped to it).
const MAX_TTFT_US: u64 = 120_000_000;

/// An empty TTFT histogram in microseconds, 1 µs to two minutes, two significant figures
/// (1 % resolution, a few KB).
fn ttft_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, MAX_TTFT_US, 2)
        .unwrap_or_else(|e| unreachable!("constant bounds are valid: {e}"))
}

/// `ttft` in microseconds, clamped to what the histograms hold.
fn ttft_us(ttft: Duration) -> u64 {
    (ttft.as_micros() as u64).clamp(1, MAX_TTFT_US)
}
