//! Prometheus metrics: what the admin listener's `/metrics` exposes.

use std::time::Duration;

use breakwater_health::ShardState;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::admission::Admission;
use crate::policy::Priority;
use crate::table::Table;

/// The gateway's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    requests_total: IntCounterVec,
    request_duration_seconds: HistogramVec,
    time_to_first_byte_seconds: HistogramVec,
    upstream_attempts_total: IntCounterVec,
    shard_inflight_tokens: IntGaugeVec,
    shard_inflight_requests: IntGaugeVec,
    shard_state: IntGaugeVec,
    shard_ejections: IntGaugeVec,
    health_transitions_total: IntCounter,
    health_dropped_signals_total: IntCounter,
    admitted_total: IntCounterVec,
    refused_total: IntCounterVec,
    queue_wait_seconds: HistogramVec,
    queue_depth: IntGaugeVec,
    shard_admission_limit_tokens: IntGaugeVec,
    shard_drained: IntGaugeVec,
    policy_reloads_total: IntCounterVec,
    policy_info: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn try_new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("breakwater".into()), None)?;
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        let requests_total = IntCounterVec::new(
            Opts::new("requests_total", "Client requests by response status."),
            &["status"],
        )?;
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Client request duration.")
                .buckets(buckets.clone()),
            &["status_class"],
        )?;
        let time_to_first_byte_seconds = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_byte_seconds",
                "From request to the response header (streams: the first event).",
            )
            .buckets(buckets),
            &["status_class"],
        )?;
        let upstream_attempts_total = IntCounterVec::new(
            Opts::new("upstream_attempts_total", "Attempts on shards by outcome."),
            &["shard", "outcome"],
        )?;
        let shard_inflight_tokens = IntGaugeVec::new(
            Opts::new(
                "shard_inflight_tokens",
                "Estimated tokens in flight per shard.",
            ),
            &["shard", "region", "pool"],
        )?;
        let shard_inflight_requests = IntGaugeVec::new(
            Opts::new("shard_inflight_requests", "Requests in flight per shard."),
            &["shard", "region", "pool"],
        )?;
        let shard_state = IntGaugeVec::new(
            Opts::new("shard_state", "1 for the shard's current health state."),
            &["shard", "state"],
        )?;
        let shard_ejections = IntGaugeVec::new(
            Opts::new(
                "shard_ejections",
                "Times the shard has been ejected (decays after a healthy stretch).",
            ),
            &["shard"],
        )?;
        let health_transitions_total = IntCounter::new(
            "health_transitions_total",
            "Shard state transitions since start.",
        )?;
        let health_dropped_signals_total = IntCounter::new(
            "health_dropped_signals_total",
            "Health signals dropped because the monitor's queue was full.",
        )?;
        let admitted_total = IntCounterVec::new(
            Opts::new(
                "admitted_total",
                "Requests admission let through to a shard, by tenant and priority.",
            ),
            &["tenant", "priority"],
        )?;
        let refused_total = IntCounterVec::new(
            Opts::new(
                "refused_total",
                "Requests refused before any shard was tried, by tenant, priority and reason.",
            ),
            &["tenant", "priority", "reason"],
        )?;
        let queue_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "queue_wait_seconds",
                "Time requests waited in the gateway's queue (granted or not), by priority.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["priority"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "queue_depth",
                "Requests waiting in the gateway's queue, by priority.",
            ),
            &["priority"],
        )?;
        let shard_admission_limit_tokens = IntGaugeVec::new(
            Opts::new(
                "shard_admission_limit_tokens",
                "Each shard's admission limit: tokens it may have in flight, learned from TTFT.",
            ),
            &["shard", "region", "pool"],
        )?;
        let shard_drained = IntGaugeVec::new(
            Opts::new(
                "shard_drained",
                "1 while an operator has drained the shard.",
            ),
            &["shard"],
        )?;
        let policy_reloads_total = IntCounterVec::new(
            Opts::new(
                "policy_reloads_total",
                "Policy reloads by trigger (watch, signal, admin) and result (applied, unchanged, rejected).",
            ),
            &["trigger", "result"],
        )?;
        let policy_info = IntGaugeVec::new(
            Opts::new(
                "policy_info",
                "1 for the policy revision in force (its Git commit, or sha256: and a content hash).",
            ),
            &["revision"],
        )?;
        registry.register(Box::new(shard_drained.clone()))?;
        registry.register(Box::new(policy_reloads_total.clone()))?;
        registry.register(Box::new(policy_info.clone()))?;
        registry.register(Box::new(admitted_total.clone()))?;
        registry.register(Box::new(refused_total.clone()))?;
        registry.register(Box::new(queue_wait_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(shard_admission_limit_tokens.clone()))?;
        registry.register(Box::new(shard_state.clone()))?;
        registry.register(Box::new(shard_ejections.clone()))?;
        registry.register(Box::new(health_transitions_total.clone()))?;
        registry.register(Box::new(health_dropped_signals_total.clone()))?;
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration_seconds.clone()))?;
        registry.register(Box::new(time_to_first_byte_seconds.clone()))?;
        registry.register(Box::new(upstream_attempts_total.clone()))?;
        registry.register(Box::new(shard_inflight_tokens.clone()))?;
        registry.register(Box::new(shard_inflight_requests.clone()))?;
        Ok(Self {
            registry,
            requests_total,
            request_duration_seconds,
            time_to_first_byte_seconds,
            upstream_attempts_total,
            shard_inflight_tokens,
            shard_inflight_requests,
            shard_state,
            shard_ejections,
            health_transitions_total,
            health_dropped_signals_total,
            admitted_total,
            refused_total,
            queue_wait_seconds,
            queue_depth,
            shard_admission_limit_tokens,
            shard_drained,
            policy_reloads_total,
            policy_info,
        })
    }

    /// Records a reload attempt.
    pub fn reload(&self, trigger: &str, result: &str) {
        self.policy_reloads_total
            .with_label_values(&[trigger, result])
            .inc();
    }

    /// The revision in force is `revision` (replacing `previous`).
    pub fn policy_revision(&self, revision: &str, previous: Option<&str>) {
        if let Some(p) = previous.filter(|p| *p != revision) {
            let _ = self.policy_info.remove_label_values(&[p]);
        }
        self.policy_info.with_label_values(&[revision]).set(1);
    }

    /// Records a request admission let through.
    pub fn admitted(&self, tenant: &str, priority: &str) {
        self.admitted_total
            .with_label_values(&[tenant, priority])
            .inc();
    }

    /// Records a request refused before any shard was tried.
    pub fn refused(&self, tenant: &str, priority: &str, reason: &str) {
        self.refused_total
            .with_label_values(&[tenant, priority, reason])
            .inc();
    }

    /// Records a request's time in the queue.
    pub fn queue_wait(&self, priority: &str, wait: Duration) {
        self.queue_wait_seconds
            .with_label_values(&[priority])
            .observe(wait.as_secs_f64());
    }

    /// Records a finished client request (status 0: the client left before any answer).
    pub fn request(&self, status: u16, total: Duration, first_byte: Option<Duration>) {
        let class = match status {
            0 => "aborted",
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.requests_total
            .with_label_values(&[&status.to_string()])
            .inc();
        self.request_duration_seconds
            .with_label_values(&[class])
            .observe(total.as_secs_f64());
        if let Some(fb) = first_byte {
            self.time_to_first_byte_seconds
                .with_label_values(&[class])
                .observe(fb.as_secs_f64());
        }
    }

    /// Records one attempt on a shard.
    pub fn attempt(&self, shard: &str, outcome: &str) {
        self.upstream_attempts_total
            .with_label_values(&[shard, outcome])
            .inc();
    }

    /// The text exposition, with per-shard gauges read from the ledger and the health
    /// snapshot now.
    pub fn render(&self, table: &Table, admission: &Admission) -> String {
        let router = &table.router;
        let health = router.monitor();
        let view = router.health();
        for (p, depth) in Priority::ALL.iter().zip(admission.queue_depths()) {
            self.queue_depth
                .with_label_values(&[p.as_str()])
                .set(depth as i64);
        }
        // The monitor counts; these mirror its counts (they only ever grow).
        let catch_up = |c: &IntCounter, now: u64| c.inc_by(now.saturating_sub(c.get()));
        catch_up(&self.health_transitions_total, health.transitions_total());
        catch_up(&self.health_dropped_signals_total, health.dropped_signals());
        // Shards a reload removed must not linger as stale series.
        for gauge in [
            &self.shard_state,
            &self.shard_ejections,
            &self.shard_drained,
            &self.shard_admission_limit_tokens,
            &self.shard_inflight_tokens,
            &self.shard_inflight_requests,
        ] {
            gauge.reset();
        }
        for s in router.shards() {
            let h = view.get(s.key);
            for state in [
                ShardState::Healthy,
                ShardState::Degraded,
                ShardState::Ejected,
                ShardState::Draining,
            ] {
                self.shard_state
                    .with_label_values(&[s.id.as_str(), state.as_str()])
                    .set(i64::from(h.state == state));
            }
            self.shard_ejections
                .with_label_values(&[s.id.as_str()])
                .set(i64::from(h.ejection_count));
            self.shard_drained
                .with_label_values(&[s.id.as_str()])
                .set(i64::from(s.is_drained()));
            let labels = [s.id.as_str(), s.region.as_str(), s.pool.as_str()];
            self.shard_admission_limit_tokens
                .with_label_values(&labels)
                .set(s.limit.tokens() as i64);
            self.shard_inflight_tokens
                .with_label_values(&labels)
                .set(s.load.inflight_tokens() as i64);
            self.shard_inflight_requests
                .with_label_values(&labels)
                .set(s.load.inflight_requests() as i64);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
