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

/// Seconds on a monotonic clock shared by every window and history of the process.
pub fn now_s() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs()
}
