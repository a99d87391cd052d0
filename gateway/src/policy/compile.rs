//! Raw policy files → one validated [`Policy`]. Every problem is collected (not just the
//! first), each naming its file and key, so `breakwater validate` can list them all.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::raw::{
    RawAdmission, RawCluster, RawDiscovery, RawListenerTls, RawPool, RawPoolTls, RawTenant,
};
use super::raw::{
    RawFile, RawGateway, RawHealth, RawLimits, RawRetries, RawRouting, RawShard, RawTimeouts,
};
use super::{
    AdmissionSettings, ClusterSettings, DiscoverySettings, EngineKind, Limits, ListenerTls, Policy,
    PolicyIssue, Pool, Priority, Region, RetrySettings, RoutingSettings, SecretSource, Shard,
    Shutdown, Tenant, Timeouts,
};
use crate::discovery::{Discover, DiscoverTarget};
use crate::proxy::request::{Endpoint, EndpointSet};
use crate::routing::affinity::{AffinityMode, AffinitySettings};
use crate::tls::upstream::{PoolTlsFiles, UpstreamTls};
use crate::tls::CertFiles;

/// Compiles parsed files (name, contents) into one policy, or every problem found.
pub fn compile(files: &[(String, RawFile)]) -> Result<Policy, Vec<PolicyIssue>> {
    let mut c = Compiler::default();
    c.run(files);
    match (c.issues.is_empty(), c.policy) {
        (true, Some(policy)) => Ok(policy),
        _ => Err(c.issues),
    }
}

#[derive(Default)]
struct Compiler {
    issues: Vec<PolicyIssue>,
    policy: Option<Policy>,
    /// Each pool's `[pools.tls]` (file, key prefix, files), settled once its shards are known.
    pool_tls: HashMap<String, (String, String, PoolTlsFiles)>,
}

impl Compiler {
    fn issue(&mut self, file: &str, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(PolicyIssue {
            file: file.to_string(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Takes a singleton section from at most one file; a second one is an issue.
    fn singleton<'a, T>(
        &mut self,
        files: &'a [(String, RawFile)],
        section: &str,
        get: impl Fn(&'a RawFile) -> Option<&'a T>,
    ) -> Option<(&'a str, &'a T)> {
        let mut found: Option<(&str, &T)> = None;
        for (name, file) in files {
            if let Some(value) = get(file) {
                match found {
                    None => found = Some((name, value)),
                    Some((first, _)) => self.issue(
                        name,
                        section,
                        format!("[{section}] is already set in {first}; it may appear once"),
                    ),
                }
            }
        }
        found
    }

    fn check_id(&mut self, file: &str, key: &str, id: &str) -> bool {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.issue(
                file,
                key,
                format!("id {id:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"),
            );
        }
        ok
    }

    fn run(&mut self, files: &[(String, RawFile)]) {
        if files.is_empty() {
            self.issue("", "", "no policy files (*.toml) found");
            return;
        }
        let gateway = self.singleton(files, "gateway", |f| f.gateway.as_ref());
        let limits = self.singleton(files, "limits", |f| f.limits.as_ref());
        let timeouts = self.singleton(files, "timeouts", |f| f.timeouts.as_ref());
        let routing = self.singleton(files, "routing", |f| f.routing.as_ref());
        let health = self.singleton(files, "health", |f| f.health.as_ref());
        let retries = self.singleton(files, "retries", |f| f.retries.as_ref());
        let admission = self.singleton(files, "admission", |f| f.admission.as_ref());
        let cluster = self.singleton(files, "cluster", |f| f.cluster.as_ref());
        let discovery = self.singleton(files, "discovery", |f| f.discovery.as_ref());

        let (regions, region_file) = self.regions(files);
        let mut pools = self.pools(files, &region_file);
        self.same_endpoints_per_model(files, &pools);
        let shards = self.shards(files, &pools);
        self.upstream_tls(&mut pools, &shards);
        let Some((gw_file, gw)) = gateway else {
            self.issue(
                &files[0].0,
                "gateway",
                "a [gateway] section with home_region is required",
            );
            return;
        };
        let (listen, admin_listen, shutdown) = self.gateway(gw_file, gw, &region_file);
        let tls = gw
            .tls
            .as_ref()
            .and_then(|t| self.listener_tls(gw_file, "gateway.tls", t));
        let admin_tls = gw
            .admin_tls
            .as_ref()
            .and_then(|t| self.listener_tls(gw_file, "gateway.admin_tls", t));
        let limits_section = limits.map(|(f, l)| self.limits(f, l)).unwrap_or_default();
        let timeouts_section = timeouts
            .map(|(f, t)| self.timeouts(f, t))
            .unwrap_or_default();
        let routing_section = routing.map(|(f, r)| self.routing(f, r)).unwrap_or_default();
        let health_section = health.map(|(f, h)| self.health(f, h)).unwrap_or_default();
        let retries_section = retries.map(|(f, r)| self.retries(f, r)).unwrap_or_default();
        let adm = match admission {
            Some((f, raw)) => self.admission(f, raw),
            None => AdmissionSettings::default(),
        };
        let tenants = self.tenants(files, &adm, admission.map(|(f, _)| f));
        let cluster = cluster.and_then(|(f, raw)| self.cluster(f, raw));
        let discovery = discovery.map_or_else(Default::default, |(f, raw)| self.discovery(f, raw));

        self.policy = Some(Policy {
            home_region: gw.home_region.clone(),
            listen,
            admin_listen,
            tls,
            admin_tls,
            h2c: gw.h2c.unwrap_or(false),
            shutdown,
            limits: limits_section,
            timeouts: timeouts_section,
            routing: routing_section,
            health: health_section,
            retries: retries_section,
            admission: adm,
            cluster,
            discovery,
            tenants,
            regions,
            pools,
            shards,
            files: files.iter().map(|(n, _)| n.clone()).collect(),
        });
    }

    /// `[[regions]]`, in failover order (file name order, then position in the file), and
    /// the file each was defined in.
    fn regions(&mut self, files: &[(String, RawFile)]) -> (Vec<Region>, HashMap<String, String>) {
        let mut regions: Vec<Region> = Vec::new();
        let mut region_file: HashMap<String, String> = HashMap::new();
        for (name, file) in files {
            for (i, r) in file.regions.iter().enumerate() {
                let key = format!("regions[{i}].id");
                if !self.check_id(name, &key, &r.id) {
                    continue;
                }
                if let Some(first) = region_file.get(&r.id) {
                    let msg = format!("duplicate region id {:?} (first in {first})", r.id);
                    self.issue(name, key, msg);
                    continue;
                }
                region_file.insert(r.id.clone(), name.clone());
                regions.push(Region { id: r.id.clone() });
            }
        }
        if regions.is_empty() {
            self.issue(
                &files[0].0,
                "regions",
                "at least one [[regions]] entry is required",
            );
        }

        (regions, region_file)
    }

    /// `[[pools]]`.
    fn pools(
        &mut self,
        files: &[(String, RawFile)],
        region_file: &HashMap<String, String>,
    ) -> Vec<Pool> {
        let mut pools: Vec<Pool> = Vec::new();
        let mut pool_file: HashMap<String, String> = HashMap::new();
        let mut served: HashMap<(String, String), String> = HashMap::new();
        for (name, file) in files {
            for (i, p) in file.pools.iter().enumerate() {
                let at = |k: &str| format!("pools[{i}].{k}");
                if !self.check_id(name, &at("id"), &p.id) {
                    continue;
                }
                if let Some(first) = pool_file.get(&p.id) {
                    let msg = format!("duplicate pool id {:?} (first in {first})", p.id);
                    self.issue(name, at("id"), msg);
                    continue;
                }
                pool_file.insert(p.id.clone(), name.clone());
                if !region_file.contains_key(&p.region) {
                    let msg = format!(
                        "pool {:?} names region {:?}, which no file defines",
                        p.id, p.region
                    );
                    self.issue(name, at("region"), msg);
                }
                let engine = match p.engine.as_deref() {
                    None => EngineKind::Generic,
                    Some(kind) => match EngineKind::parse(kind) {
                        Some(e) => e,
                        None => {
                            let msg = format!(
                                "unknown engine {kind:?}; expected one of {}",
                                EngineKind::ALL.map(EngineKind::as_str).join(", ")
                            );
                            self.issue(name, at("engine"), msg);
                            EngineKind::Generic
                        }
                    },
                };
                if p.models.is_empty() {
                    self.issue(name, at("models"), "a pool must serve at least one model");
                }
                for (j, m) in p.models.iter().enumerate() {
                    if m.is_empty() || m.len() > 256 {
                        self.issue(
                            name,
                            format!("pools[{i}].models[{j}]"),
                            "a model name is 1-256 characters",
                        );
                        continue;
                    }
                    let k = (p.region.clone(), m.clone());
                    if let Some(other) = served.get(&k) {
                        let msg = format!(
                            "model {m:?} is already served in region {:?} by pool {other:?}; one pool per model and region",
                            p.region
                        );
                        self.issue(name, format!("pools[{i}].models[{j}]"), msg);
                    } else {
                        served.insert(k, p.id.clone());
                    }
                }
                let health_path = match &p.health_path {
                    Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                        path.clone()
                    }
                    Some(path) => {
                        self.issue(
                            name,
                            at("health_path"),
                            format!("{path:?} must be a path starting with '/'"),
                        );
                        String::new()
                    }
                    None => engine.default_health_path().to_string(),
                };
                let metrics_path = match &p.metrics_path {
                    Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                        path.clone()
                    }
                    Some(path) => {
                        self.issue(
                            name,
                            at("metrics_path"),
                            format!("{path:?} must be a path starting with '/'"),
                        );
                        String::new()
                    }
                    None => "/metrics".to_string(),
                };
                if let Some(raw) = &p.tls {
                    let files = self.pool_tls_files(name, &at("tls"), raw);
                    self.pool_tls
                        .insert(p.id.clone(), (name.clone(), at("tls"), files));
                }
                pools.push(Pool {
                    id: p.id.clone(),
                    region: p.region.clone(),
                    engine,
                    models: p.models.clone(),
                    health_path,
                    metrics_path,
                    context_window: p
                        .context_window
                        .map(|v| self.bounded(name, &at("context_window"), v, 16, 100_000_000)),
                    tls: None,
                    endpoints: self.endpoints(name, &at("endpoints"), p.endpoints.as_deref()),
                    affinity: self.affinity(name, &at, p),
                    discover: self.discover(name, &at, p),
                });
            }
        }

        pools
    }

    /// A pool's `discover` and the keys its discovered shards take; the latter only
    /// with the former.
    fn discover(
        &mut self,
        file: &str,
        at: &dyn Fn(&str) -> String,
        p: &RawPool,
    ) -> Option<Discover> {
        let Some(raw) = &p.discover else {
            let keys = [
                ("scheme", p.scheme.is_some()),
                ("capacity_tps", p.capacity_tps.is_some()),
                ("weight", p.weight.is_some()),
                ("max_requests", p.max_requests.is_some()),
                ("gpu_probe", p.gpu_probe.is_some()),
                ("discover_min_ms", p.discover_min_ms.is_some()),
                ("discover_max_ms", p.discover_max_ms.is_some()),
            ];
            for (key, _) in keys.iter().filter(|k| k.1) {
                self.issue(
                    file,
                    at(key),
                    "only for discovered shards: set discover, or put it on each [[shards]]",
                );
            }
            return None;
        };
        let target = match DiscoverTarget::parse(raw) {
            Ok(t) => Some(t),
            Err(e) => {
                self.issue(file, at("discover"), e);
                None
            }
        };
        let scheme = p.scheme.as_deref().unwrap_or("http");
        if !matches!(scheme, "http" | "https") {
            self.issue(
                file,
                at("scheme"),
                format!("{scheme:?}: expected http or https"),
            );
        }
        let capacity_tps = match p.capacity_tps {
            Some(c) if c.is_finite() && c > 0.0 && c <= 1e9 => c,
            Some(c) => {
                let msg = format!("{c} must be a positive number of tokens/s (at most 1e9)");
                self.issue(file, at("capacity_tps"), msg);
                1.0
            }
            None => {
                self.issue(
                    file,
                    at("capacity_tps"),
                    "a discovered pool declares each shard's capacity_tps",
                );
                1.0
            }
        };
        let weight = p.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0 && weight <= 1000.0) {
            self.issue(
                file,
                at("weight"),
                format!("{weight} must be within (0, 1000]"),
            );
        }
        let max_requests = p
            .max_requests
            .map(|v| self.bounded(file, &at("max_requests"), v, 1, 1_000_000));
        if let Some(t) = &p.gpu_probe {
            let sample = t.replace("{ip}", "192.0.2.1");
            let plain = Url::parse(&sample).is_ok_and(|u| u.scheme() == "http");
            if !t.contains("{ip}")
                || !plain
                || self.base_url(file, &at("gpu_probe"), &sample).is_none()
            {
                self.issue(
                    file,
                    at("gpu_probe"),
                    format!("{t:?}: an http:// base URL with {{ip}} for the shard's address"),
                );
            }
        }
        let ms = |c: &mut Self, key: &str, v: Option<u64>, default: u64| {
            Duration::from_millis(c.bounded(file, &at(key), v.unwrap_or(default), 100, 86_400_000))
        };
        let min_interval = ms(self, "discover_min_ms", p.discover_min_ms, 1000);
        let max_interval = ms(self, "discover_max_ms", p.discover_max_ms, 30_000);
        if min_interval > max_interval {
            self.issue(
                file,
                at("discover_max_ms"),
                "must be at least discover_min_ms",
            );
        }
        Some(Discover {
            target: target?,
            scheme: scheme.to_string(),
            capacity_tps,
            weight,
            max_requests,
            gpu_probe: p.gpu_probe.clone(),
            min_interval,
            max_interval,
        })
    }

    /// `[discovery]`.
    fn discovery(&mut self, file: &str, raw: &RawDiscovery) -> DiscoverySettings {
        let mut nameservers = Vec::new();
        for (i, n) in raw.nameservers.iter().flatten().enumerate() {
            match n.parse::<SocketAddr>() {
                Ok(a) => nameservers.push(a),
                Err(_) => self.issue(
                    file,
                    format!("discovery.nameservers[{i}]"),
                    format!("{n:?} is not IP:PORT"),
                ),
            }
        }
        let d = DiscoverySettings::default();
        let ms = |c: &mut Self, key: &str, v: Option<u64>, default: Duration, min: u64| {
            v.map_or(default, |v| {
                Duration::from_millis(c.bounded(file, key, v, min, 86_400_000))
            })
        };
        DiscoverySettings {
            nameservers,
            timeout: ms(self, "discovery.timeout_ms", raw.timeout_ms, d.timeout, 10),
            max_stale: ms(
                self,
                "discovery.max_stale_ms",
                raw.max_stale_ms,
                d.max_stale,
                0,
            ),
        }
    }

    /// `[[shards]]`.
    fn shards(&mut self, files: &[(String, RawFile)], pools: &[Pool]) -> Vec<Shard> {
        let mut shards: Vec<Shard> = Vec::new();
        let mut shard_file: HashMap<String, String> = HashMap::new();
        let mut urls: HashSet<String> = HashSet::new();
        for (name, file) in files {
            for (i, s) in file.shards.iter().enumerate() {
                if let Some(shard) = self.shard(name, i, s, pools, &mut shard_file, &mut urls) {
                    shards.push(shard);
                }
            }
        }

        shards
    }

    /// `[gateway]`: the listeners and the shutdown timings.
    fn gateway(
        &mut self,
        gw_file: &str,
        gw: &RawGateway,
        region_file: &HashMap<String, String>,
    ) -> (SocketAddr, SocketAddr, Shutdown) {
        if !region_file.contains_key(&gw.home_region) {
            let msg = format!("home_region {:?} is not a defined region", gw.home_region);
            self.issue(gw_file, "gateway.home_region", msg);
        }
        let listen = self.addr(
            gw_file,
            "gateway.listen",
            gw.listen.as_deref(),
            "127.0.0.1:8080",
        );
        let admin_listen = self.addr(
            gw_file,
            "gateway.admin_listen",
            gw.admin_listen.as_deref(),
            "127.0.0.1:9091",
        );

        let ms = |c: &mut Self, key: &str, v: Option<u64>, default: u64| {
            Duration::from_millis(v.map_or(default, |v| c.bounded(gw_file, key, v, 0, 600_000)))
        };
        let shutdown = Shutdown {
            delay: ms(
                self,
                "gateway.shutdown_delay_ms",
                gw.shutdown_delay_ms,
                5_000,
            ),
            grace: ms(
                self,
                "gateway.shutdown_grace_ms",
                gw.shutdown_grace_ms,
                30_000,
            ),
        };

        (listen, admin_listen, shutdown)
    }

    /// `[limits]`.
    fn limits(&mut self, f: &str, l: &RawLimits) -> Limits {
        let mut lim = Limits::default();
        if let Some(v) = l.max_body_bytes {
            lim.max_body_bytes =
                self.bounded(f, "limits.max_body_bytes", v, 1024, 1 << 30) as usize;
        }
        if let Some(v) = l.max_buffered_bytes {
            lim.max_buffered_bytes =
                self.bounded(f, "limits.max_buffered_bytes", v, 1 << 20, 1 << 36) as usize;
        }
        if lim.max_buffered_bytes < lim.max_body_bytes {
            self.issue(
                f,
                "limits.max_buffered_bytes",
                format!(
                    "{} is smaller than max_body_bytes ({}): no body could ever be read",
                    lim.max_buffered_bytes, lim.max_body_bytes
                ),
            );
        }
        if let Some(v) = l.max_response_bytes {
            lim.max_response_bytes =
                self.bounded(f, "limits.max_response_bytes", v, 1024, 1 << 32) as usize;
        }
        lim
    }

    /// `[timeouts]`.
    fn timeouts(&mut self, f: &str, raw: &RawTimeouts) -> Timeouts {
        let mut t = Timeouts::default();
        let ms = |c: &mut Self, key: &str, v: Option<u64>, d: Duration| {
            v.map(|v| Duration::from_millis(c.bounded(f, key, v, 1, 86_400_000)))
                .unwrap_or(d)
        };
        t.connect = ms(self, "timeouts.connect_ms", raw.connect_ms, t.connect);
        t.first_byte = ms(
            self,
            "timeouts.first_byte_ms",
            raw.first_byte_ms,
            t.first_byte,
        );
        t.idle = ms(self, "timeouts.idle_ms", raw.idle_ms, t.idle);
        t.total = ms(self, "timeouts.total_ms", raw.total_ms, t.total);
        // Not a request timeout: not bounded by total_ms.
        t.pool_idle = ms(self, "timeouts.pool_idle_ms", raw.pool_idle_ms, t.pool_idle);
        for (key, d) in [
            ("connect_ms", t.connect),
            ("first_byte_ms", t.first_byte),
            ("idle_ms", t.idle),
        ] {
            if d > t.total {
                self.issue(
                    f,
                    format!("timeouts.{key}"),
                    format!(
                        "{key} ({} ms) exceeds total_ms ({} ms)",
                        d.as_millis(),
                        t.total.as_millis()
                    ),
                );
            }
        }
        t
    }

    /// `[routing]`.
    fn routing(&mut self, f: &str, raw: &RawRouting) -> RoutingSettings {
        let mut r = RoutingSettings::default();
        if let Some(v) = raw.default_completion_tokens {
            r.default_completion_tokens =
                self.bounded(f, "routing.default_completion_tokens", v, 1, 1_000_000);
        }
        if let Some(v) = raw.bytes_per_token {
            if v.is_finite() && (0.5..=64.0).contains(&v) {
                r.bytes_per_token = v;
            } else {
                self.issue(
                    f,
                    "routing.bytes_per_token",
                    format!("{v} must be within 0.5..=64"),
                );
            }
        }
        if let Some(v) = raw.overprovisioning_factor {
            if v.is_finite() && (1.0..=10.0).contains(&v) {
                r.overprovisioning_factor = v;
            } else {
                self.issue(
                    f,
                    "routing.overprovisioning_factor",
                    format!("{v} must be within 1..=10"),
                );
            }
        }
        if let Some(v) = raw.saturation_queue_depth {
            r.saturation_queue_depth =
                self.bounded(f, "routing.saturation_queue_depth", v.into(), 1, 100_000) as f64;
        }
        if let Some(v) = raw.saturation_kv_percent {
            r.saturation_kv_usage =
                self.bounded(f, "routing.saturation_kv_percent", v.into(), 1, 100) as f64 / 100.0;
        }
        if let Some(v) = raw.prefill_speedup {
            if v.is_finite() && (0.1..=1000.0).contains(&v) {
                r.prefill_speedup = v;
            } else {
                self.issue(
                    f,
                    "routing.prefill_speedup",
                    format!("{v} must be within 0.1..=1000"),
                );
            }
        }
        if let Some(v) = raw.max_retry_prompt_tokens {
            r.max_retry_prompt_tokens =
                self.bounded(f, "routing.max_retry_prompt_tokens", v, 0, 100_000_000);
        }
        if let Some(v) = raw.max_attempts {
            r.max_attempts = self.bounded(f, "routing.max_attempts", v.into(), 1, 5) as u32;
        }
        r
    }

    /// `[health]`.
    fn health(&mut self, f: &str, raw: &RawHealth) -> breakwater_health::HealthConfig {
        let mut h = breakwater_health::HealthConfig::default();
        let count = |c: &mut Self, key: &str, v: Option<u32>, d: u32| {
            v.map(|v| c.bounded(f, key, v.into(), 1, 1000) as u32)
                .unwrap_or(d)
        };
        h.consecutive_failures = count(
            self,
            "health.consecutive_failures",
            raw.consecutive_failures,
            h.consecutive_failures,
        );
        h.consecutive_local_failures = count(
            self,
            "health.consecutive_local_failures",
            raw.consecutive_local_failures,
            h.consecutive_local_failures,
        );
        h.unhealthy_threshold = count(
            self,
            "health.unhealthy_threshold",
            raw.unhealthy_threshold,
            h.unhealthy_threshold,
        );
        h.healthy_threshold = count(
            self,
            "health.healthy_threshold",
            raw.healthy_threshold,
            h.healthy_threshold,
        );
        let ms = |c: &mut Self, key: &str, v: Option<u64>, min: u64, d: Duration| {
            v.map(|v| Duration::from_millis(c.bounded(f, key, v, min, 86_400_000)))
                .unwrap_or(d)
        };
        h.base_ejection = ms(
            self,
            "health.base_ejection_ms",
            raw.base_ejection_ms,
            1,
            h.base_ejection,
        );
        h.max_ejection = ms(
            self,
            "health.max_ejection_ms",
            raw.max_ejection_ms,
            1,
            h.max_ejection,
        );
        h.ejection_jitter = ms(
            self,
            "health.ejection_jitter_ms",
            raw.ejection_jitter_ms,
            0,
            h.ejection_jitter,
        );
        h.check_interval = ms(
            self,
            "health.check_interval_ms",
            raw.check_interval_ms,
            0,
            h.check_interval,
        );
        h.check_timeout = ms(
            self,
            "health.check_timeout_ms",
            raw.check_timeout_ms,
            1,
            h.check_timeout,
        );
        if let Some(v) = raw.max_ejection_percent {
            h.max_ejection_percent =
                self.bounded(f, "health.max_ejection_percent", v.into(), 0, 100) as u32;
        }
        h.gpu_healthy_readings = count(
            self,
            "health.gpu_healthy_readings",
            raw.gpu_healthy_readings,
            h.gpu_healthy_readings,
        );
        h.gpu_interval = ms(
            self,
            "health.gpu_interval_ms",
            raw.gpu_interval_ms,
            10,
            h.gpu_interval,
        );
        h.gpu_timeout = ms(
            self,
            "health.gpu_timeout_ms",
            raw.gpu_timeout_ms,
            1,
            h.gpu_timeout,
        );
        h.gpu_stale = ms(
            self,
            "health.gpu_stale_ms",
            raw.gpu_stale_ms,
            1,
            h.gpu_stale,
        );
        if let Some(v) = raw.gpu_degraded_weight_percent {
            h.gpu_degraded_weight =
                self.bounded(f, "health.gpu_degraded_weight_percent", v.into(), 1, 100) as f64
                    / 100.0;
        }
        h.metrics_interval = ms(
            self,
            "health.metrics_interval_ms",
            raw.metrics_interval_ms,
            0,
            h.metrics_interval,
        );
        h.metrics_timeout = ms(
            self,
            "health.metrics_timeout_ms",
            raw.metrics_timeout_ms,
            1,
            h.metrics_timeout,
        );
        h.silent_death = ms(
            self,
            "health.silent_death_ms",
            raw.silent_death_ms,
            0,
            h.silent_death,
        );
        h.slow_start = ms(
            self,
            "health.slow_start_ms",
            raw.slow_start_ms,
            0,
            h.slow_start,
        );
        if h.gpu_timeout > h.gpu_interval {
            self.issue(
                f,
                "health.gpu_timeout_ms",
                "a probe reading's timeout exceeds the interval between readings",
            );
        }
        if h.max_ejection < h.base_ejection {
            self.issue(
                f,
                "health.max_ejection_ms",
                "max_ejection_ms is shorter than base_ejection_ms",
            );
        }
        if h.checks_enabled() && h.check_timeout > h.check_interval {
            self.issue(
                f,
                "health.check_timeout_ms",
                "a check's timeout exceeds the interval between checks",
            );
        }
        h
    }

    /// `[retries]`.
    fn retries(&mut self, f: &str, raw: &RawRetries) -> RetrySettings {
        let mut rt = RetrySettings::default();
        if let Some(v) = raw.budget_percent {
            rt.budget_ratio =
                self.bounded(f, "retries.budget_percent", v.into(), 0, 100) as f64 / 100.0;
        }
        if let Some(v) = raw.min_concurrent {
            rt.min_concurrent = self.bounded(f, "retries.min_concurrent", v.into(), 0, 100_000);
        }
        if let Some(v) = raw.backoff_base_ms {
            rt.backoff_base =
                Duration::from_millis(self.bounded(f, "retries.backoff_base_ms", v, 0, 60_000));
        }
        if let Some(v) = raw.backoff_max_ms {
            rt.backoff_max =
                Duration::from_millis(self.bounded(f, "retries.backoff_max_ms", v, 0, 600_000));
        }
        if rt.backoff_max < rt.backoff_base {
            self.issue(
                f,
                "retries.backoff_max_ms",
                "backoff_max_ms is shorter than backoff_base_ms",
            );
        }
        rt
    }

    /// `[[tenants]]`, checked against the admission settings (`admission_file`: where
    /// `[admission]` is, if anywhere).
    fn tenants(
        &mut self,
        files: &[(String, RawFile)],
        adm: &AdmissionSettings,
        admission_file: Option<&str>,
    ) -> Vec<Tenant> {
        let mut tenants: Vec<Tenant> = Vec::new();
        let mut tenant_file: HashMap<String, String> = HashMap::new();
        let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
        for (name, file) in files {
            for (i, raw) in file.tenants.iter().enumerate() {
                if let Some(t) = self.tenant(name, i, raw, &mut tenant_file, &mut key_owner) {
                    tenants.push(t);
                }
            }
        }
        if adm.require_api_key && tenants.iter().all(|t| t.key_digests.is_empty()) {
            let f = admission_file.unwrap_or(files[0].0.as_str());
            self.issue(
                f,
                "admission.require_api_key",
                "keys are required but no [[tenants]] entry lists an api_key_sha256",
            );
        }

        tenants
    }

    fn priority(&mut self, file: &str, key: &str, raw: Option<&str>) -> Priority {
        match raw {
            None => Priority::Standard,
            Some(p) => Priority::parse(p).unwrap_or_else(|| {
                self.issue(
                    file,
                    key,
                    format!("unknown priority {p:?}; expected critical, standard or sheddable"),
                );
                Priority::Standard
            }),
        }
    }

    fn admission(&mut self, f: &str, raw: &RawAdmission) -> AdmissionSettings {
        let mut a = AdmissionSettings::default();
        if let Some(v) = raw.enabled {
            a.enabled = v;
        }
        if let Some(v) = raw.require_api_key {
            a.require_api_key = v;
        }
        if raw.default_priority.is_some() {
            a.default_priority = self.priority(
                f,
                "admission.default_priority",
                raw.default_priority.as_deref(),
            );
        }
        let ms = |c: &mut Self, key: &str, v: Option<u64>, min: u64, d: Duration| {
            v.map(|v| Duration::from_millis(c.bounded(f, key, v, min, 3_600_000)))
                .unwrap_or(d)
        };
        let [_, standard, sheddable] = a.queue_timeout;
        // One key for the critical and standard bands (their defaults are equal).
        let queue = ms(
            self,
            "admission.queue_timeout_ms",
            raw.queue_timeout_ms,
            0,
            standard,
        );
        let shed = ms(
            self,
            "admission.sheddable_queue_timeout_ms",
            raw.sheddable_queue_timeout_ms,
            0,
            sheddable,
        );
        a.queue_timeout = [queue, queue, shed];
        a.queue_target = raw.queue_target_ms.map(|v| {
            Duration::from_millis(self.bounded(f, "admission.queue_target_ms", v, 0, 3_600_000))
        });
        if let Some(v) = raw.max_queued {
            a.max_queued = self.bounded(f, "admission.max_queued", v.into(), 0, 1_000_000) as usize;
        }
        a.initial_limit = ms(
            self,
            "admission.initial_limit_ms",
            raw.initial_limit_ms,
            1,
            a.initial_limit,
        );
        a.min_limit = ms(
            self,
            "admission.min_limit_ms",
            raw.min_limit_ms,
            1,
            a.min_limit,
        );
        a.max_limit = ms(
            self,
            "admission.max_limit_ms",
            raw.max_limit_ms,
            1,
            a.max_limit,
        );
        if !(a.min_limit <= a.initial_limit && a.initial_limit <= a.max_limit) {
            self.issue(
                f,
                "admission.initial_limit_ms",
                "min_limit_ms <= initial_limit_ms <= max_limit_ms must hold",
            );
        }
        if let Some(v) = raw.ttft_tolerance_percent {
            a.ttft_tolerance =
                self.bounded(f, "admission.ttft_tolerance_percent", v.into(), 101, 10_000) as f64
                    / 100.0;
        }
        a
    }

    /// `[cluster]`: the store's URL (without credentials: a password in the policy would
    /// sit in its Git history), where the password comes from, the timings.
    fn cluster(&mut self, f: &str, raw: &RawCluster) -> Option<ClusterSettings> {
        let store = match Url::parse(&raw.store) {
            Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host_str().is_some() => u,
            _ => {
                // The value is not repeated: it may hold a password.
                self.issue(
                    f,
                    "cluster.store",
                    "must be redis://HOST:PORT or rediss://HOST:PORT",
                );
                return None;
            }
        };
        if store.password().is_some() || !store.username().is_empty() {
            self.issue(
                f,
                "cluster.store",
                "the store URL must not hold credentials: use username, and password_file or \
                 password_env",
            );
        }
        let password = match (&raw.password_file, &raw.password_env) {
            (Some(p), None) => self
                .path(f, "cluster.password_file", p)
                .map(SecretSource::File),
            (None, Some(v)) if !v.is_empty() => Some(SecretSource::Env(v.clone())),
            (None, None) => None,
            _ => {
                self.issue(
                    f,
                    "cluster.password_file",
                    "set one of password_file and password_env (a non-empty variable name)",
                );
                None
            }
        };
        let tls = match &raw.tls {
            Some(t) if store.scheme() == "rediss" => self.pool_tls_files(f, "cluster.tls", t),
            Some(_) => {
                self.issue(f, "cluster.tls", "[cluster.tls] needs a rediss:// store");
                Default::default()
            }
            None => Default::default(),
        };
        if let Some(id) = &raw.replica_id {
            self.check_id(f, "cluster.replica_id", id);
        }
        let key_prefix = raw
            .key_prefix
            .clone()
            .unwrap_or_else(|| "breakwater".into());
        if key_prefix.is_empty()
            || key_prefix.len() > 64
            || !key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            self.issue(
                f,
                "cluster.key_prefix",
                "1-64 characters of letters, digits, '-', '_', '.' or ':'",
            );
        }
        let ms = |c: &mut Self, key: &str, v: Option<u64>, default: u64, min: u64, max: u64| {
            Duration::from_millis(c.bounded(f, key, v.unwrap_or(default), min, max))
        };
        let timeout = ms(self, "cluster.timeout_ms", raw.timeout_ms, 100, 1, 10_000);
        let sync_interval = ms(self, "cluster.sync_ms", raw.sync_ms, 100, 10, 10_000);
        let heartbeat = ms(
            self,
            "cluster.heartbeat_ms",
            raw.heartbeat_ms,
            sync_interval.as_millis() as u64,
            10,
            60_000,
        );
        let replica_ttl = ms(
            self,
            "cluster.replica_ttl_ms",
            raw.replica_ttl_ms,
            5000,
            200,
            600_000,
        );
        if replica_ttl < heartbeat * 2 {
            self.issue(
                f,
                "cluster.replica_ttl_ms",
                "must be at least twice heartbeat_ms, or a live replica drops out between beats",
            );
        }
        Some(ClusterSettings {
            store,
            username: raw.username.clone(),
            password,
            tls,
            replica_id: raw.replica_id.clone(),
            key_prefix,
            timeout,
            sync_interval,
            heartbeat,
            replica_ttl,
        })
    }

    fn tenant(
        &mut self,
        file: &str,
        i: usize,
        raw: &RawTenant,
        seen: &mut HashMap<String, String>,
        key_owner: &mut HashMap<[u8; 32], String>,
    ) -> Option<Tenant> {
        let at = |k: &str| format!("tenants[{i}].{k}");
        if !self.check_id(file, &at("id"), &raw.id) {
            return None;
        }
        if let Some(first) = seen.get(&raw.id) {
            let msg = format!("duplicate tenant id {:?} (first in {first})", raw.id);
            self.issue(file, at("id"), msg);
            return None;
        }
        seen.insert(raw.id.clone(), file.to_string());
        let mut key_digests = Vec::with_capacity(raw.api_key_sha256.len());
        for (j, hex_digest) in raw.api_key_sha256.iter().enumerate() {
            let key = format!("tenants[{i}].api_key_sha256[{j}]");
            let lower = hex_digest.len() == 64
                && hex_digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let mut digest = [0u8; 32];
            if !lower || hex::decode_to_slice(hex_digest, &mut digest).is_err() {
                self.issue(
                    file,
                    key,
                    "must be 64 lowercase hex digits: the SHA-256 of the key, never the key itself",
                );
                continue;
            }
            if let Some(owner) = key_owner.get(&digest) {
                self.issue(
                    file,
                    key,
                    format!("this key already belongs to tenant {owner:?}"),
                );
                continue;
            }
            key_owner.insert(digest, raw.id.clone());
            key_digests.push(digest);
        }
        let priority = self.priority(file, &at("priority"), raw.priority.as_deref());
        let rpm = raw
            .rpm
            .map(|v| self.bounded(file, &at("rpm"), v, 1, 1_000_000_000));
        let tpm = raw
            .tpm
            .map(|v| self.bounded(file, &at("tpm"), v, 1, 1_000_000_000_000));
        let timeout = raw.timeout_ms.map(|v| {
            Duration::from_millis(self.bounded(file, &at("timeout_ms"), v, 1, 86_400_000))
        });
        Some(Tenant {
            id: raw.id.clone(),
            key_digests,
            priority,
            rpm,
            tpm,
            timeout,
        })
    }

    fn shard(
        &mut self,
        file: &str,
        i: usize,
        s: &RawShard,
        pools: &[Pool],
        seen: &mut HashMap<String, String>,
        urls: &mut HashSet<String>,
    ) -> Option<Shard> {
        let at = |k: &str| format!("shards[{i}].{k}");
        if !self.check_id(file, &at("id"), &s.id) {
            return None;
        }
        if let Some(first) = seen.get(&s.id) {
            let msg = format!("duplicate shard id {:?} (first in {first})", s.id);
            self.issue(file, at("id"), msg);
            return None;
        }
        seen.insert(s.id.clone(), file.to_string());
        let mut ok = true;
        let pool = pools.iter().find(|p| p.id == s.pool);
        if pool.is_none() {
            self.issue(
                file,
                at("pool"),
                format!(
                    "shard {:?} names pool {:?}, which no file defines",
                    s.id, s.pool
                ),
            );
            ok = false;
        }
        if let (Some(region), Some(pool)) = (&s.region, pool) {
            if *region != pool.region {
                let msg = format!(
                    "shard region {region:?} differs from its pool's region {:?}",
                    pool.region
                );
                self.issue(file, at("region"), msg);
                ok = false;
            }
        }
        let url = self.base_url(file, &at("url"), &s.url);
        if let Some(u) = &url {
            if !urls.insert(u.to_string()) {
                self.issue(file, at("url"), format!("another shard already uses {u}"));
                ok = false;
            }
        }
        if !(s.capacity_tps.is_finite() && s.capacity_tps > 0.0 && s.capacity_tps <= 1e9) {
            self.issue(
                file,
                at("capacity_tps"),
                format!(
                    "{} must be a positive number of tokens/s (at most 1e9)",
                    s.capacity_tps
                ),
            );
            ok = false;
        }
        let weight = s.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0 && weight <= 1000.0) {
            self.issue(
                file,
                at("weight"),
                format!("{weight} must be within (0, 1000]"),
            );
            ok = false;
        }
        let gpu_probe = match &s.gpu_probe {
            Some(p) => {
                let u = self.base_url(file, &at("gpu_probe"), p);
                let u = u.filter(|u| {
                    let plain = u.scheme() == "http";
                    if !plain {
                        self.issue(file, at("gpu_probe"), "the gpu-probe agent speaks http://");
                    }
                    plain
                });
                ok &= u.is_some();
                u
            }
            None => None,
        };
        if s.gpu_devices.is_some() && gpu_probe.is_none() {
            self.issue(file, at("gpu_devices"), "gpu_devices needs gpu_probe");
            ok = false;
        }
        let (url, pool) = (url?, pool?);
        ok.then(|| Shard {
            id: s.id.clone(),
            region: pool.region.clone(),
            pool: pool.id.clone(),
            url,
            capacity_tps: s.capacity_tps,
            weight,
            gpu_probe,
            gpu_devices: s.gpu_devices.clone().unwrap_or_default(),
            max_requests: s
                .max_requests
                .map(|v| self.bounded(file, &at("max_requests"), v, 1, 1_000_000)),
        })
    }

    /// An `http://` or `https://HOST:PORT` base URL with no path, query, fragment or credentials.
    fn base_url(&mut self, file: &str, key: &str, raw: &str) -> Option<Url> {
        let url = match Url::parse(raw) {
            Ok(u) => u,
            Err(e) => {
                self.issue(file, key, format!("{raw:?} is not a URL: {e}"));
                return None;
            }
        };
        let problem = if !matches!(url.scheme(), "http" | "https") {
            Some("the scheme must be http:// or https://")
        } else if url.host_str().is_none_or(str::is_empty) {
            Some("the URL has no host")
        } else if !url.username().is_empty() || url.password().is_some() {
            Some("credentials do not belong in a URL")
        } else if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            Some("a base URL has no path, query or fragment")
        } else {
            None
        };
        match problem {
            Some(p) => {
                self.issue(file, key, format!("{raw:?}: {p}"));
                None
            }
            None => Some(url),
        }
    }

    /// A pool's `affinity*` keys.
    fn affinity(
        &mut self,
        file: &str,
        at: &dyn Fn(&str) -> String,
        p: &super::raw::RawPool,
    ) -> AffinitySettings {
        let d = AffinitySettings::default();
        let mode = match p.affinity.as_deref() {
            None => AffinityMode::None,
            Some(m) => AffinityMode::parse(m).unwrap_or_else(|| {
                let msg = format!("unknown affinity {m:?}; expected none, session or prefix");
                self.issue(file, at("affinity"), msg);
                AffinityMode::None
            }),
        };
        let header = p.affinity_header.as_deref().and_then(|h| {
            let name = http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok();
            if name.is_none() {
                self.issue(
                    file,
                    at("affinity_header"),
                    format!("{h:?} is not a header name"),
                );
            }
            name
        });
        let max_load = p.affinity_max_load.unwrap_or(d.max_load);
        if !(max_load.is_finite() && (1.0..=10.0).contains(&max_load)) {
            self.issue(
                file,
                at("affinity_max_load"),
                format!("{max_load} must be within 1..=10"),
            );
        }
        AffinitySettings {
            mode,
            block_bytes: p.affinity_block_bytes.map_or(d.block_bytes, |v| {
                self.bounded(file, &at("affinity_block_bytes"), v, 16, 65_536) as usize
            }),
            max_prefix_bytes: p.affinity_max_prefix_bytes.map_or(d.max_prefix_bytes, |v| {
                self.bounded(file, &at("affinity_max_prefix_bytes"), v, 16, 1 << 20) as usize
            }),
            header,
            max_load: max_load.clamp(1.0, 10.0),
            ttl: p.affinity_ttl_ms.map_or(d.ttl, |v| {
                Duration::from_millis(self.bounded(
                    file,
                    &at("affinity_ttl_ms"),
                    v,
                    1_000,
                    86_400_000,
                ))
            }),
        }
    }

    /// A pool's `endpoints` list (default: all).
    fn endpoints(&mut self, file: &str, key: &str, raw: Option<&[String]>) -> EndpointSet {
        let Some(names) = raw else {
            return EndpointSet::ALL;
        };
        if names.is_empty() {
            self.issue(file, key, "a pool must serve at least one endpoint");
        }
        names
            .iter()
            .filter_map(|n| {
                let e = Endpoint::from_name(n);
                if e.is_none() {
                    let all: Vec<&str> = Endpoint::ALL.iter().map(|e| e.name()).collect();
                    let msg = format!("unknown endpoint {n:?}; expected one of {}", all.join(", "));
                    self.issue(file, key, msg);
                }
                e
            })
            .collect()
    }

    /// Pools serving the same model must serve the same endpoints, with the same affinity:
    /// a request is routed by model across regions, and one region's pool must not get what
    /// it cannot answer.
    fn same_endpoints_per_model(&mut self, files: &[(String, RawFile)], pools: &[Pool]) {
        for (i, p) in pools.iter().enumerate() {
            for q in &pools[..i] {
                let Some(m) = p.models.iter().find(|m| q.models.contains(m)) else {
                    continue;
                };
                let file = files
                    .iter()
                    .find(|(_, f)| f.pools.iter().any(|r| r.id == p.id))
                    .map_or("", |(n, _)| n.as_str());
                let differ = [
                    (
                        p.affinity != q.affinity,
                        "pools.affinity",
                        "with different affinity settings; a model's pools must agree",
                    ),
                    (
                        p.endpoints != q.endpoints,
                        "pools.endpoints",
                        "but list different endpoints; a model's pools must serve the same ones",
                    ),
                ];
                for (_, key, what) in differ.into_iter().filter(|(d, _, _)| *d) {
                    let msg = format!("pools {:?} and {:?} both serve {m:?} {what}", q.id, p.id);
                    self.issue(file, key, msg);
                }
            }
        }
    }

    /// An absolute file path.
    fn path(&mut self, file: &str, key: &str, raw: &str) -> Option<PathBuf> {
        let path = PathBuf::from(raw);
        if path.is_absolute() {
            Some(path)
        } else {
            self.issue(file, key, format!("{raw:?} must be an absolute path"));
            None
        }
    }

    /// `[gateway.tls]` or `[gateway.admin_tls]`: the pair is read now, so a missing file or a
    /// key that is not the certificate's fails validation rather than the start.
    fn listener_tls(&mut self, file: &str, key: &str, raw: &RawListenerTls) -> Option<ListenerTls> {
        let cert_file = self.path(file, &format!("{key}.cert_file"), &raw.cert_file);
        let key_file = self.path(file, &format!("{key}.key_file"), &raw.key_file);
        let files = CertFiles {
            cert_file: cert_file?,
            key_file: key_file?,
        };
        if let Err(e) = files.load() {
            self.issue(file, key, e.to_string());
            return None;
        }
        Some(ListenerTls {
            files,
            http2: raw.http2.unwrap_or(true),
        })
    }

    fn pool_tls_files(&mut self, file: &str, key: &str, raw: &RawPoolTls) -> PoolTlsFiles {
        let ca_file = raw
            .ca_file
            .as_deref()
            .and_then(|p| self.path(file, &format!("{key}.ca_file"), p));
        let client_cert = match (&raw.client_cert_file, &raw.client_key_file) {
            (Some(c), Some(k)) => {
                let cert_file = self.path(file, &format!("{key}.client_cert_file"), c);
                let key_file = self.path(file, &format!("{key}.client_key_file"), k);
                cert_file
                    .zip(key_file)
                    .map(|(cert_file, key_file)| CertFiles {
                        cert_file,
                        key_file,
                    })
            }
            (None, None) => None,
            _ => {
                self.issue(
                    file,
                    key,
                    "client_cert_file and client_key_file go together",
                );
                None
            }
        };
        PoolTlsFiles {
            ca_file,
            client_cert,
        }
    }

    /// Every pool with an `https://` shard gets its client TLS (its `[pools.tls]`, or the
    /// system's roots); an `http://` shard in a pool with `[pools.tls]` is a mistake.
    fn upstream_tls(&mut self, pools: &mut [Pool], shards: &[Shard]) {
        for pool in pools.iter_mut() {
            let mine = || shards.iter().filter(|s| s.pool == pool.id);
            let declared = self.pool_tls.remove(&pool.id);
            if let Some((file, key, _)) = &declared {
                if let Some(plain) = mine().find(|s| s.url.scheme() == "http") {
                    let msg = format!(
                        "the pool has [pools.tls] but shard {:?} is {}; use https://",
                        plain.id, plain.url
                    );
                    self.issue(file, key.clone(), msg);
                }
            }
            let discovered_https = pool.discover.as_ref().map(|d| d.scheme.as_str());
            if let (Some((file, key, _)), Some("http")) = (&declared, discovered_https) {
                let msg =
                    "the pool has [pools.tls] but discovers http:// shards; set scheme = \"https\"";
                self.issue(file, key.clone(), msg);
            }
            if !mine().any(|s| s.url.scheme() == "https") && discovered_https != Some("https") {
                continue;
            }
            let (file, key, files) = declared.unwrap_or_default();
            match UpstreamTls::load(&pool.id, files) {
                Ok(tls) => pool.tls = Some(Arc::new(tls)),
                Err(e) => self.issue(&file, key, e.to_string()),
            }
        }
    }

    fn addr(&mut self, file: &str, key: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 0));
        match raw.unwrap_or(default).parse() {
            Ok(a) => a,
            Err(_) => {
                self.issue(
                    file,
                    key,
                    format!("{:?} is not IP:PORT", raw.unwrap_or(default)),
                );
                fallback
            }
        }
    }

    fn bounded(&mut self, file: &str, key: &str, v: u64, min: u64, max: u64) -> u64 {
        if (min..=max).contains(&v) {
            v
        } else {
            self.issue(file, key, format!("{v} must be within {min}..={max}"));
            v.clamp(min, max)
        }
    }
}
