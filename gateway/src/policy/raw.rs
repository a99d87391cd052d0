//! The policy files as written: serde structs that mirror the TOML one to one.
//!
//! Every struct rejects unknown keys, so a typo fails validation instead of being ignored.
//! Defaults and units are documented on each field and in `policies/README.md`; they are
//! applied by [`super::compile`], not here.

use serde::Deserialize;

/// One policy file. Every section is optional in a single file; the merged set must have
/// exactly one `[gateway]` and at most one of each other singleton section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    /// `[gateway]`: this instance's home region and listeners.
    pub gateway: Option<RawGateway>,
    /// `[limits]`: bounds on what the gateway buffers.
    pub limits: Option<RawLimits>,
    /// `[timeouts]`: upstream timeouts.
    pub timeouts: Option<RawTimeouts>,
    /// `[routing]`: token estimation and attempts.
    pub routing: Option<RawRouting>,
    /// `[health]`: outlier detection and active checks.
    pub health: Option<RawHealth>,
    /// `[retries]`: the retry budget and backoff.
    pub retries: Option<RawRetries>,
    /// `[admission]`: API keys, queueing and load shedding.
    pub admission: Option<RawAdmission>,
    /// `[cluster]`: replicas that share tenant limits through a store.
    pub cluster: Option<RawCluster>,
    /// `[discovery]`: the DNS servers pools' `discover` names are looked up on.
    pub discovery: Option<RawDiscovery>,
    /// `[[tenants]]`: who sends traffic, with their keys, priority and limits.
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    /// `[[regions]]`, in failover order.
    #[serde(default)]
    pub regions: Vec<RawRegion>,
    /// `[[pools]]`.
    #[serde(default)]
    pub pools: Vec<RawPool>,
    /// `[[shards]]`.
    #[serde(default)]
    pub shards: Vec<RawShard>,
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// The region this gateway instance serves first. Required.
    pub home_region: String,
    /// Traffic listener, `IP:PORT`. Default `127.0.0.1:8080`.
    pub listen: Option<String>,
    /// Admin listener, `IP:PORT`. Default `127.0.0.1:9091`.
    pub admin_listen: Option<String>,
    /// On SIGTERM: how long `/readyz` answers 503 while connections are still accepted, so
    /// load balancers stop sending, ms. Default 5000.
    pub shutdown_delay_ms: Option<u64>,
    /// On SIGTERM, after the delay: how long requests and streams in flight may take to
    /// finish before the rest are ended with an error event, ms. Default 30000.
    pub shutdown_grace_ms: Option<u64>,
    /// `[gateway.tls]`: the traffic listener speaks HTTPS (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: Option<RawListenerTls>,
    /// `[gateway.admin_tls]`: the admin listener speaks HTTPS.
    pub admin_tls: Option<RawListenerTls>,
    /// Accept cleartext HTTP/2 (h2c, prior knowledge) on a plain traffic listener beside
    /// HTTP/1.1. Default false.
    pub h2c: Option<bool>,
}

/// `[gateway.tls]`, `[gateway.admin_tls]`: a listener's certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    /// The certificate chain, leaf first (PEM), an absolute path. Read again when it changes.
    pub cert_file: String,
    /// Its private key (PEM), an absolute path.
    pub key_file: String,
    /// Offer HTTP/2 by ALPN. Default true.
    pub http2: Option<bool>,
}

/// `[pools.tls]`: how the pool's `https://` shards are verified and what the gateway presents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolTls {
    /// CA bundle (PEM) the shards' certificates must chain to, an absolute path. Default:
    /// the system's roots.
    pub ca_file: Option<String>,
    /// The gateway's client certificate (PEM), for shards that require mTLS.
    pub client_cert_file: Option<String>,
    /// Its private key (PEM).
    pub client_key_file: Option<String>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest request body accepted, bytes. Default 8 MiB.
    pub max_body_bytes: Option<u64>,
    /// Largest non-streamed response body relayed, bytes. Default 64 MiB.
    pub max_response_bytes: Option<u64>,
    /// Request bodies all in-flight requests may hold together, bytes. Default 1 GiB.
    pub max_buffered_bytes: Option<u64>,
}

/// `[timeouts]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP connect to a shard, milliseconds. Default 1000.
    pub connect_ms: Option<u64>,
    /// From sending the request to the response header (streams: the first event),
    /// milliseconds. Default 30000.
    pub first_byte_ms: Option<u64>,
    /// Longest silence between two chunks of a response, milliseconds. Default 30000.
    pub idle_ms: Option<u64>,
    /// Whole request, all attempts included, milliseconds. Default 600000.
    pub total_ms: Option<u64>,
    /// How long an idle upstream connection is kept for reuse, milliseconds. Default 4000.
    pub pool_idle_ms: Option<u64>,
}

/// `[routing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    /// Completion tokens assumed when a request sets no `max_tokens`. Default 256.
    pub default_completion_tokens: Option<u64>,
    /// Bytes of prompt text per token before calibration. Default 4.0.
    pub bytes_per_token: Option<f64>,
    /// Attempts per request (first try included) before the client gets an error.
    /// Default 3.
    pub max_attempts: Option<u32>,
    /// A region keeps its traffic while healthy capacity × this factor covers it; the
    /// surplus spills to the next region. Default 1.4.
    pub overprovisioning_factor: Option<f64>,
    /// An engine reporting this many queued requests has no headroom. Default 5.
    pub saturation_queue_depth: Option<u32>,
    /// An engine reporting this KV-cache use (percent) has no headroom. Default 80.
    pub saturation_kv_percent: Option<u32>,
    /// Prefill runs this many times faster than a shard's `capacity_tps`; the first-byte
    /// deadline grows by the estimated prefill time. Default 10.
    pub prefill_speedup: Option<f64>,
    /// A first-byte timeout is not retried for prompts of more estimated tokens than
    /// this (it is retried at most once below it). Default 32768.
    pub max_retry_prompt_tokens: Option<u64>,
}

/// `[health]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Consecutive failed requests that eject a shard. Default 5.
    pub consecutive_failures: Option<u32>,
    /// Consecutive connect failures or first-byte timeouts that eject a shard. Default 3.
    pub consecutive_local_failures: Option<u32>,
    /// First ejection's length, milliseconds; the n-th lasts n times as long. Default 30000.
    pub base_ejection_ms: Option<u64>,
    /// Longest ejection, milliseconds. Default 300000.
    pub max_ejection_ms: Option<u64>,
    /// Random extra ejection time, up to this many milliseconds. Default 3000.
    pub ejection_jitter_ms: Option<u64>,
    /// Most of a pool passive detection may eject at once, percent. Default 50.
    pub max_ejection_percent: Option<u32>,
    /// Time between active checks, milliseconds; 0 turns them off. Default 5000.
    pub check_interval_ms: Option<u64>,
    /// Deadline of one active check, milliseconds. Default 1000.
    pub check_timeout_ms: Option<u64>,
    /// Failed checks in a row that mark a shard unhealthy. Default 2.
    pub unhealthy_threshold: Option<u32>,
    /// Passed checks in a row that mark it healthy again. Default 2.
    pub healthy_threshold: Option<u32>,
    /// Time between readings of each shard's gpu-probe, milliseconds. Default 1000.
    pub gpu_interval_ms: Option<u64>,
    /// Deadline of one gpu-probe reading, milliseconds. Default 500.
    pub gpu_timeout_ms: Option<u64>,
    /// A probe reading older than this is unknown, milliseconds. Default 5000.
    pub gpu_stale_ms: Option<u64>,
    /// Healthy GPU readings in a row before a drained or degraded shard is restored.
    /// Default 3.
    pub gpu_healthy_readings: Option<u32>,
    /// Share of traffic a shard with a degraded GPU takes, percent. Default 50.
    pub gpu_degraded_weight_percent: Option<u32>,
    /// Time between scrapes of each engine's metrics, milliseconds; 0 turns them off.
    /// Default 1000.
    pub metrics_interval_ms: Option<u64>,
    /// Deadline of one scrape, milliseconds. Default 500.
    pub metrics_timeout_ms: Option<u64>,
    /// Work queued with no token generated for this long ejects a shard, milliseconds;
    /// 0 turns the detector off. Default 10000.
    pub silent_death_ms: Option<u64>,
    /// A shard returning from an ejection ramps from 10 % to its full share over this
    /// window, milliseconds; 0 turns slow start off. Default 30000.
    pub slow_start_ms: Option<u64>,
}

/// `[retries]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    /// Retries in flight may be at most this share of requests in flight, percent.
    /// Default 20.
    pub budget_percent: Option<u32>,
    /// Retries always allowed in flight, whatever the share. Default 3.
    pub min_concurrent: Option<u32>,
    /// Backoff before the first retry, milliseconds (full jitter, doubling). Default 25.
    pub backoff_base_ms: Option<u64>,
    /// Longest backoff, milliseconds. Default 250.
    pub backoff_max_ms: Option<u64>,
}

/// `[[regions]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    /// Region id, e.g. `us-east`.
    pub id: String,
}

/// `[[pools]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Pool id.
    pub id: String,
    /// The region the pool is in.
    pub region: String,
    /// Engine kind: `vllm`, `sglang`, `tgi`, `trtllm`, `triton`, `ray_serve`, `bentoml` or
    /// `generic`. Default `generic`.
    pub engine: Option<String>,
    /// Model names the pool serves (the request body's `model`).
    pub models: Vec<String>,
    /// Path of the engine's health endpoint. Default `/health` (`/v2/health/ready` for
    /// Triton).
    pub health_path: Option<String>,
    /// Path of the engine's Prometheus metrics. Default `/metrics` (Triton serves them on
    /// another port: set the full path there).
    pub metrics_path: Option<String>,
    /// The models' context window, tokens: a request whose estimated prompt plus
    /// completion exceeds it gets 400 `context_length_exceeded`. Default: unchecked.
    pub context_window: Option<u64>,
    /// `[pools.tls]`: trust anchors and client certificate for the pool's `https://` shards.
    pub tls: Option<RawPoolTls>,
    /// The endpoints the pool's engines serve, by name (`chat`, `completions`,
    /// `embeddings`, `responses`, `rerank`, `score`, `tokenize`, `detokenize`,
    /// `audio_transcriptions`, `audio_translations`). Default: all.
    pub endpoints: Option<Vec<String>>,
    /// Cache affinity: `none`, `session` or `prefix`. Default `none`.
    pub affinity: Option<String>,
    /// Bytes of prompt JSON per hashed block, 16 – 65536. Default 256.
    pub affinity_block_bytes: Option<u64>,
    /// At most this much of the prompt is hashed, bytes. Default 32768.
    pub affinity_max_prefix_bytes: Option<u64>,
    /// A request header carrying a session key (besides `prompt_cache_key` and `user`).
    pub affinity_header: Option<String>,
    /// Bounded load: affinity yields when its shard's load exceeds the mean by this
    /// factor, 1 – 10. Default 1.25.
    pub affinity_max_load: Option<f64>,
    /// How long the prefix index remembers a shard for a block, ms. Default 600000.
    pub affinity_ttl_ms: Option<u64>,
    /// Where the pool's engines are listed: `dns://NAME:PORT` (A and AAAA records, each
    /// address an engine on PORT) or `dns+srv://_service._proto.NAME` (SRV records). The
    /// shards found join the pool's `[[shards]]`. Default: none.
    pub discover: Option<String>,
    /// How discovered shards are reached: `http` or `https`. Default `http`.
    pub scheme: Option<String>,
    /// Each discovered shard's decode capacity, tokens per second. Required with
    /// `discover`.
    pub capacity_tps: Option<f64>,
    /// Each discovered shard's relative weight, (0, 1000]. Default 1.
    pub weight: Option<f64>,
    /// Each discovered shard's batch slots. Default: undeclared.
    pub max_requests: Option<u64>,
    /// Each discovered shard's gpu-probe agent, `{ip}` standing for its address
    /// (`http://{ip}:9400`). Default: none.
    pub gpu_probe: Option<String>,
    /// The records are looked up again at their TTL, but no sooner than this after the
    /// last lookup, ms. Default 1000.
    pub discover_min_ms: Option<u64>,
    /// ... and no later than this, ms. Default 30000.
    pub discover_max_ms: Option<u64>,
}

/// `[[shards]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShard {
    /// Shard id, unique across the set.
    pub id: String,
    /// The pool the shard belongs to.
    pub pool: String,
    /// The shard's region; optional, must match the pool's.
    pub region: Option<String>,
    /// Base URL of the engine's OpenAI API, `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    /// Decode capacity, tokens per second.
    pub capacity_tps: f64,
    /// Relative weight within its pool. Default 1.0.
    pub weight: Option<f64>,
    /// Base URL of the gpu-probe agent on the shard's node.
    pub gpu_probe: Option<String>,
    /// GPU device indices the shard runs on (as the probe numbers them).
    pub gpu_devices: Option<Vec<u32>>,
    /// Requests the engine runs at once (its batch slots, vLLM's `max_num_seqs`): with
    /// admission on, no more are in flight on it at a time. Default: unbounded.
    pub max_requests: Option<u64>,
}

/// `[admission]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    /// Admission control (per-shard limits, the queue, shedding). Default true.
    pub enabled: Option<bool>,
    /// Whether every request needs a known API key. Default false.
    pub require_api_key: Option<bool>,
    /// Priority of requests without a known key when keys are not required:
    /// `critical`, `standard` or `sheddable`. Default `standard`.
    pub default_priority: Option<String>,
    /// Longest wait in the gateway's queue for critical and standard requests,
    /// milliseconds. Default 1000.
    pub queue_timeout_ms: Option<u64>,
    /// Longest wait in the queue for sheddable requests, milliseconds. Default 0: they
    /// start at once or are refused.
    pub sheddable_queue_timeout_ms: Option<u64>,
    /// Under a standing queue, the longest predicted wait a new standard request is
    /// queued for, milliseconds. Default 30.
    pub queue_target_ms: Option<u64>,
    /// Most requests queued at once, all priorities together. Default 1024.
    pub max_queued: Option<u32>,
    /// Each shard's starting admission limit: this many milliseconds of its capacity,
    /// in tokens. Default 500.
    pub initial_limit_ms: Option<u64>,
    /// The lowest a shard's limit goes, milliseconds of its capacity. Default 100.
    pub min_limit_ms: Option<u64>,
    /// The highest a shard's limit goes, milliseconds of its capacity. Default 20000.
    pub max_limit_ms: Option<u64>,
    /// A time to first token this many times the shard's baseline lowers its limit,
    /// percent. Default 130.
    pub ttft_tolerance_percent: Option<u32>,
}

/// `[cluster]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// The store the replicas share: `redis://HOST:PORT[/DB]` or `rediss://` (TLS), Redis 7
    /// or Valkey. No password in it: see `password_file` and `password_env`. Required.
    pub store: String,
    /// The user to authenticate as (Redis ACL). Default: none (the `default` user).
    pub username: Option<String>,
    /// A file holding the store's password (one line), an absolute path.
    pub password_file: Option<String>,
    /// An environment variable holding the store's password.
    pub password_env: Option<String>,
    /// `[cluster.tls]`: how a `rediss://` store is verified and what the gateway presents.
    pub tls: Option<RawPoolTls>,
    /// This replica's name among the others. Default: the host name and the traffic port.
    pub replica_id: Option<String>,
    /// Prefix of every key the gateway writes, so several fleets can share one store.
    /// Default `breakwater`.
    pub key_prefix: Option<String>,
    /// Longest wait for one store command, milliseconds. Default 100.
    pub timeout_ms: Option<u64>,
    /// How often the allowance leased from the store is settled, milliseconds. Default 100.
    pub sync_ms: Option<u64>,
    /// How often the replica says it is alive and reports what it asks of each pool (the
    /// shards' slots are divided by it), milliseconds. Default 250.
    pub heartbeat_ms: Option<u64>,
    /// A replica not heard from for this long no longer counts, milliseconds. Default 5000.
    pub replica_ttl_ms: Option<u64>,
}

/// `[[tenants]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// Tenant id; appears in logs, metrics and the admin API.
    pub id: String,
    /// Lowercase hex SHA-256 digests of the tenant's API keys.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// `critical`, `standard` or `sheddable`. Default `standard`.
    pub priority: Option<String>,
    /// Requests per minute. Default: unlimited.
    pub rpm: Option<u64>,
    /// Tokens (estimated prompt + completion, corrected by usage) per minute. Default:
    /// unlimited.
    pub tpm: Option<u64>,
    /// The deadline of a request that brings none, milliseconds. Default: `timeouts.total_ms`.
    pub timeout_ms: Option<u64>,
}

/// `[discovery]`: how pools' `discover` names are looked up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    /// DNS servers asked, `IP:PORT` each. Default: the system's resolver configuration.
    pub nameservers: Option<Vec<String>>,
    /// How long one lookup may take, ms. Default 2000.
    pub timeout_ms: Option<u64>,
    /// While lookups fail, a pool keeps the shards last found for at most this long, ms;
    /// then they are dropped as gone. Default 900000 (15 minutes).
    pub max_stale_ms: Option<u64>,
}
