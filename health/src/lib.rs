//! `breakwater-health`: the health model of every shard behind a Breakwater gateway.
//!
//! It owns each shard's state — `healthy`, `degraded`, `ejected`, `draining` — with the
//! reason for it, decides transitions from what it is told (request outcomes from the data
//! path, active health checks), keeps the recent transitions, and publishes a whole
//! [`HealthView`] that routing reads lock-free. It never routes and never imports the
//! gateway.
//!
//! # Layout
//! - [`view`]: the published snapshot.
//! - [`tracker`]: one shard's state machine (pure; time is passed in).
//! - [`monitor`]: the single owner of every tracker: a task fed by a bounded channel.
//! - [`check`]: active HTTP health checks.
//! - [`engine`]: scraping each engine's own metrics (queue depth, KV use) and the
//!   silent-death detector.
//! - [`gpu`]: reading each shard's gpu-probe.
//! - [`probes`]: every shard's probe tasks, owned, restarted on a reconfigure.
//! - [`config`]: thresholds and timings, with their defaults.

pub mod check;
pub mod config;
pub mod engine;
pub mod gpu;
pub mod monitor;
pub mod probes;
pub mod tracker;
pub mod view;

pub use config::HealthConfig;
pub use engine::{EngineKind, EngineLoad};
pub use monitor::{HealthMonitor, Joining, ShardInfo, ShardReporter, Transition};
pub use probes::{ProbeTls, Probes, ShardProbes};
pub use tracker::Signal;
pub use view::{GpuSummary, HealthView, ShardHealth, ShardId, ShardState};
