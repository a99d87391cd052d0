//! Routing policy: a directory of `*.toml` files merged into one validated [`Policy`].
//!
//! Two stages: [`raw`] mirrors the TOML (unknown keys are errors); `compile` checks
//! references, ids, URLs and numbers and builds the runtime types with defaults applied.
//! Nothing downstream re-validates. [`revision`] names a set (its Git commit or content
//! hash); [`watch`] notices changes. Swapping tables is [`crate::table`]'s and
//! [`crate::reload`]'s.

mod compile;
pub mod diff;
pub mod raw;
pub mod revision;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::proxy::request::EndpointSet;
use crate::tls::upstream::UpstreamTls;
use crate::tls::CertFiles;

/// One problem in a policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyIssue {
    /// The file it is in (its name within the directory).
    pub file: String,
    /// The key, as a path such as `shards[2].capacity_tps` (empty for a whole file).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.file.is_empty(), self.key.is_empty()) {
            (true, _) => write!(f, "{}", self.message),
            (false, true) => write!(f, "{}: {}", self.file, self.message),
            (false, false) => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The directory or a file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The files were read but the set is invalid.
    #[error("{} problem(s) in the policy set", .0.len())]
    Invalid(Vec<PolicyIssue>),
}

pub use breakwater_health::EngineKind;

/// A failure domain.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// Region id.
    pub id: String,
}

/// The shards of one region serving the same models with one engine kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Pool id.
    pub id: String,
    /// Its region.
    pub region: String,
    /// Its engine.
    pub engine: EngineKind,
    /// Models it serves.
    pub models: Vec<String>,
    /// Path the active checks `GET`.
    pub health_path: String,
    /// Path of the engine's metrics.
    pub metrics_path: String,
    /// The models' context window, tokens, when the policy declares it.
    pub context_window: Option<u64>,
    /// Client TLS for its `https://` shards (loaded from `[pools.tls]`, or the system's
    /// roots); `None` when every shard is `http://`.
    pub tls: Option<Arc<UpstreamTls>>,
    /// The endpoints its engines serve.
    pub endpoints: EndpointSet,
    /// Cache affinity.
    pub affinity: crate::routing::affinity::AffinitySettings,
    /// Where its engines are discovered, when they are.
    pub discover: Option<crate::discovery::Discover>,
}

/// One inference endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// Shard id.
    pub id: String,
    /// Its region (its pool's).
    pub region: String,
    /// Its pool.
    pub pool: String,
    /// Base URL (`http://host:port/`).
    pub url: Url,
    /// Decode capacity, tokens/s.
    pub capacity_tps: f64,
    /// Relative weight in its pool.
    pub weight: f64,
    /// The gpu-probe agent's base URL.
    pub gpu_probe: Option<Url>,
    /// Device indices the shard runs on.
    pub gpu_devices: Vec<u32>,
    /// Requests in flight on it at most (its batch slots), when declared.
    pub max_requests: Option<u64>,
}

/// What the gateway does on SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shutdown {
    /// `/readyz` answers 503 while new connections are still accepted, this long.
    pub delay: Duration,
    /// Then requests in flight have this long to finish.
    pub grace: Duration,
}

/// Bounds on what the gateway buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request body, bytes (default 8 MiB).
    pub max_body_bytes: usize,
    /// Largest non-streamed response body, bytes (default 64 MiB).
    pub max_response_bytes: usize,
    /// Request bodies held by all in-flight requests together, bytes (default 1 GiB).
    pub max_buffered_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_response_bytes: 64 << 20,
            max_buffered_bytes: 1 << 30,
        }
    }
}

/// Upstream timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// TCP connect (default 1 s).
    pub connect: Duration,
    /// Request sent → response header, or first event for a stream (default 30 s).
    pub first_byte: Duration,
    /// Longest gap between two chunks (default 30 s).
    pub idle: Duration,
    /// The whole request, attempts included (default 600 s).
    pub total: Duration,
    /// How long an idle upstream connection is kept for reuse (default 4 s: under the 5 s
    /// keep-alive of uvicorn, which serves vLLM's and SGLang's APIs).
    pub pool_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(1000),
            first_byte: Duration::from_millis(30_000),
            idle: Duration::from_millis(30_000),
            total: Duration::from_millis(600_000),
            pool_idle: Duration::from_millis(4_000),
        }
    }
}

/// Token estimation and attempt settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSettings {
    /// Completion tokens assumed without `max_tokens` (default 256).
    pub default_completion_tokens: u64,
    /// Prompt bytes per token before calibration (default 4.0).
    pub bytes_per_token: f64,
    /// Attempts per request, first included (default 3).
    pub max_attempts: u32,
    /// Healthy capacity × this covers a region's traffic before it spills (default 1.4).
    pub overprovisioning_factor: f64,
    /// Queued requests at which an engine has no headroom (default 5).
    pub saturation_queue_depth: f64,
    /// KV-cache use, 0..=1, at which an engine has no headroom (default 0.8).
    pub saturation_kv_usage: f64,
    /// Prefill speed as a multiple of a shard's `capacity_tps` (default 10).
    pub prefill_speedup: f64,
    /// Prompts of more estimated tokens than this get no retry after a first-byte
    /// timeout (default 32768).
    pub max_retry_prompt_tokens: u64,
}

/// The retry budget and backoff.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Retries in flight may be at most this share of requests in flight (default 0.2).
    pub budget_ratio: f64,
    /// Retries always allowed in flight (default 3).
    pub min_concurrent: u64,
    /// Backoff before the first retry (default 25 ms); doubles, fully jittered.
    pub backoff_base: Duration,
    /// Longest backoff (default 250 ms).
    pub backoff_max: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            budget_ratio: 0.2,
            min_concurrent: 3,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
        }
    }
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            default_completion_tokens: 256,
            bytes_per_token: 4.0,
            max_attempts: 3,
            overprovisioning_factor: 1.4,
            saturation_queue_depth: 5.0,
            saturation_kv_usage: 0.8,
            prefill_speedup: 10.0,
            max_retry_prompt_tokens: 32_768,
        }
    }
}

/// How much a request matters when the fleet is short of room: shed lowest first
/// (Google SRE's criticality, in three bands).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served first; refused only when critical traffic alone fills the fleet.
    Critical = 0,
    /// The default.
    Standard = 1,
    /// Refused first, and never queued behind a standing queue.
    Sheddable = 2,
}

impl Priority {
    /// Every priority, most important first.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Standard, Priority::Sheddable];

    /// The policy (and metric label) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::Sheddable => "sheddable",
        }
    }

    /// Parses a policy name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Position in [`Priority::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One tenant: who sends traffic, with their keys, priority and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// Tenant id.
    pub id: String,
    /// SHA-256 digests of the tenant's API keys.
    pub key_digests: Vec<[u8; 32]>,
    /// Priority.
    pub priority: Priority,
    /// Requests per minute, if limited.
    pub rpm: Option<u64>,
    /// Tokens per minute, if limited.
    pub tpm: Option<u64>,
    /// Deadline of a request that brings none.
    pub timeout: Option<Duration>,
}

/// Admission control: keys, the queue and the per-shard limits.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionSettings {
    /// Per-shard limits, queueing and shedding (default on). Off: everything is
    /// forwarded at once, as a plain proxy does.
    pub enabled: bool,
    /// Whether requests need a known API key (default false).
    pub require_api_key: bool,
    /// Priority of requests without a known key (default standard).
    pub default_priority: Priority,
    /// Longest queue wait by priority (defaults 1 s, 1 s, 500 ms; a sheddable request joins
    /// the queue only for a predicted wait within `queue_target`, and with 0 not at all).
    pub queue_timeout: [Duration; 3],
    /// Longest predicted wait a new standard request is queued for while a queue stands,
    /// and the longest whole queue a sheddable one joins. Default (`None`): sized from the
    /// fleet — the buffer that keeps its slots busy, within what keeps first tokens prompt
    /// (`admission::buffer`); [`Self::DEFAULT_QUEUE_TARGET`] until measured.
    pub queue_target: Option<Duration>,
    /// Most requests queued at once (default 1024).
    pub max_queued: usize,
    /// A shard's starting limit, as time at its capacity (default 500 ms).
    pub initial_limit: Duration,
    /// The lowest limit, as time at capacity (default 100 ms).
    pub min_limit: Duration,
    /// The highest limit, as time at capacity (default 20 s).
    pub max_limit: Duration,
    /// TTFT over baseline × this lowers a shard's limit (default 1.3).
    pub ttft_tolerance: f64,
}

impl AdmissionSettings {
    /// The queue target before the fleet has been measured, when the policy sets none.
    pub const DEFAULT_QUEUE_TARGET: Duration = Duration::from_millis(30);
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            require_api_key: false,
            default_priority: Priority::Standard,
            queue_timeout: [
                Duration::from_millis(1000),
                Duration::from_millis(1000),
                Duration::from_millis(500),
            ],
            queue_target: None,
            max_queued: 1024,
            initial_limit: Duration::from_millis(500),
            min_limit: Duration::from_millis(100),
            max_limit: Duration::from_millis(20_000),
            ttft_tolerance: 1.3,
        }
    }
}

/// Where a secret comes from: never the policy itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file holding it (its first line).
    File(PathBuf),
    /// An environment variable holding it.
    Env(String),
}

/// `[cluster]`: the store the replicas share tenant limits through, and how this replica
/// talks to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// `redis://` or `rediss://` URL, without credentials.
    pub store: Url,
    /// The ACL user, if any.
    pub username: Option<String>,
    /// Where the password is read from, if the store needs one.
    pub password: Option<SecretSource>,
    /// `[cluster.tls]` of a `rediss://` store.
    pub tls: crate::tls::upstream::PoolTlsFiles,
    /// This replica's name; `None`: host name and traffic port, found at start.
    pub replica_id: Option<String>,
    /// Prefix of every key written.
    pub key_prefix: String,
    /// Longest wait for one store command.
    pub timeout: Duration,
    /// How often leased allowance is settled with the store.
    pub sync_interval: Duration,
    /// How often this replica says it is alive and reports its demand.
    pub heartbeat: Duration,
    /// How long a replica not heard from still counts.
    pub replica_ttl: Duration,
}

/// A listener's HTTPS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// The certificate and key files.
    pub files: CertFiles,
    /// Offer HTTP/2 by ALPN.
    pub http2: bool,
}

/// `[discovery]`: how the pools' `discover` names are looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverySettings {
    /// The DNS servers asked (empty: the system's resolver configuration).
    pub nameservers: Vec<SocketAddr>,
    /// How long one lookup may take.
    pub timeout: Duration,
    /// While lookups fail, how long a pool keeps the shards last found.
    pub max_stale: Duration,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            max_stale: Duration::from_secs(900),
        }
    }
}

/// A complete, validated policy set.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// This gateway's home region.
    pub home_region: String,
    /// Traffic listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// The traffic listener's certificate (`None`: plain HTTP).
    pub tls: Option<ListenerTls>,
    /// The admin listener's certificate.
    pub admin_tls: Option<ListenerTls>,
    /// Cleartext HTTP/2 on a plain traffic listener.
    pub h2c: bool,
    /// Graceful shutdown timings.
    pub shutdown: Shutdown,
    /// Buffering bounds.
    pub limits: Limits,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// Estimation and attempts.
    pub routing: RoutingSettings,
    /// Outlier detection and active checks.
    pub health: breakwater_health::HealthConfig,
    /// Retry budget and backoff.
    pub retries: RetrySettings,
    /// Keys, queueing and shedding.
    pub admission: AdmissionSettings,
    /// The store replicas share limits through (`None`: every limit is this replica's).
    pub cluster: Option<ClusterSettings>,
    /// How pools' `discover` names are looked up.
    pub discovery: DiscoverySettings,
    /// Tenants.
    pub tenants: Vec<Tenant>,
    /// Regions in failover order.
    pub regions: Vec<Region>,
    /// Pools.
    pub pools: Vec<Pool>,
    /// Shards.
    pub shards: Vec<Shard>,
    /// The files the set came from, in merge order.
    pub files: Vec<String>,
}

impl Policy {
    /// A one-line summary for `breakwater validate` and the startup log.
    pub fn summary(&self) -> String {
        let mut models: Vec<&str> = self
            .pools
            .iter()
            .flat_map(|p| p.models.iter().map(String::as_str))
            .collect();
        models.sort_unstable();
        models.dedup();
        format!(
            "policy OK: {} region(s), {} pool(s), {} shard(s), {} model(s), home region {} ({} file(s))",
            self.regions.len(),
            self.pools.len(),
            self.shards.len(),
            models.len(),
            self.home_region,
            self.files.len()
        )
    }
}

/// Parses and compiles policy sources given as (file name, contents), merged in the order
/// given. Used by [`load_dir`] and by the demo's built-in policy.
pub fn from_sources(sources: &[(String, String)]) -> Result<Policy, PolicyError> {
    let mut issues = Vec::new();
    let mut files = Vec::new();
    for (name, text) in sources {
        match toml::from_str::<raw::RawFile>(text) {
            Ok(f) => files.push((name.clone(), f)),
            Err(e) => issues.push(PolicyIssue {
                file: name.clone(),
                key: String::new(),
                message: toml_message(text, &e),
            }),
        }
    }
    if !issues.is_empty() {
        return Err(PolicyError::Invalid(issues));
    }
    compile::compile(&files).map_err(PolicyError::Invalid)
}

/// Largest policy file read, bytes: a policy is kilobytes; a file past this is a mistake
/// (or an attack) and is refused before it is parsed.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Largest policy set read, bytes.
pub const MAX_SET_BYTES: u64 = 16 << 20;

/// Reads every `*.toml` file in `dir` (sorted by name; subdirectories and dot-files
/// ignored; symbolic links followed, as Kubernetes ConfigMaps and git-sync use them) as
/// (file name, contents). A file that cannot be read, is not UTF-8, is empty or is too
/// large is an error: a half-written or broken file must not pass for a smaller policy.
pub fn read_sources(dir: &Path) -> Result<Vec<(String, String)>, PolicyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyError::Io { path, source }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| !n.starts_with('.') && n.ends_with(".toml")) && !p.is_dir()
        })
        .collect();
    paths.sort();
    let mut sources = Vec::with_capacity(paths.len());
    let mut total = 0;
    let mut issues = Vec::new();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let issue = |message: String| PolicyIssue {
            file: name.clone(),
            key: String::new(),
            message,
        };
        let size = std::fs::metadata(&p).map_err(io(&p))?.len();
        total += size;
        if size > MAX_FILE_BYTES {
            issues.push(issue(format!(
                "the file is {size} bytes; a policy file may have at most {MAX_FILE_BYTES}"
            )));
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(io(&p))?;
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            issues.push(issue("the file is empty (a policy file that says nothing is a mistake, or a write still in progress)".into()));
        }
        sources.push((name, text));
    }
    if total > MAX_SET_BYTES {
        issues.push(PolicyIssue {
            file: String::new(),
            key: String::new(),
            message: format!("the set is {total} bytes; at most {MAX_SET_BYTES} are read"),
        });
    }
    if !issues.is_empty() {
        return Err(PolicyError::Invalid(issues));
    }
    Ok(sources)
}

/// Reads and compiles the policy set in `dir` (see [`read_sources`]).
pub fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
    from_sources(&read_sources(dir)?)
}

/// A TOML error on one line: `line L, column C: message`.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[gateway]
home_region = "east"

[[regions]]
id = "east"
[[regions]]
id = "west"

[[pools]]
id = "p-east"
region = "east"
engine = "vllm"
models = ["llama"]

[[shards]]
id = "e1"
pool = "p-east"
url = "http://127.0.0.1:9001"
capacity_tps = 1000
"#;

    fn one(text: &str) -> Result<Policy, PolicyError> {
        from_sources(&[("a.toml".into(), text.into())])
    }

    fn issues(r: Result<Policy, PolicyError>) -> Vec<String> {
        match r {
            Err(PolicyError::Invalid(i)) => i.iter().map(ToString::to_string).collect(),
            other => panic!("expected issues, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_set_compiles_with_defaults() {
        let p = one(BASE).unwrap();
        assert_eq!(p.home_region, "east");
        assert_eq!(p.limits.max_body_bytes, 8 << 20);
        assert_eq!(p.timeouts.connect, Duration::from_secs(1));
        assert_eq!(p.timeouts.pool_idle, Duration::from_secs(4));
        assert_eq!(p.shards[0].region, "east");
        assert_eq!(p.shards[0].weight, 1.0);
        assert_eq!(p.regions.len(), 2);
        assert!(p
            .summary()
            .starts_with("policy OK: 2 region(s), 1 pool(s), 1 shard(s)"));
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let text = BASE.replace(
            "capacity_tps = 1000",
            "capacity_tps = 1000\ncapacity_tsp = 5",
        );
        let i = issues(one(&text));
        assert_eq!(i.len(), 1);
        assert!(i[0].contains("a.toml: line "), "{}", i[0]);
        assert!(i[0].contains("capacity_tsp"), "{}", i[0]);
    }

    #[test]
    fn dangling_references_and_duplicates_name_file_and_key() {
        let extra = r#"
[[shards]]
id = "e1"
pool = "p-east"
url = "http://127.0.0.1:9002"
capacity_tps = 10

[[shards]]
id = "e2"
pool = "nowhere"
url = "http://127.0.0.1:9003"
capacity_tps = 10

[[pools]]
id = "p-mars"
region = "mars"
models = ["llama"]
"#;
        let i = issues(from_sources(&[
            ("a.toml".into(), BASE.into()),
            ("b.toml".into(), extra.into()),
        ]));
        assert!(
            i.iter().any(|s| s
                .starts_with("b.toml: shards[0].id: duplicate shard id \"e1\" (first in a.toml)")),
            "{i:?}"
        );
        assert!(
            i.iter().any(|s| s.starts_with("b.toml: shards[1].pool:")),
            "{i:?}"
        );
        assert!(
            i.iter().any(|s| s.starts_with("b.toml: pools[0].region:")),
            "{i:?}"
        );
    }

    #[test]
    fn bad_urls_and_numbers_are_errors() {
        for (from, to, key) in [
            (
                "url = \"http://127.0.0.1:9001\"",
                "url = \"ftp://x\"",
                "shards[0].url",
            ),
            (
                "url = \"http://127.0.0.1:9001\"",
                "url = \"http://127.0.0.1:9001/v1\"",
                "shards[0].url",
            ),
            (
                "url = \"http://127.0.0.1:9001\"",
                "url = \"not a url\"",
                "shards[0].url",
            ),
            (
                "capacity_tps = 1000",
                "capacity_tps = 0",
                "shards[0].capacity_tps",
            ),
            (
                "capacity_tps = 1000",
                "capacity_tps = -5",
                "shards[0].capacity_tps",
            ),
            (
                "capacity_tps = 1000",
                "capacity_tps = 1000\nweight = 0",
                "shards[0].weight",
            ),
            ("engine = \"vllm\"", "engine = \"vllmm\"", "pools[0].engine"),
            (
                "home_region = \"east\"",
                "home_region = \"north\"",
                "gateway.home_region",
            ),
            (
                "home_region = \"east\"",
                "home_region = \"east\"\nlisten = \"localhost\"",
                "gateway.listen",
            ),
            ("id = \"e1\"", "id = \"e 1\"", "shards[0].id"),
        ] {
            let text = BASE.replace(from, to);
            let i = issues(one(&text));
            assert!(
                i.iter().any(|s| s.starts_with(&format!("a.toml: {key}:"))),
                "{to}: {i:?}"
            );
        }
        let text = format!("{BASE}\n[timeouts]\nconnect_ms = 5000\ntotal_ms = 1000\n");
        let i = issues(one(&text));
        assert!(i.iter().any(|s| s.contains("timeouts.connect_ms")), "{i:?}");
        let text = format!("{BASE}\n[timeouts]\npool_idle_ms = 0\n");
        let i = issues(one(&text));
        assert!(
            i.iter().any(|s| s.contains("timeouts.pool_idle_ms")),
            "{i:?}"
        );
        // Not a request timeout: it may outlast total_ms.
        let text = format!("{BASE}\n[timeouts]\npool_idle_ms = 90000\nfirst_byte_ms = 500\nidle_ms = 500\ntotal_ms = 1000\n");
        assert_eq!(
            one(&text).unwrap().timeouts.pool_idle,
            Duration::from_secs(90)
        );
        let text = format!("{BASE}\n[limits]\nmax_body_bytes = 10\n");
        assert!(issues(one(&text))
            .iter()
            .any(|s| s.contains("limits.max_body_bytes")));
    }

    #[test]
    fn singleton_sections_may_appear_once_and_gateway_is_required() {
        let i = issues(from_sources(&[
            ("a.toml".into(), BASE.into()),
            (
                "b.toml".into(),
                "[gateway]\nhome_region = \"west\"\n".into(),
            ),
        ]));
        assert!(
            i.iter()
                .any(|s| s.contains("b.toml: gateway: [gateway] is already set in a.toml")),
            "{i:?}"
        );
        let no_gw = BASE.replace("[gateway]\nhome_region = \"east\"\n", "");
        assert!(issues(one(&no_gw))
            .iter()
            .any(|s| s.contains("[gateway] section")));
        assert!(issues(from_sources(&[]))
            .iter()
            .any(|s| s.contains("no policy files")));
    }

    #[test]
    fn tenants_and_admission_compile_with_defaults() {
        let digest = "a".repeat(64);
        let text = format!(
            "{BASE}\n[admission]\nrequire_api_key = true\nqueue_timeout_ms = 400\n\n\
             [[tenants]]\nid = \"acme\"\napi_key_sha256 = [\"{digest}\"]\npriority = \"critical\"\nrpm = 60\ntimeout_ms = 5000\n\n\
             [[tenants]]\nid = \"batch\"\n"
        );
        let p = one(&text).unwrap();
        assert!(p.admission.enabled && p.admission.require_api_key);
        assert_eq!(
            p.admission.queue_timeout,
            [
                Duration::from_millis(400),
                Duration::from_millis(400),
                Duration::from_millis(500)
            ]
        );
        assert_eq!(p.tenants.len(), 2);
        let acme = &p.tenants[0];
        assert_eq!(
            (acme.priority, acme.rpm, acme.tpm),
            (Priority::Critical, Some(60), None)
        );
        assert_eq!(acme.key_digests, vec![[0xaa; 32]]);
        assert_eq!(acme.timeout, Some(Duration::from_secs(5)));
        assert_eq!(p.tenants[1].priority, Priority::Standard);
        let defaults = one(BASE).unwrap();
        assert_eq!(defaults.admission, AdmissionSettings::default());
        assert!(defaults.tenants.is_empty());
    }

    #[test]
    fn bad_tenants_and_admission_settings_name_file_and_key() {
        let tenant = |body: &str| format!("{BASE}\n[[tenants]]\nid = \"t\"\n{body}\n");
        let good = "b".repeat(64);
        for (text, key, needle) in [
            (
                tenant("api_key_sha256 = [\"sk-raw-key\"]"),
                "tenants[0].api_key_sha256[0]",
                "never the key itself",
            ),
            (
                tenant(&format!("api_key_sha256 = [\"{}\"]", "B".repeat(64))),
                "tenants[0].api_key_sha256[0]",
                "lowercase hex",
            ),
            (
                tenant(&format!("api_key_sha256 = [\"{}\"]", "b".repeat(63))),
                "tenants[0].api_key_sha256[0]",
                "64",
            ),
            (
                tenant(&format!("api_key_sha256 = [\"{good}\", \"{good}\"]")),
                "tenants[0].api_key_sha256[1]",
                "already belongs",
            ),
            (
                tenant("priority = \"urgent\""),
                "tenants[0].priority",
                "unknown priority",
            ),
            (tenant("rpm = 0"), "tenants[0].rpm", "must be within"),
            (
                format!("{BASE}\n[[tenants]]\nid = \"t\"\n[[tenants]]\nid = \"t\"\n"),
                "tenants[1].id",
                "duplicate tenant id",
            ),
            (
                format!("{BASE}\n[admission]\nrequire_api_key = true\n"),
                "admission.require_api_key",
                "no [[tenants]] entry",
            ),
            (
                format!("{BASE}\n[admission]\ndefault_priority = \"low\"\n"),
                "admission.default_priority",
                "unknown priority",
            ),
            (
                format!("{BASE}\n[admission]\nmin_limit_ms = 900\n"),
                "admission.initial_limit_ms",
                "must hold",
            ),
            (
                format!("{BASE}\n[admission]\nttft_tolerance_percent = 100\n"),
                "admission.ttft_tolerance_percent",
                "must be within",
            ),
            (
                format!("{BASE}\n[admission]\nqueue_timout_ms = 5\n"),
                "",
                "queue_timout_ms",
            ),
            (
                BASE.replace(
                    "models = [\"llama\"]",
                    "models = [\"llama\"]\ncontext_window = 8",
                ),
                "pools[0].context_window",
                "must be within",
            ),
            (
                format!("{BASE}\n[routing]\nprefill_speedup = 0\n"),
                "routing.prefill_speedup",
                "must be within",
            ),
        ] {
            let i = issues(one(&text));
            assert!(
                i.iter().any(|s| s.contains(key) && s.contains(needle)),
                "{key} / {needle}: {i:?}"
            );
        }
    }

    #[test]
    fn one_pool_per_model_and_region() {
        let text =
            format!("{BASE}\n[[pools]]\nid = \"p2\"\nregion = \"east\"\nmodels = [\"llama\"]\n");
        assert!(issues(one(&text))
            .iter()
            .any(|s| s.contains("pools[1].models[0]")));
    }

    /// A CA certificate and a server pair (for `localhost`) written to `dir`.
    fn tls_files(dir: &Path) -> (String, String, String) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let s = |p: PathBuf| p.display().to_string();
        (s(cert.clone()), s(key), s(cert))
    }

    #[test]
    fn tls_sections_compile_and_name_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca) = tls_files(dir.path());
        let text = BASE
            .replace(
                "home_region = \"east\"",
                &format!(
                    "home_region = \"east\"\nh2c = true\n[gateway.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
                     [gateway.admin_tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nhttp2 = false\n"
                ),
            )
            .replace(
                "models = [\"llama\"]",
                &format!("models = [\"llama\"]\n[pools.tls]\nca_file = {ca:?}\nclient_cert_file = {cert:?}\nclient_key_file = {key:?}\n"),
            )
            .replace("http://127.0.0.1:9001", "https://localhost:9001");
        let p = one(&text).unwrap();
        let tls = p.tls.as_ref().unwrap();
        assert_eq!(tls.files.cert_file, PathBuf::from(&cert));
        assert!(tls.http2);
        assert!(!p.admin_tls.as_ref().unwrap().http2);
        assert!(p.h2c);
        let upstream = p.pools[0].tls.as_ref().unwrap();
        assert_eq!(upstream.files().ca_file, Some(PathBuf::from(&ca)));
        assert!(upstream.has_client_cert());
        // An https:// shard in a pool without [pools.tls] trusts the system's roots.
        let system = one(&BASE.replace("http://127.0.0.1:9001", "https://localhost:9001")).unwrap();
        let upstream = system.pools[0].tls.as_ref().unwrap();
        assert_eq!(upstream.files().ca_file, None);
        assert!(!upstream.has_client_cert());
        // A plain policy has no TLS anywhere.
        let plain = one(BASE).unwrap();
        assert!(plain.tls.is_none() && plain.pools[0].tls.is_none() && !plain.h2c);
    }

    #[test]
    fn tls_mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca) = tls_files(dir.path());
        let missing = dir.path().join("missing.pem").display().to_string();
        let gateway = |tls: &str| {
            BASE.replace(
                "home_region = \"east\"",
                &format!("home_region = \"east\"\n{tls}"),
            )
        };
        let pool = |tls: &str, url: &str| {
            BASE.replace(
                "models = [\"llama\"]",
                &format!("models = [\"llama\"]\n{tls}"),
            )
            .replace("http://127.0.0.1:9001", url)
        };
        let cases = [
            (
                gateway("[gateway.tls]\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\""),
                "gateway.tls.cert_file: \"tls.crt\" must be an absolute path",
            ),
            (
                gateway(&format!(
                    "[gateway.tls]\ncert_file = {missing:?}\nkey_file = {key:?}"
                )),
                "gateway.tls: cannot read",
            ),
            (
                gateway(&format!(
                    "[gateway.tls]\ncert_file = {key:?}\nkey_file = {key:?}"
                )),
                "no certificate",
            ),
            (
                gateway(&format!(
                    "[gateway.admin_tls]\ncert_file = {cert:?}\nkey_file = {cert:?}"
                )),
                "gateway.admin_tls: ",
            ),
            (
                pool(
                    &format!("[pools.tls]\nca_file = {ca:?}"),
                    "http://127.0.0.1:9001",
                ),
                "the pool has [pools.tls] but shard \"e1\" is http://127.0.0.1:9001/; use https://",
            ),
            (
                pool(
                    &format!("[pools.tls]\nca_file = {missing:?}"),
                    "https://localhost:9001",
                ),
                "pools[0].tls: cannot read",
            ),
            (
                pool(
                    &format!("[pools.tls]\nclient_cert_file = {cert:?}"),
                    "https://localhost:9001",
                ),
                "client_cert_file and client_key_file go together",
            ),
            (
                pool("", "ftp://127.0.0.1:9001"),
                "the scheme must be http:// or https://",
            ),
            (
                BASE.replace(
                    "capacity_tps = 1000",
                    "capacity_tps = 1000\ngpu_probe = \"https://127.0.0.1:9400\"",
                ),
                "the gpu-probe agent speaks http://",
            ),
        ];
        for (text, want) in cases {
            let got = issues(one(&text));
            assert!(
                got.iter().any(|i| i.contains(want)),
                "want {want:?} in {got:?}"
            );
        }
    }

    #[test]
    fn pool_endpoint_lists_are_checked() {
        use crate::proxy::request::Endpoint;
        let listed = BASE.replace(
            "models = [\"llama\"]",
            "models = [\"llama\"]\nendpoints = [\"chat\", \"audio_transcriptions\"]",
        );
        let p = one(&listed).unwrap();
        let e = p.pools[0].endpoints;
        assert!(e.contains(Endpoint::ChatCompletions) && e.contains(Endpoint::AudioTranscriptions));
        assert!(!e.contains(Endpoint::Embeddings));
        assert!(one(BASE).unwrap().pools[0]
            .endpoints
            .contains(Endpoint::Responses));
        let got = issues(one(&BASE.replace(
            "models = [\"llama\"]",
            "models = [\"llama\"]\nendpoints = [\"chat\", \"speech\"]",
        )));
        assert!(
            got.iter()
                .any(|i| i.contains("unknown endpoint \"speech\"")),
            "{got:?}"
        );
        let got = issues(one(&BASE.replace(
            "models = [\"llama\"]",
            "models = [\"llama\"]\nendpoints = []",
        )));
        assert!(
            got.iter().any(|i| i.contains("at least one endpoint")),
            "{got:?}"
        );
        // Two regions' pools for one model must agree.
        let west = format!(
            "{listed}\n[[pools]]\nid = \"p-west\"\nregion = \"west\"\nmodels = [\"llama\"]\n"
        );
        let got = issues(one(&west));
        assert!(
            got.iter().any(|i| i.contains("list different endpoints")),
            "{got:?}"
        );
    }

    #[test]
    fn affinity_settings_compile_and_mistakes_are_named() {
        use crate::routing::affinity::AffinityMode;
        let with = |keys: &str| {
            BASE.replace(
                "models = [\"llama\"]",
                &format!("models = [\"llama\"]\n{keys}"),
            )
        };
        let p = one(&with(
            "affinity = \"prefix\"\naffinity_block_bytes = 512\naffinity_header = \"X-Session-Id\"\naffinity_max_load = 2.0",
        ))
        .unwrap();
        let a = &p.pools[0].affinity;
        assert_eq!(a.mode, AffinityMode::Prefix);
        assert_eq!(a.block_bytes, 512);
        assert_eq!(a.header.as_ref().map(|h| h.as_str()), Some("x-session-id"));
        assert_eq!(a.max_load, 2.0);
        assert_eq!(
            one(BASE).unwrap().pools[0].affinity.mode,
            AffinityMode::None
        );
        for (keys, want) in [
            ("affinity = \"sticky\"", "unknown affinity \"sticky\""),
            ("affinity_block_bytes = 4", "affinity_block_bytes"),
            ("affinity_max_load = 0.5", "affinity_max_load"),
            ("affinity_header = \"bad header\"", "not a header name"),
        ] {
            let got = issues(one(&with(keys)));
            assert!(got.iter().any(|i| i.contains(want)), "{keys}: {got:?}");
        }
        let west = format!(
            "{}\n[[pools]]\nid = \"p-west\"\nregion = \"west\"\nmodels = [\"llama\"]\n",
            with("affinity = \"session\"")
        );
        let got = issues(one(&west));
        assert!(
            got.iter()
                .any(|i| i.contains("different affinity settings")),
            "{got:?}"
        );
    }

    #[test]
    fn a_cluster_section_compiles_with_defaults() {
        assert_eq!(one(BASE).unwrap().cluster, None);
        let text = format!(
            "{BASE}\n[cluster]\nstore = \"redis://10.0.0.5:6379/2\"\npassword_env = \"REDIS_PW\"\n"
        );
        let c = one(&text).unwrap().cluster.unwrap();
        assert_eq!(c.store.as_str(), "redis://10.0.0.5:6379/2");
        assert_eq!(c.password, Some(SecretSource::Env("REDIS_PW".into())));
        assert_eq!(c.replica_id, None);
        assert_eq!(c.key_prefix, "breakwater");
        assert_eq!(c.timeout, Duration::from_millis(100));
        assert_eq!(c.sync_interval, Duration::from_millis(100));
        assert_eq!(c.heartbeat, Duration::from_millis(100));
        assert_eq!(c.replica_ttl, Duration::from_secs(5));
    }

    /// BASE with a second pool, in region west, that discovers its shards.
    fn discovered(keys: &str) -> String {
        format!(
            "{BASE}\n[[pools]]\nid = \"p-west\"\nregion = \"west\"\nmodels = [\"llama\"]\n{keys}\n"
        )
    }

    #[test]
    fn a_discovered_pool_compiles_with_its_defaults_and_the_discovery_section() {
        let p = one(&format!(
            "{}\n[discovery]\nnameservers = [\"127.0.0.1:5353\", \"[::1]:53\"]\ntimeout_ms = 500\n",
            discovered("discover = \"dns+srv://_http._tcp.vllm.svc\"\ncapacity_tps = 800\nmax_requests = 32\ngpu_probe = \"http://{ip}:9400\"\ndiscover_max_ms = 10000")
        ))
        .unwrap();
        let d = p.pools[1].discover.as_ref().unwrap();
        assert_eq!(d.target.to_string(), "dns+srv://_http._tcp.vllm.svc");
        assert_eq!(
            (d.scheme.as_str(), d.capacity_tps, d.weight),
            ("http", 800.0, 1.0)
        );
        assert_eq!(d.max_requests, Some(32));
        assert_eq!(d.min_interval, Duration::from_secs(1));
        assert_eq!(d.max_interval, Duration::from_secs(10));
        assert_eq!(p.discovery.nameservers.len(), 2);
        assert_eq!(p.discovery.timeout, Duration::from_millis(500));
        assert_eq!(p.discovery.max_stale, Duration::from_secs(900));
        assert!(p.pools[0].discover.is_none());
        // A pool with no shard yet is valid: its shards come from DNS.
        assert_eq!(p.shards.len(), 1);
    }

    #[test]
    fn discovery_mistakes_are_named() {
        let bad = |keys: &str| issues(one(&discovered(keys)));
        let has = |i: &[String], key: &str| i.iter().any(|m| m.contains(key));
        let i = bad("discover = \"vllm.svc:8000\"\ncapacity_tps = 10");
        assert!(
            has(&i, "pools[1].discover") && has(&i, "dns://NAME:PORT"),
            "{i:?}"
        );
        let i = bad("discover = \"dns://vllm.svc\"\ncapacity_tps = 10");
        assert!(has(&i, "needs the engines' port"), "{i:?}");
        let i = bad("discover = \"dns://vllm.svc:8000\"");
        assert!(has(&i, "pools[1].capacity_tps"), "{i:?}");
        let i = bad("discover = \"dns://vllm.svc:8000\"\ncapacity_tps = 10\nscheme = \"ftp\"");
        assert!(has(&i, "pools[1].scheme"), "{i:?}");
        let i = bad("discover = \"dns://vllm.svc:8000\"\ncapacity_tps = 10\ngpu_probe = \"http://10.0.0.1:9400\"");
        assert!(has(&i, "pools[1].gpu_probe") && has(&i, "{ip}"), "{i:?}");
        let i = bad("discover = \"dns://vllm.svc:8000\"\ncapacity_tps = 10\ndiscover_min_ms = 5000\ndiscover_max_ms = 1000");
        assert!(has(&i, "pools[1].discover_max_ms"), "{i:?}");
        let i = bad("discover = \"dns://vllm.svc:8000\"\ncapacity_tps = 10\ndiscover_min_ms = 5");
        assert!(has(&i, "pools[1].discover_min_ms"), "{i:?}");
        let i = bad("discover = \"dns://vllm.svc:8000\"\ncapacity_tps = -1\nweight = 0");
        assert!(
            has(&i, "pools[1].capacity_tps") && has(&i, "pools[1].weight"),
            "{i:?}"
        );
        // The shards' keys without discover belong on [[shards]].
        let i = bad("capacity_tps = 10\nmax_requests = 4");
        assert!(
            has(&i, "pools[1].capacity_tps") && has(&i, "pools[1].max_requests"),
            "{i:?}"
        );
        let i = issues(one(&format!(
            "{BASE}\n[discovery]\nnameservers = [\"10.0.0.1\"]\n"
        )));
        assert!(has(&i, "discovery.nameservers[0]"), "{i:?}");
        let i = issues(one(&format!("{BASE}\n[discovery]\nresolver = \"x\"\n")));
        assert!(has(&i, "resolver"), "{i:?}");
    }

    #[test]
    fn discovered_addresses_become_shards_and_a_static_shard_keeps_its_own() {
        let p = one(&format!(
            "{}\n[[shards]]\nid = \"w-static\"\npool = \"p-west\"\nurl = \"http://10.0.0.2:8000\"\ncapacity_tps = 5\n",
            discovered("discover = \"dns://vllm.svc:8000\"\ncapacity_tps = 700\nweight = 2")
        ))
        .unwrap();
        let mut found = crate::discovery::Discovered::new();
        found.insert(
            "p-west".into(),
            vec![
                "10.0.0.1:8000".parse().unwrap(),
                "10.0.0.2:8000".parse().unwrap(),
            ],
        );
        // A pool that does not discover is left alone whatever is found for it.
        found.insert("p-east".into(), vec!["10.9.9.9:8000".parse().unwrap()]);
        let full = crate::discovery::with_discovered(&p, &found);
        let ids: Vec<&str> = full.shards.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["e1", "w-static", "p-west@10.0.0.1:8000"]);
        let s = &full.shards[2];
        assert_eq!(
            (s.region.as_str(), s.capacity_tps, s.weight),
            ("west", 700.0, 2.0)
        );
        assert_eq!(
            crate::discovery::with_discovered(&p, &Default::default()),
            p
        );
    }

    #[test]
    fn cluster_mistakes_are_named_and_no_password_is_repeated() {
        let bad = |cluster: &str| issues(one(&format!("{BASE}\n[cluster]\n{cluster}\n")));
        let i = bad("store = \"redis://:hunter2@10.0.0.5:6379\"");
        assert!(
            i.iter()
                .any(|m| m.contains("cluster.store") && m.contains("credentials")),
            "{i:?}"
        );
        assert!(i.iter().all(|m| !m.contains("hunter2")), "{i:?}");
        let i = bad("store = \"http://:hunter2@10.0.0.5:6379\"");
        assert!(i.iter().any(|m| m.contains("cluster.store")), "{i:?}");
        assert!(i.iter().all(|m| !m.contains("hunter2")), "{i:?}");
        let i =
            bad("store = \"redis://r:6379\"\npassword_env = \"A\"\npassword_file = \"/run/pw\"");
        assert!(
            i.iter().any(|m| m.contains("cluster.password_file")),
            "{i:?}"
        );
        let i = bad("store = \"redis://r:6379\"\npassword_file = \"pw.txt\"");
        assert!(i.iter().any(|m| m.contains("absolute")), "{i:?}");
        let i = bad("store = \"redis://r:6379\"\n[cluster.tls]\nca_file = \"/etc/ca.pem\"");
        assert!(i.iter().any(|m| m.contains("rediss://")), "{i:?}");
        let i = bad("store = \"redis://r:6379\"\nheartbeat_ms = 1000\nreplica_ttl_ms = 1500");
        assert!(
            i.iter().any(|m| m.contains("cluster.replica_ttl_ms")),
            "{i:?}"
        );
        let i = bad("store = \"redis://r:6379\"\nkey_prefix = \"a b\"\nreplica_id = \"x/y\"");
        assert!(i.iter().any(|m| m.contains("cluster.key_prefix")), "{i:?}");
        assert!(i.iter().any(|m| m.contains("cluster.replica_id")), "{i:?}");
        let i = bad("store = \"redis://r:6379\"\nsync_ms = 0");
        assert!(i.iter().any(|m| m.contains("cluster.sync_ms")), "{i:?}");
    }

    #[test]
    fn a_shard_may_declare_its_batch_slots() {
        let slots = |v: &str| {
            BASE.replace(
                "capacity_tps = 1000",
                &format!("capacity_tps = 1000\nmax_requests = {v}"),
            )
        };
        assert_eq!(one(&slots("16")).unwrap().shards[0].max_requests, Some(16));
        assert_eq!(one(BASE).unwrap().shards[0].max_requests, None);
        let got = issues(one(&slots("0")));
        assert!(got.iter().any(|i| i.contains("max_requests")), "{got:?}");
    }
}
