//! One shard's health state machine. Pure: it is told what happened and what time it is,
//! and answers with the transition, if any. The [`crate::monitor`] owns one per shard.
//!
//! Two independent sources decide whether a shard takes traffic:
//! - **passive** (outlier detection, Envoy's `consecutive_5xx` /
//!   `consecutive_local_origin_failure`): N failed requests in a row eject the shard for
//!   `base × ejections` (capped, plus jitter); it returns after that time *and* a passing
//!   active check (or at once when checks are off);
//! - **active** checks with hysteresis: `unhealthy_threshold` failures in a row mark it
//!   unhealthy, `healthy_threshold` passes mark it healthy again; an engine that says it is
//!   dead (503 from vLLM's `/health`) is unhealthy at once.

use std::time::{Duration, Instant};

use gpu_probe::Verdict;

use crate::config::HealthConfig;
use crate::engine::EngineLoad;
use crate::view::{GpuSummary, ShardState};

/// Something the tracker is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// A request completed normally.
    Success,
    /// A request failed because of the shard. `local`: the failure originated here
    /// (connect refused or timed out, no first byte in time) rather than in an answer.
    Failure {
        /// Locally originated.
        local: bool,
        /// What happened, for the reason.
        detail: String,
    },
    /// An active check passed.
    CheckPassed,
    /// An active check failed.
    CheckFailed {
        /// What happened.
        detail: String,
    },
    /// An active check got an answer that means "dead" (HTTP 503 from the engine).
    CheckFailedHard {
        /// What happened.
        detail: String,
    },
    /// The shard's gpu-probe was read; `summary.verdict` is `None` when it could not be
    /// read or was stale.
    Gpu(GpuSummary),
    /// The engine's metrics were scraped.
    Engine(EngineLoad),
    /// The engine has work but has generated nothing for too long (silent death).
    Stalled {
        /// What was seen.
        detail: String,
    },
}

/// Whether the tracker may eject now (the pool's ejection cap is the monitor's to judge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectPermit {
    /// Ejecting keeps the pool within its cap.
    Allowed,
    /// Too much of the pool is ejected already.
    Denied,
}

/// One shard's state machine.
#[derive(Debug, Clone)]
pub struct Tracker {
    consecutive_failures: u32,
    consecutive_local_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    ejection_reason: String,
    returned_at: Option<Instant>,
    check_healthy: bool,
    check_failures: u32,
    check_passes: u32,
    check_reason: String,
    /// Joined and not checked yet: the first passing check admits it (in slow start).
    awaiting_first_check: bool,
    gpu_verdict: Verdict,
    gpu_healthy_streak: u32,
    gpu_reason: String,
    gpu: Option<GpuSummary>,
    engine: Option<EngineLoad>,
    state: ShardState,
    reason: String,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// A healthy shard with a clean record. Shards start admitted: a gateway that has just
    /// started must not refuse traffic until its first checks come back.
    pub fn new() -> Self {
        Self {
            consecutive_failures: 0,
            consecutive_local_failures: 0,
            ejections: 0,
            ejected_until: None,
            ejection_reason: String::new(),
            returned_at: None,
            check_healthy: true,
            check_failures: 0,
            check_passes: 0,
            check_reason: String::new(),
            awaiting_first_check: false,
            gpu_verdict: Verdict::Healthy,
            gpu_healthy_streak: 0,
            gpu_reason: String::new(),
            gpu: None,
            engine: None,
            state: ShardState::Healthy,
            reason: String::new(),
        }
    }

    /// A healthy shard that has just joined (added by a policy reload): in slow start
    /// from `now`, like a shard back from an ejection.
    pub fn returning(now: Instant) -> Self {
        Self {
            returned_at: Some(now),
            ..Self::new()
        }
    }

    /// A shard that has just joined (added by a reload or discovery, with active checks
    /// on): it takes nothing until its first check passes, then ramps up in slow start. A
    /// failing first check keeps it out as any failing check does.
    pub fn joining() -> Self {
        let reason = "joined: waiting for its first passing check".to_string();
        Self {
            check_healthy: false,
            check_reason: reason.clone(),
            awaiting_first_check: true,
            state: ShardState::Ejected,
            reason,
            ..Self::new()
        }
    }

    /// Slow start: the share of its full weight a shard that just returned takes, rising
    /// linearly from 10 % to 100 % over `cfg.slow_start` (Envoy's slow start with
    /// aggression 1 and a 10 % floor), so a recovering engine is not flooded with a cold
    /// cache.
    pub fn slow_start_factor(&self, now: Instant, cfg: &HealthConfig) -> f64 {
        match self.returned_at {
            Some(t) if !cfg.slow_start.is_zero() && self.state == ShardState::Healthy => {
                let elapsed = now.saturating_duration_since(t).as_secs_f64();
                (elapsed / cfg.slow_start.as_secs_f64()).clamp(0.1, 1.0)
            }
            _ => 1.0,
        }
    }

    /// The last engine reading, if its metrics are scraped.
    pub fn engine(&self) -> Option<&EngineLoad> {
        self.engine.as_ref()
    }

    /// The last GPU reading, if the shard has a probe.
    pub fn gpu(&self) -> Option<&GpuSummary> {
        self.gpu.as_ref()
    }

    /// The current state.
    pub fn state(&self) -> ShardState {
        self.state
    }

    /// Why it is in that state.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Ejections so far (reset after a healthy stretch as long as the maximum ejection).
    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// Whether passive detection has the shard ejected now.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Applies a signal. `permit` says whether an ejection may happen now; `jitter` is
    /// the random extra ejection time (zero in tests). Returns the old state when the
    /// state or its reason changed.
    pub fn on(
        &mut self,
        signal: Signal,
        now: Instant,
        cfg: &HealthConfig,
        permit: EjectPermit,
        jitter: Duration,
    ) -> Option<(ShardState, String)> {
        match signal {
            Signal::Success => {
                self.consecutive_failures = 0;
                self.consecutive_local_failures = 0;
            }
            Signal::Failure { local, detail } => {
                self.consecutive_failures += 1;
                if local {
                    self.consecutive_local_failures += 1;
                }
                let tripped = self.consecutive_failures >= cfg.consecutive_failures
                    || self.consecutive_local_failures >= cfg.consecutive_local_failures;
                if tripped && !self.is_ejected() && permit == EjectPermit::Allowed {
                    self.eject(now, cfg, jitter, detail);
                }
            }
            Signal::CheckPassed => {
                self.check_failures = 0;
                self.check_passes += 1;
                if std::mem::take(&mut self.awaiting_first_check) {
                    self.check_healthy = true;
                    self.returned_at = Some(now);
                }
                if !self.check_healthy && self.check_passes >= cfg.healthy_threshold {
                    self.check_healthy = true;
                    self.returned_at = Some(now);
                }
                if self.ejected_until.is_some_and(|until| now >= until) {
                    self.ejected_until = None;
                    self.returned_at = Some(now);
                }
            }
            Signal::CheckFailed { detail } => {
                self.check_passes = 0;
                self.check_failures += 1;
                if self.check_failures >= cfg.unhealthy_threshold {
                    self.check_healthy = false;
                    self.check_reason = format!("health check failing: {detail}");
                }
            }
            Signal::CheckFailedHard { detail } => {
                self.check_passes = 0;
                self.check_failures += 1;
                self.check_healthy = false;
                self.check_reason = format!("engine reports itself dead: {detail}");
            }
            Signal::Gpu(summary) => self.on_gpu(summary, cfg),
            Signal::Engine(load) => self.engine = Some(load),
            Signal::Stalled { detail } => {
                if !self.is_ejected() && permit == EjectPermit::Allowed {
                    self.consecutive_failures = 0;
                    self.eject(now, cfg, jitter, format!("silent death: {detail}"));
                }
            }
        }
        self.settle()
    }

    /// Time passing: with active checks off, an ejection ends when its time is up.
    pub fn tick(&mut self, now: Instant, cfg: &HealthConfig) -> Option<(ShardState, String)> {
        if !cfg.checks_enabled() && self.ejected_until.is_some_and(|until| now >= until) {
            self.ejected_until = None;
            self.returned_at = Some(now);
        }
        self.settle()
    }

    /// A GPU verdict moves the shard only one way on its own: `failing` drains it at once,
    /// `degraded` cuts its weight; it is restored only after `gpu_healthy_readings` healthy
    /// readings in a row while its health check passes. "Unknown" (probe unreachable or
    /// stale) changes nothing: a monitoring outage must not become a serving outage.
    fn on_gpu(&mut self, summary: GpuSummary, cfg: &HealthConfig) {
        let verdict = summary.verdict;
        let reasons = summary.reasons.join("; ");
        self.gpu = Some(summary);
        match verdict {
            None => {}
            Some(Verdict::Failing) => {
                self.gpu_verdict = Verdict::Failing;
                self.gpu_healthy_streak = 0;
                self.gpu_reason = format!("GPU failing: {reasons}");
            }
            Some(Verdict::Degraded) => {
                self.gpu_healthy_streak = 0;
                if self.gpu_verdict != Verdict::Failing {
                    self.gpu_verdict = Verdict::Degraded;
                    self.gpu_reason = format!("GPU degraded: {reasons}");
                }
            }
            Some(Verdict::Healthy) => {
                self.gpu_healthy_streak += 1;
                if self.gpu_healthy_streak >= cfg.gpu_healthy_readings && self.check_healthy {
                    self.gpu_verdict = Verdict::Healthy;
                    self.gpu_reason.clear();
                }
            }
        }
    }

    fn eject(&mut self, now: Instant, cfg: &HealthConfig, jitter: Duration, detail: String) {
        // A shard that stayed healthy for a whole maximum ejection starts over.
        if self
            .returned_at
            .is_some_and(|t| now.saturating_duration_since(t) >= cfg.max_ejection)
        {
            self.ejections = 0;
        }
        self.ejections += 1;
        let length =
            (cfg.base_ejection * self.ejections).min(cfg.max_ejection.max(cfg.base_ejection));
        self.ejected_until = Some(now + length + jitter);
        self.ejection_reason = if self.consecutive_failures == 0 {
            format!("ejected for {} ms: {detail}", (length + jitter).as_millis())
        } else {
            format!(
                "ejected for {} ms after {} consecutive failures (last: {detail})",
                (length + jitter).as_millis(),
                self.consecutive_failures
            )
        };
        self.consecutive_failures = 0;
        self.consecutive_local_failures = 0;
    }

    fn settle(&mut self) -> Option<(ShardState, String)> {
        let (state, reason) = if self.ejected_until.is_some() {
            (ShardState::Ejected, self.ejection_reason.clone())
        } else if !self.check_healthy {
            (ShardState::Ejected, self.check_reason.clone())
        } else if self.gpu_verdict == Verdict::Failing {
            (ShardState::Draining, self.gpu_reason.clone())
        } else if self.gpu_verdict == Verdict::Degraded {
            (ShardState::Degraded, self.gpu_reason.clone())
        } else {
            (ShardState::Healthy, String::new())
        };
        if state == self.state && reason == self.reason {
            return None;
        }
        let old = (self.state, std::mem::replace(&mut self.reason, reason));
        self.state = state;
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            base_ejection: Duration::from_secs(3),
            max_ejection: Duration::from_secs(10),
            ..HealthConfig::default()
        }
    }

    fn fail(local: bool) -> Signal {
        Signal::Failure {
            local,
            detail: "status 500".into(),
        }
    }

    const NO_JITTER: Duration = Duration::ZERO;

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new();
        for _ in 0..4 {
            assert_eq!(
                t.on(fail(false), t0, &c, EjectPermit::Allowed, NO_JITTER),
                None
            );
        }
        t.on(Signal::Success, t0, &c, EjectPermit::Allowed, NO_JITTER);
        for _ in 0..4 {
            t.on(fail(false), t0, &c, EjectPermit::Allowed, NO_JITTER);
        }
        assert_eq!(t.state(), ShardState::Healthy);
        let changed = t.on(fail(false), t0, &c, EjectPermit::Allowed, NO_JITTER);
        assert_eq!(changed, Some((ShardState::Healthy, String::new())));
        assert_eq!(t.state(), ShardState::Ejected);
        assert!(
            t.reason().contains("5 consecutive failures"),
            "{}",
            t.reason()
        );
    }

    #[test]
    fn local_failures_eject_sooner() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new();
        for _ in 0..3 {
            t.on(fail(true), t0, &c, EjectPermit::Allowed, NO_JITTER);
        }
        assert_eq!(t.state(), ShardState::Ejected);
    }

    #[test]
    fn the_pool_cap_can_deny_an_ejection() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new();
        for _ in 0..10 {
            t.on(fail(true), t0, &c, EjectPermit::Denied, NO_JITTER);
        }
        assert_eq!(t.state(), ShardState::Healthy);
    }

    #[test]
    fn return_needs_the_time_and_a_passing_check_and_ejections_grow() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new();
        for _ in 0..3 {
            t.on(fail(true), t0, &c, EjectPermit::Allowed, NO_JITTER);
        }
        // A check before the time is up does not bring it back.
        t.on(
            Signal::CheckPassed,
            t0 + Duration::from_secs(2),
            &c,
            EjectPermit::Allowed,
            NO_JITTER,
        );
        assert_eq!(t.state(), ShardState::Ejected);
        // Time alone does not either (checks are on).
        assert_eq!(t.tick(t0 + Duration::from_secs(4), &c), None);
        t.on(
            Signal::CheckPassed,
            t0 + Duration::from_secs(4),
            &c,
            EjectPermit::Allowed,
            NO_JITTER,
        );
        assert_eq!(t.state(), ShardState::Healthy);
        // Second ejection: twice as long (6 s); third: 9 s; fourth: capped at 10 s.
        let t1 = t0 + Duration::from_secs(5);
        for _ in 0..3 {
            t.on(fail(true), t1, &c, EjectPermit::Allowed, NO_JITTER);
        }
        assert_eq!(t.ejections(), 2);
        assert!(t.reason().contains("ejected for 6000 ms"), "{}", t.reason());
        t.on(
            Signal::CheckPassed,
            t1 + Duration::from_secs(5),
            &c,
            EjectPermit::Allowed,
            NO_JITTER,
        );
        assert_eq!(t.state(), ShardState::Ejected);
        t.on(
            Signal::CheckPassed,
            t1 + Duration::from_secs(6),
            &c,
            EjectPermit::Allowed,
            NO_JITTER,
        );
        assert_eq!(t.state(), ShardState::Healthy);
    }

    #[test]
    fn a_joining_shard_takes_nothing_until_its_first_check_passes_then_ramps_up() {
        let c = HealthConfig {
            slow_start: Duration::from_secs(10),
            ..cfg()
        };
        let t0 = Instant::now();
        let mut t = Tracker::joining();
        assert_eq!(t.state(), ShardState::Ejected);
        // Requests' outcomes do not admit it; a failing check keeps it out.
        t.on(Signal::Success, t0, &c, EjectPermit::Allowed, NO_JITTER);
        let failed = Signal::CheckFailed {
            detail: "status 503".into(),
        };
        t.on(failed, t0, &c, EjectPermit::Allowed, NO_JITTER);
        assert_eq!(t.state(), ShardState::Ejected);
        // One passing check (not healthy_threshold of them) admits it, in slow start.
        let at = t0 + Duration::from_secs(1);
        let changed = t.on(Signal::CheckPassed, at, &c, EjectPermit::Allowed, NO_JITTER);
        assert_eq!(changed.map(|c| c.0), Some(ShardState::Ejected));
        assert_eq!(t.state(), ShardState::Healthy);
        assert_eq!(t.slow_start_factor(at, &c), 0.1);
        assert_eq!(t.slow_start_factor(at + Duration::from_secs(11), &c), 1.0);
    }

    #[test]
    fn a_returning_shard_ramps_up_over_the_slow_start_window() {
        let c = HealthConfig {
            slow_start: Duration::from_secs(10),
            ..cfg()
        };
        let t0 = Instant::now();
        let mut t = Tracker::new();
        assert_eq!(t.slow_start_factor(t0, &c), 1.0);
        for _ in 0..3 {
            t.on(fail(true), t0, &c, EjectPermit::Allowed, NO_JITTER);
        }
        let back = t0 + Duration::from_secs(3);
        t.on(
            Signal::CheckPassed,
            back,
            &c,
            EjectPermit::Allowed,
            NO_JITTER,
        );
        assert_eq!(t.state(), ShardState::Healthy);
        assert_eq!(t.slow_start_factor(back, &c), 0.1);
        assert!((t.slow_start_factor(back + Duration::from_secs(5), &c) - 0.5).abs() < 1e-9);
        assert_eq!(t.slow_start_factor(back + Duration::from_secs(11), &c), 1.0);
        let off = HealthConfig {
            slow_start: Duration::ZERO,
            ..c
        };
        assert_eq!(t.slow_start_factor(back, &off), 1.0);
    }

    #[test]
    fn without_checks_an_ejection_ends_with_its_time() {
        let c = HealthConfig {
            check_interval: Duration::ZERO,
            ..cfg()
        };
        let t0 = Instant::now();
        let mut t = Tracker::new();
        for _ in 0..3 {
            t.on(fail(true), t0, &c, EjectPermit::Allowed, NO_JITTER);
        }
        assert_eq!(t.tick(t0 + Duration::from_secs(2), &c), None);
        assert!(t.tick(t0 + Duration::from_secs(3), &c).is_some());
        assert_eq!(t.state(), ShardState::Healthy);
    }

    fn gpu(verdict: Option<Verdict>) -> Signal {
        Signal::Gpu(GpuSummary {
            verdict,
            reasons: vec!["1 uncorrectable ECC error(s)".into()],
            ..GpuSummary::default()
        })
    }

    #[test]
    fn a_failing_gpu_drains_and_only_healthy_readings_restore() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new();
        let on = |t: &mut Tracker, s| t.on(s, t0, &c, EjectPermit::Allowed, NO_JITTER);
        on(&mut t, gpu(Some(Verdict::Failing)));
        assert_eq!(t.state(), ShardState::Draining);
        assert!(t.reason().starts_with("GPU failing"));
        // Unknown readings and a degraded one do not restore it.
        on(&mut t, gpu(None));
        on(&mut t, gpu(Some(Verdict::Degraded)));
        assert_eq!(t.state(), ShardState::Draining);
        on(&mut t, gpu(Some(Verdict::Healthy)));
        on(&mut t, gpu(Some(Verdict::Healthy)));
        assert_eq!(t.state(), ShardState::Draining);
        on(&mut t, gpu(Some(Verdict::Healthy)));
        assert_eq!(t.state(), ShardState::Healthy);
    }

    #[test]
    fn an_unknown_gpu_never_takes_a_healthy_shard_out_and_degraded_keeps_it_serving() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new();
        for _ in 0..10 {
            t.on(gpu(None), t0, &c, EjectPermit::Allowed, NO_JITTER);
        }
        assert_eq!(t.state(), ShardState::Healthy);
        t.on(
            gpu(Some(Verdict::Degraded)),
            t0,
            &c,
            EjectPermit::Allowed,
            NO_JITTER,
        );
        assert_eq!(t.state(), ShardState::Degraded);
        assert!(t.state().takes_new_requests());
        // A failing check still wins over the GPU's word.
        for _ in 0..2 {
            t.on(
                Signal::CheckFailed {
                    detail: "refused".into(),
                },
                t0,
                &c,
                EjectPermit::Allowed,
                NO_JITTER,
            );
        }
        assert_eq!(t.state(), ShardState::Ejected);
    }

    #[test]
    fn active_checks_have_hysteresis_and_a_dead_engine_fails_at_once() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new();
        let failed = || Signal::CheckFailed {
            detail: "connection refused".into(),
        };
        t.on(failed(), t0, &c, EjectPermit::Allowed, NO_JITTER);
        assert_eq!(t.state(), ShardState::Healthy);
        t.on(failed(), t0, &c, EjectPermit::Allowed, NO_JITTER);
        assert_eq!(t.state(), ShardState::Ejected);
        assert!(t.reason().starts_with("health check failing"));
        t.on(Signal::CheckPassed, t0, &c, EjectPermit::Allowed, NO_JITTER);
        assert_eq!(t.state(), ShardState::Ejected);
        t.on(Signal::CheckPassed, t0, &c, EjectPermit::Allowed, NO_JITTER);
        assert_eq!(t.state(), ShardState::Healthy);
        t.on(
            Signal::CheckFailedHard {
                detail: "503".into(),
            },
            t0,
            &c,
            EjectPermit::Allowed,
            NO_JITTER,
        );
        assert_eq!(t.state(), ShardState::Ejected);
        assert!(t.reason().contains("dead"));
    }
}
