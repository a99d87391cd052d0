//! Engine metrics: scrape each shard's Prometheus `/metrics` and read the engine's own load
//! signals by their names — one adapter per engine kind. A scrape that fails or is older than
//! three intervals is *unknown*, not bad: it never takes a shard out by itself.
//!
//! The scraper also watches for silent death: requests queued or running while the engine's
//! generated-token counter stands still for `silent_death` (vLLM can die this way while its
//! `/health` still answers 200).

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use serde::Serialize;

use tokio::task::JoinHandle;

use crate::monitor::HealthMonitor;
use crate::probes::ProbeClient;
use crate::tracker::Signal;
use crate::view::ShardId;

/// The engine behind a pool: what the policy's `pools[].engine` names, and what decides
/// how a shard's health path and metrics are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// vLLM.
    Vllm,
    /// SGLang.
    Sglang,
    /// Hugging Face Text Generation Inference.
    Tgi,
    /// TensorRT-LLM (through its OpenAI server).
    Trtllm,
    /// Triton Inference Server.
    Triton,
    /// Ray Serve.
    RayServe,
    /// BentoML.
    Bentoml,
    /// Anything else that speaks the OpenAI API.
    Generic,
}

impl EngineKind {
    /// Every kind, in the order the policy documentation lists them.
    pub const ALL: [EngineKind; 8] = [
        Self::Vllm,
        Self::Sglang,
        Self::Tgi,
        Self::Trtllm,
        Self::Triton,
        Self::RayServe,
        Self::Bentoml,
        Self::Generic,
    ];

    /// The kind's name in policy files, the admin API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::Tgi => "tgi",
            Self::Trtllm => "trtllm",
            Self::Triton => "triton",
            Self::RayServe => "ray_serve",
            Self::Bentoml => "bentoml",
            Self::Generic => "generic",
        }
    }

    /// Parses a policy name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The health endpoint an engine of this kind serves.
    pub fn default_health_path(self) -> &'static str {
        match self {
            Self::Triton => "/v2/health/ready",
            _ => "/health",
        }
    }
}

/// Which metric names a shard's engine exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineMetrics {
    /// vLLM: `vllm:num_requests_waiting`, `vllm:num_requests_running`,
    /// `vllm:kv_cache_usage_perc` (older: `vllm:gpu_cache_usage_perc`),
    /// `vllm:num_preemptions_total`, `vllm:generation_tokens_total`.
    Vllm,
    /// SGLang: `sglang:num_queue_reqs`, `sglang:num_running_reqs`, `sglang:token_usage`,
    /// `sglang:generation_tokens_total`.
    Sglang,
    /// TGI: `tgi_queue_size`, `tgi_batch_current_size`.
    Tgi,
    /// TensorRT-LLM through Triton: `nv_trt_llm_request_metrics{request_type=...}` and
    /// `nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=...}`.
    TrtLlm,
    /// Anything else: nothing is read.
    Generic,
}

/// One scrape's reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct EngineLoad {
    /// Requests queued, not yet scheduled.
    pub queue_depth: Option<f64>,
    /// Requests in the running batch.
    pub running: Option<f64>,
    /// KV-cache use, 0..=1.
    pub kv_usage: Option<f64>,
    /// Preemptions since the engine started.
    pub preemptions_total: Option<f64>,
    /// Tokens generated since the engine started.
    pub generation_tokens_total: Option<f64>,
    /// Share of prompt tokens found in the engine's prefix cache since it started, 0..=1
    /// (vLLM's `prefix_cache_hits` over `prefix_cache_queries`, SGLang's `cache_hit_rate`).
    pub prefix_cache_hit_rate: Option<f64>,
    /// Age of the reading when published, milliseconds (unknown when stale).
    #[serde(skip)]
    pub taken: Option<Instant>,
}

/// Sums a metric over every label set; `labels` must all be present on a line to count.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value_part) = match rest.chars().next() {
            Some('{') => match rest.find('}') {
                Some(end) => (&rest[1..end], &rest[end + 1..]),
                None => continue,
            },
            Some(' ') => ("", rest),
            _ => continue,
        };
        if !labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let Some(value) = value_part
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if value.is_finite() {
            total = Some(total.unwrap_or(0.0) + value);
        }
    }
    total
}

impl EngineMetrics {
    /// The adapter for an engine kind.
    pub fn for_engine(kind: EngineKind) -> Self {
        match kind {
            EngineKind::Vllm => Self::Vllm,
            EngineKind::Sglang => Self::Sglang,
            EngineKind::Tgi => Self::Tgi,
            EngineKind::Trtllm | EngineKind::Triton => Self::TrtLlm,
            EngineKind::RayServe | EngineKind::Bentoml | EngineKind::Generic => Self::Generic,
        }
    }

    /// Reads the engine's load from a `/metrics` text.
    pub fn parse(self, text: &str) -> EngineLoad {
        let m = |name: &str| metric(text, name, &[]);
        let mut load = match self {
            Self::Vllm => EngineLoad {
                queue_depth: m("vllm:num_requests_waiting"),
                running: m("vllm:num_requests_running"),
                kv_usage: m("vllm:kv_cache_usage_perc").or_else(|| m("vllm:gpu_cache_usage_perc")),
                preemptions_total: m("vllm:num_preemptions_total"),
                generation_tokens_total: m("vllm:generation_tokens_total"),
                prefix_cache_hit_rate: match (
                    m("vllm:prefix_cache_hits_total"),
                    m("vllm:prefix_cache_queries_total"),
                ) {
                    (Some(h), Some(q)) if q > 0.0 => Some(h / q),
                    _ => None,
                },
                taken: None,
            },
            Self::Sglang => EngineLoad {
                queue_depth: m("sglang:num_queue_reqs"),
                running: m("sglang:num_running_reqs"),
                kv_usage: m("sglang:token_usage"),
                preemptions_total: None,
                generation_tokens_total: m("sglang:generation_tokens_total"),
                prefix_cache_hit_rate: m("sglang:cache_hit_rate"),
                taken: None,
            },
            Self::Tgi => EngineLoad {
                queue_depth: m("tgi_queue_size"),
                running: m("tgi_batch_current_size"),
                ..EngineLoad::default()
            },
            Self::TrtLlm => {
                let req = |t| metric(text, "nv_trt_llm_request_metrics", &[("request_type", t)]);
                let kv = |t| {
                    metric(
                        text,
                        "nv_trt_llm_kv_cache_block_metrics",
                        &[("kv_cache_block_type", t)],
                    )
                };
                EngineLoad {
                    queue_depth: req("waiting"),
                    running: req("active"),
                    kv_usage: match (kv("used"), kv("max")) {
                        (Some(used), Some(max)) if max > 0.0 => Some(used / max),
                        _ => None,
                    },
                    ..EngineLoad::default()
                }
            }
            Self::Generic => EngineLoad::default(),
        };
        load.kv_usage = load.kv_usage.map(|k| k.clamp(0.0, 1.0));
        load.prefix_cache_hit_rate = load.prefix_cache_hit_rate.map(|r| r.clamp(0.0, 1.0));
        load
    }
}

/// One shard to scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrapeTarget {
    /// The shard.
    pub shard: ShardId,
    /// The full `/metrics` URL.
    pub url: String,
    /// The adapter.
    pub engine: EngineMetrics,
}

/// Starts scraping one shard on the current Tokio runtime until the returned handle is
/// aborted. `silent_death` zero turns the stall detector off.
pub fn spawn_scrape(
    target: ScrapeTarget,
    client: ProbeClient,
    interval: Duration,
    timeout: Duration,
    silent_death: Duration,
    monitor: HealthMonitor,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stall = StallWatch::default();
        loop {
            ticker.tick().await;
            let Some(load) = scrape(&client, &target, timeout).await else {
                continue;
            };
            let now = tokio::time::Instant::now().into_std();
            if let Some(detail) = stall.see(&load, now, silent_death) {
                monitor.report(target.shard, Signal::Stalled { detail });
            }
            monitor.report(
                target.shard,
                Signal::Engine(EngineLoad {
                    taken: Some(now),
                    ..load
                }),
            );
        }
    })
}

async fn scrape(
    client: &ProbeClient,
    target: &ScrapeTarget,
    timeout: Duration,
) -> Option<EngineLoad> {
    let uri = target.url.parse::<hyper::Uri>().ok()?;
    let call = async {
        let resp = client.get(uri).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = Limited::new(resp.into_body(), 8 << 20)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some(target.engine.parse(std::str::from_utf8(&body).ok()?))
    };
    tokio::time::timeout(timeout, call).await.ok().flatten()
}

/// Detects "work waiting, nothing generated" across scrapes.
#[derive(Debug, Default)]
pub struct StallWatch {
    last_tokens: Option<f64>,
    stuck_since: Option<Instant>,
    reported: bool,
}

impl StallWatch {
    /// Returns a reason the first time the engine has had work but generated nothing for
    /// `limit`; resets as soon as tokens move or the work is gone.
    pub fn see(&mut self, load: &EngineLoad, now: Instant, limit: Duration) -> Option<String> {
        if limit.is_zero() {
            return None;
        }
        let busy = load.queue_depth.unwrap_or(0.0) + load.running.unwrap_or(0.0) > 0.0;
        let tokens = load.generation_tokens_total?;
        let moved = self.last_tokens.is_none_or(|t| tokens > t);
        self.last_tokens = Some(tokens);
        if !busy || moved {
            self.stuck_since = None;
            self.reported = false;
            return None;
        }
        let since = *self.stuck_since.get_or_insert(now);
        if !self.reported && now.saturating_duration_since(since) >= limit {
            self.reported = true;
            return Some(format!(
                "no token generated for {} ms with {} request(s) queued or running",
                limit.as_millis(),
                load.queue_depth.unwrap_or(0.0) + load.running.unwrap_or(0.0)
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3
vllm:num_requests_running{model_name="b"} 1
vllm:num_requests_waiting{model_name="a"} 7
vllm:gpu_cache_usage_perc{model_name="a"} 0.82
vllm:num_preemptions_total{model_name="a"} 2
vllm:generation_tokens_total{model_name="a"} 1234
vllm:prefix_cache_queries_total{model_name="a"} 400
vllm:prefix_cache_hits_total{model_name="a"} 300
"#;

    #[test]
    fn vllm_names_including_the_older_kv_name() {
        let l = EngineMetrics::Vllm.parse(VLLM);
        assert_eq!(l.running, Some(4.0));
        assert_eq!(l.queue_depth, Some(7.0));
        assert_eq!(l.kv_usage, Some(0.82));
        assert_eq!(l.preemptions_total, Some(2.0));
        assert_eq!(l.generation_tokens_total, Some(1234.0));
        assert_eq!(l.prefix_cache_hit_rate, Some(0.75));
        let newer = VLLM.replace("gpu_cache_usage_perc", "kv_cache_usage_perc");
        assert_eq!(EngineMetrics::Vllm.parse(&newer).kv_usage, Some(0.82));
    }

    #[test]
    fn other_engines_and_the_generic_one() {
        let sg = "sglang:num_queue_reqs 2\nsglang:num_running_reqs 5\nsglang:token_usage 0.5\n";
        let l = EngineMetrics::Sglang.parse(sg);
        assert_eq!(
            (l.queue_depth, l.running, l.kv_usage),
            (Some(2.0), Some(5.0), Some(0.5))
        );
        let tgi = "tgi_queue_size 4\ntgi_batch_current_size 9\n";
        assert_eq!(EngineMetrics::Tgi.parse(tgi).queue_depth, Some(4.0));
        let trt = "nv_trt_llm_request_metrics{model=\"m\",request_type=\"waiting\"} 6\nnv_trt_llm_request_metrics{model=\"m\",request_type=\"active\"} 8\nnv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"used\",model=\"m\"} 30\nnv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"m\"} 120\n";
        let l = EngineMetrics::TrtLlm.parse(trt);
        assert_eq!(
            (l.queue_depth, l.running, l.kv_usage),
            (Some(6.0), Some(8.0), Some(0.25))
        );
        assert_eq!(EngineMetrics::Generic.parse(VLLM), EngineLoad::default());
        // Garbage is unknown, not zero.
        assert_eq!(
            EngineMetrics::Vllm
                .parse("vllm:num_requests_waiting nan-ish\n")
                .queue_depth,
            None
        );
        assert_eq!(
            EngineMetrics::for_engine(EngineKind::RayServe),
            EngineMetrics::Generic
        );
    }

    #[test]
    fn a_stall_is_reported_once_after_the_limit_and_resets_when_tokens_move() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(2);
        let load = |tokens, waiting| EngineLoad {
            queue_depth: Some(waiting),
            running: Some(0.0),
            generation_tokens_total: Some(tokens),
            ..EngineLoad::default()
        };
        let mut w = StallWatch::default();
        assert_eq!(w.see(&load(10.0, 3.0), t0, limit), None);
        assert_eq!(
            w.see(&load(10.0, 3.0), t0 + Duration::from_secs(1), limit),
            None
        );
        assert!(w
            .see(&load(10.0, 3.0), t0 + Duration::from_secs(3), limit)
            .is_some());
        assert_eq!(
            w.see(&load(10.0, 3.0), t0 + Duration::from_secs(4), limit),
            None
        );
        // Idle with no tokens is not a stall.
        let mut w = StallWatch::default();
        w.see(&load(10.0, 0.0), t0, limit);
        assert_eq!(
            w.see(&load(10.0, 0.0), t0 + Duration::from_secs(9), limit),
            None
        );
        // Tokens moving reset it.
        let mut w = StallWatch::default();
        w.see(&load(10.0, 3.0), t0, limit);
        w.see(&load(11.0, 3.0), t0 + Duration::from_secs(3), limit);
        assert_eq!(
            w.see(&load(11.0, 3.0), t0 + Duration::from_secs(4), limit),
            None
        );
    }
}
