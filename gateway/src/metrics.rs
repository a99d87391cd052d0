//! Prometheus metrics: what the admin listener's `/metrics` exposes.

use std::time::Duration;

use breakwater_health::ShardState;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    shard_slots: IntGaugeVec,
    shard_drained: IntGaugeVec,
    policy_reloads_total: IntCounterVec,
    policy_info: IntGaugeVec,
    retries_total: IntCounter,
    prompt_tokens_total: IntCounterVec,
    completion_tokens_total: IntCounterVec,
    affinity_total: IntCounterVec,
    time_per_output_token_seconds: HistogramVec,
    gateway_overhead_seconds: Histogram,
    gpu_memory_free_bytes: IntGaugeVec,
    gpu_memory_total_bytes: IntGaugeVec,
    gpu_utilization_ratio: GaugeVec,
    gpu_temperature_celsius: IntGaugeVec,
    gpu_verdict: IntGaugeVec,
}

/// One finished client request, for [`Metrics::request`]. Every label comes from the
/// policy (or is empty), never from the client.
pub struct Finished<'a> {
    /// The model (a model no pool serves: `unknown`; empty before the body was read).
    pub model: &'a str,
    /// The tenant (empty: unidentified).
    pub tenant: &'a str,
    /// The last shard's region (empty: none tried).
    pub region: &'a str,
    /// The last shard tried.
    pub shard: &'a str,
    /// The status answered (0: the client left first).
    pub status: u16,
    /// Request header to the end of the answer.
    pub total: Duration,
    /// Request header to the response header (a stream: its first event).
    pub first_byte: Option<Duration>,
    /// The gateway's own time before the first attempt went out, queueing excluded.
    pub overhead: Option<Duration>,
    /// Attempts after the first.
    pub retries: u32,
    /// The answer's (prompt, completion) tokens, when it reported usage.
    pub usage: Option<(u64, u64)>,
    /// What cache affinity did, when it had a say.
    pub affinity: Option<&'a str>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn try_new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("breakwater".into()), None)?;
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        let requests_total = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Client requests by model, region and shard (the last tried), status and tenant.",
            ),
            &["model", "region", "shard", "status", "tenant"],
        )?;
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Client request duration, end to end.",
            )
            .buckets(buckets.clone()),
            &["model", "status_class"],
        )?;
        let time_to_first_byte_seconds = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_byte_seconds",
                "From request to the response header (streams: the first event).",
            )
            .buckets(buckets),
            &["model", "status_class"],
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
        let shard_slots = IntGaugeVec::new(
            Opts::new(
                "shard_slots",
                "Each shard's batch slots as admission knows them: declared (max_requests), else \
                 learned from the engine's running and waiting counts; absent while neither.",
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
        let retries_total = IntCounter::new(
            "retries_total",
            "Attempts after a request's first (each on another shard).",
        )?;
        let prompt_tokens_total = IntCounterVec::new(
            Opts::new(
                "prompt_tokens_total",
                "Prompt tokens the answers' usage reported, by model and tenant.",
            ),
            &["model", "tenant"],
        )?;
        let completion_tokens_total = IntCounterVec::new(
            Opts::new(
                "completion_tokens_total",
                "Completion tokens the answers' usage reported, by model and tenant.",
            ),
            &["model", "tenant"],
        )?;
        let affinity_total = IntCounterVec::new(
            Opts::new(
                "affinity_total",
                "First attempts cache affinity had a say in, by model and outcome: chosen (its shard took it), overridden_by_load (its shard was over the load bound), fenced (its shard could not take it; the next in hash order did).",
            ),
            &["model", "outcome"],
        )?;
        let time_per_output_token_seconds = HistogramVec::new(
            HistogramOpts::new(
                "time_per_output_token_seconds",
                "Each completed stream's mean time between events after its first (inter-token latency: an event is a token for most engines), by model.",
            )
            .buckets(vec![0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5]),
            &["model"],
        )?;
        let gateway_overhead_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_overhead_seconds",
                "The gateway's own time from a request's header to its first attempt on a shard, queueing excluded.",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
            ]),
        )?;
        let shard_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["shard"]);
        let gpu_memory_free_bytes = shard_gauge(
            "gpu_memory_free_bytes",
            "Free GPU memory over the shard's devices, from its gpu-probe.",
        )?;
        let gpu_memory_total_bytes = shard_gauge(
            "gpu_memory_total_bytes",
            "GPU memory over the shard's devices, from its gpu-probe.",
        )?;
        let gpu_temperature_celsius = shard_gauge(
            "gpu_temperature_celsius",
            "The hottest of the shard's GPUs.",
        )?;
        let gpu_utilization_ratio = GaugeVec::new(
            Opts::new(
                "gpu_utilization_ratio",
                "The busiest of the shard's GPUs, 0 to 1.",
            ),
            &["shard"],
        )?;
        let gpu_verdict = IntGaugeVec::new(
            Opts::new(
                "gpu_verdict",
                "1 for the gpu-probe's verdict on the shard's GPUs (unknown: no recent reading).",
            ),
            &["shard", "verdict"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "1, labelled with the gateway's version."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for m in [
            Box::new(retries_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(prompt_tokens_total.clone()),
            Box::new(completion_tokens_total.clone()),
            Box::new(affinity_total.clone()),
            Box::new(time_per_output_token_seconds.clone()),
            Box::new(gateway_overhead_seconds.clone()),
            Box::new(gpu_memory_free_bytes.clone()),
            Box::new(gpu_memory_total_bytes.clone()),
            Box::new(gpu_utilization_ratio.clone()),
            Box::new(gpu_temperature_celsius.clone()),
            Box::new(gpu_verdict.clone()),
            Box::new(build_info),
        ] {
            registry.register(m)?;
        }
        registry.register(Box::new(shard_drained.clone()))?;
        registry.register(Box::new(policy_reloads_total.clone()))?;
        registry.register(Box::new(policy_info.clone()))?;
        registry.register(Box::new(admitted_total.clone()))?;
        registry.register(Box::new(refused_total.clone()))?;
        registry.register(Box::new(queue_wait_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(shard_admission_limit_tokens.clone()))?;
        registry.register(Box::new(shard_slots.clone()))?;
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
            shard_slots,
            shard_drained,
            policy_reloads_total,
            policy_info,
            retries_total,
            prompt_tokens_total,
            completion_tokens_total,
            affinity_total,
            time_per_output_token_seconds,
            gateway_overhead_seconds,
            gpu_memory_free_bytes,
            gpu_memory_total_bytes,
            gpu_utilization_ratio,
            gpu_temperature_celsius,
            gpu_verdict,
        })
    }

    /// Adds another part's collectors (the cluster's) to the exposition.
    pub fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    /// Records a completed stream's mean time per output token.
    pub fn time_per_output_token(&self, model: &str, per_token: Duration) {
        self.time_per_output_token_seconds
            .with_label_values(&[model])
            .observe(per_token.as_secs_f64());
    }

    fn gpu(&self, shard: &str, g: &breakwater_health::GpuSummary) {
        let verdict = g.verdict.map_or("unknown", |v| v.as_str());
        self.gpu_verdict.with_label_values(&[shard, verdict]).set(1);
        if g.memory_total_bytes > 0 {
            let bytes = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.gpu_memory_free_bytes
                .with_label_values(&[shard])
                .set(bytes(g.memory_free_bytes));
            self.gpu_memory_total_bytes
                .with_label_values(&[shard])
                .set(bytes(g.memory_total_bytes));
        }
        if let Some(u) = g.utilization_gpu_pct {
            self.gpu_utilization_ratio
                .with_label_values(&[shard])
                .set(f64::from(u) / 100.0);
        }
        if let Some(t) = g.temperature_c {
            self.gpu_temperature_celsius
                .with_label_values(&[shard])
                .set(i64::from(t));
        }
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
    pub fn request(&self, r: &Finished<'_>) {
        let class = match r.status {
            0 => "aborted",
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        // The three digits without formatting a string per request (0: the client left).
        let code = http::StatusCode::from_u16(r.status).ok();
        let status = code.as_ref().map_or("0", http::StatusCode::as_str);
        self.requests_total
            .with_label_values(&[r.model, r.region, r.shard, status, r.tenant])
            .inc();
        self.request_duration_seconds
            .with_label_values(&[r.model, class])
            .observe(r.total.as_secs_f64());
        if let Some(fb) = r.first_byte {
            self.time_to_first_byte_seconds
                .with_label_values(&[r.model, class])
                .observe(fb.as_secs_f64());
        }
        if let Some(o) = r.overhead {
            self.gateway_overhead_seconds.observe(o.as_secs_f64());
        }
        if r.retries > 0 {
            self.retries_total.inc_by(u64::from(r.retries));
        }
        if let Some(outcome) = r.affinity {
            self.affinity_total
                .with_label_values(&[r.model, outcome])
                .inc();
        }
        if let Some((prompt, completion)) = r.usage {
            self.prompt_tokens_total
                .with_label_values(&[r.model, r.tenant])
                .inc_by(prompt);
            self.completion_tokens_total
                .with_label_values(&[r.model, r.tenant])
                .inc_by(completion);
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
            &self.shard_slots,
            &self.shard_inflight_tokens,
            &self.shard_inflight_requests,
            &self.gpu_memory_free_bytes,
            &self.gpu_memory_total_bytes,
            &self.gpu_temperature_celsius,
            &self.gpu_verdict,
        ] {
            gauge.reset();
        }
        self.gpu_utilization_ratio.reset();
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
            if let Some(g) = &h.gpu {
                self.gpu(s.id.as_str(), g);
            }
            let labels = [s.id.as_str(), s.region.as_str(), s.pool.as_str()];
            self.shard_admission_limit_tokens
                .with_label_values(&labels)
                .set(s.limit.tokens() as i64);
            if let Some(n) = s.max_in_flight() {
                self.shard_slots.with_label_values(&labels).set(n as i64);
            }
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
