//! Health thresholds and timings. The defaults follow Envoy's outlier detection and
//! health checking, with hysteresis where Envoy's and Pingora's defaults would flap.

use std::time::Duration;

/// Everything the health model is tuned by.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Consecutive failed requests (5xx, reset, cut) that eject a shard. Default 5.
    pub consecutive_failures: u32,
    /// Consecutive locally-originated failures (connect refused or timed out, no first
    /// byte in time) that eject a shard. Default 3: these mean "unreachable", not "a bad
    /// answer", and each costs a client a retry.
    pub consecutive_local_failures: u32,
    /// First ejection's length; the n-th lasts n times as long. Default 30 s.
    pub base_ejection: Duration,
    /// Cap on an ejection's length. Default 300 s.
    pub max_ejection: Duration,
    /// Random extra ejection time, up to this, so gateway replicas do not all re-admit a
    /// shard at once. Default 3 s.
    pub ejection_jitter: Duration,
    /// Most of a pool that passive detection may eject at once, percent; at least one
    /// shard is always ejectable. Default 50.
    pub max_ejection_percent: u32,
    /// Time between active checks of a shard (±10 % jitter); zero turns them off.
    /// Default 5 s.
    pub check_interval: Duration,
    /// Deadline of one active check. Default 1 s.
    pub check_timeout: Duration,
    /// Failed checks in a row that mark a shard unhealthy. Default 2.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that mark it healthy again. Default 2.
    pub healthy_threshold: u32,
    /// Time between readings of a shard's gpu-probe. Default 1 s.
    pub gpu_interval: Duration,
    /// Deadline of one gpu-probe reading. Default 500 ms.
    pub gpu_timeout: Duration,
    /// A probe reading older than this is "unknown". Default 5 s.
    pub gpu_stale: Duration,
    /// Healthy GPU readings in a row before a drained or degraded shard is restored.
    /// Default 3.
    pub gpu_healthy_readings: u32,
    /// Share of traffic a shard with a degraded GPU takes, 0..=1. Default 0.5.
    pub gpu_degraded_weight: f64,
    /// Time between scrapes of each engine's `/metrics`; zero turns them off. Default 1 s.
    pub metrics_interval: Duration,
    /// Deadline of one scrape. Default 500 ms.
    pub metrics_timeout: Duration,
    /// Work queued or running with no token generated for this long ejects a shard; zero
    /// turns the detector off. Default 10 s.
    pub silent_death: Duration,
    /// A shard returning from an ejection ramps from 10 % to its full share over this
    /// window; zero turns slow start off. Default 30 s.
    pub slow_start: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            consecutive_local_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            ejection_jitter: Duration::from_secs(3),
            max_ejection_percent: 50,
            check_interval: Duration::from_secs(5),
            check_timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
            gpu_interval: Duration::from_secs(1),
            gpu_timeout: Duration::from_millis(500),
            gpu_stale: Duration::from_secs(5),
            gpu_healthy_readings: 3,
            gpu_degraded_weight: 0.5,
            metrics_interval: Duration::from_secs(1),
            metrics_timeout: Duration::from_millis(500),
            silent_death: Duration::from_secs(10),
            slow_start: Duration::from_secs(30),
        }
    }
}

impl HealthConfig {
    /// Engine metrics older than this are unknown: three scrape intervals.
    pub fn metrics_stale_after(&self) -> Duration {
        self.metrics_interval * 3
    }

    /// Whether active checks run.
    pub fn checks_enabled(&self) -> bool {
        !self.check_interval.is_zero()
    }
}
