//! Shards discovered from DNS: a pool with `discover = "dns://NAME:PORT"` (A/AAAA) or
//! `"dns+srv://_service._proto.NAME"` (SRV) has a shard for each address its records list,
//! besides any `[[shards]]` naming it.
//!
//! One task ([`Discovery::run`]) looks every discovered pool up at its records' TTL,
//! bounded by the pool's `discover_min_ms` and `discover_max_ms`. When a pool's set of
//! addresses changes, the policy in force is rebuilt from the declared one and the sets
//! found ([`with_discovered`]) and installed like a reload ([`crate::reload::Reloader`]):
//! a shard whose address stays keeps its id (`POOL@IP:PORT`), and with it its ledger,
//! limits and health; a new one joins; one that left DNS gets nothing new while what it
//! runs finishes, as a shard removed by a reload does.
//!
//! A lookup that fails (timeout, SERVFAIL, NXDOMAIN, no records) changes nothing: the pool
//! keeps the shards last found — the resolver hiccupping never empties a pool — and is
//! asked again at `discover_min_ms`, doubling to `discover_max_ms`. Only after lookups
//! have failed for `[discovery] max_stale_ms` (default 15 minutes) are its discovered
//! shards dropped as gone. Failures are counted, logged once per transition and shown in
//! `/admin/status`.

pub mod resolve;
pub mod target;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use resolve::{Found, ResolveError, Resolver};
pub use target::{Discover, DiscoverTarget};

use crate::metrics::Metrics;
use crate::policy::{DiscoverySettings, Policy};
use crate::reload::Reloader;
use crate::stats::unix_ms;

/// The addresses found for each discovered pool, by pool id.
pub type Discovered = BTreeMap<String, Vec<SocketAddr>>;

/// `declared` with each discovered pool's shards added, in address order. An address a
/// static shard of the same pool already names is left to it.
pub fn with_discovered(declared: &Policy, found: &Discovered) -> Policy {
    let mut policy = declared.clone();
    let mut urls: std::collections::HashSet<url::Url> =
        declared.shards.iter().map(|s| s.url.clone()).collect();
    for pool in &declared.pools {
        let (Some(d), Some(addrs)) = (&pool.discover, found.get(&pool.id)) else {
            continue;
        };
        for shard in addrs
            .iter()
            .filter_map(|a| d.shard(&pool.id, &pool.region, *a))
        {
            if urls.insert(shard.url.clone()) {
                policy.shards.push(shard);
            }
        }
    }
    policy
}

/// What `/admin/status` shows of one discovered pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolDiscovery {
    /// The pool.
    pub pool: String,
    /// What it discovers (`dns://…`).
    pub target: String,
    /// The shards it has from DNS now.
    pub shards: usize,
    /// When a lookup last answered, ms since the Unix epoch.
    pub last_ok_unix_ms: Option<u64>,
    /// Why the lookups fail, while they do.
    pub error: Option<String>,
    /// Lookups failed in a row.
    pub failures: u32,
    /// Whether the shards shown are kept from an answer older than its TTL because the
    /// lookups since failed.
    pub stale: bool,
}

/// One pool's lookups.
struct PoolState {
    target: DiscoverTarget,
    next: Instant,
    last_ok: Option<Instant>,
    last_ok_unix_ms: Option<u64>,
    valid_until: Option<Instant>,
    failures: u32,
    error: Option<String>,
    shards: usize,
}

/// The discovery task and what it has found.
pub struct Discovery {
    reloader: Arc<Reloader>,
    pools: Mutex<BTreeMap<String, PoolState>>,
    metrics: DiscoveryMetrics,
}

/// Lookups by pool and result, and the shards each pool has from DNS.
struct DiscoveryMetrics {
    lookups: prometheus::IntCounterVec,
    shards: prometheus::IntGaugeVec,
}

impl Discovery {
    /// Discovery for the pools of the policies `reloader` installs, its metrics in
    /// `metrics`.
    pub fn new(reloader: Arc<Reloader>, metrics: &Metrics) -> Result<Arc<Self>, prometheus::Error> {
        let lookups = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "discovery_lookups_total",
                "DNS lookups of discovered pools, by result (ok, changed, failed).",
            ),
            &["pool", "result"],
        )?;
        let shards = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "discovery_shards",
                "Shards each discovered pool has from DNS now.",
            ),
            &["pool"],
        )?;
        metrics.register(Box::new(lookups.clone()))?;
        metrics.register(Box::new(shards.clone()))?;
        Ok(Arc::new(Self {
            reloader,
            pools: Mutex::new(BTreeMap::new()),
            metrics: DiscoveryMetrics { lookups, shards },
        }))
    }

    /// The discovered pools' state, for `/admin/status`.
    pub fn status(&self) -> Vec<PoolDiscovery> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(pool, s)| PoolDiscovery {
                pool: pool.clone(),
                target: s.target.to_string(),
                shards: s.shards,
                last_ok_unix_ms: s.last_ok_unix_ms,
                error: s.error.clone(),
                failures: s.failures,
                stale: s.failures > 0 && s.valid_until.is_some_and(|v| v < now),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PoolState>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks the discovered pools up as they fall due, for as long as the process runs.
    pub async fn run(self: Arc<Self>) {
        let mut resolver: Option<(DiscoverySettings, Resolver)> = None;
        let mut setup_error: Option<String> = None;
        loop {
            let declared = self.reloader.declared();
            let due = self.due(&declared);
            // Made when a lookup is first due (a policy with no discovered pool never reads
            // the system's resolver configuration), again when `[discovery]` changes.
            let settings = &declared.discovery;
            if !due.is_empty() && resolver.as_ref().is_none_or(|(s, _)| s != settings) {
                resolver = match Resolver::new(&settings.nameservers, settings.timeout) {
                    Ok(r) => Some((settings.clone(), r)),
                    Err(e) => {
                        let e = e.to_string();
                        if setup_error.as_ref() != Some(&e) {
                            tracing::warn!(target: "discovery", error = %e, "no resolver; discovered pools keep what they have");
                        }
                        setup_error = Some(e);
                        None
                    }
                };
            }
            if let Some((_, r)) = &resolver {
                setup_error = None;
                for (pool, target) in due {
                    let result = r.resolve(&target).await;
                    self.settle(&declared, &pool, result).await;
                }
            }
            let next = self.lock().values().map(|s| s.next).min();
            // Woken at least every second to follow a reload's pools (and, without a
            // resolver, to try making one again).
            let wake = next
                .filter(|_| resolver.is_some())
                .map_or(Duration::from_secs(1), |n| {
                    n.saturating_duration_since(Instant::now())
                        .min(Duration::from_secs(1))
                });
            tokio::time::sleep(wake.max(Duration::from_millis(10))).await;
        }
    }

    /// Follows `declared`'s discovered pools (new ones are due now; ones gone, or whose
    /// target changed, are forgotten) and returns those due.
    fn due(&self, declared: &Policy) -> Vec<(String, DiscoverTarget)> {
        let now = Instant::now();
        let mut pools = self.lock();
        pools.retain(|id, s| {
            let keep = declared
                .pools
                .iter()
                .any(|p| p.id == *id && p.discover.as_ref().is_some_and(|d| d.target == s.target));
            if !keep {
                self.metrics.shards.remove_label_values(&[id]).ok();
            }
            keep
        });
        for p in &declared.pools {
            if let Some(d) = &p.discover {
                pools.entry(p.id.clone()).or_insert_with(|| PoolState {
                    target: d.target.clone(),
                    next: now,
                    last_ok: None,
                    last_ok_unix_ms: None,
                    valid_until: None,
                    failures: 0,
                    error: None,
                    shards: 0,
                });
            }
        }
        pools
            .iter()
            .filter(|(_, s)| s.next <= now)
            .map(|(id, s)| (id.clone(), s.target.clone()))
            .collect()
    }

    /// Records a lookup of `pool` and installs what changed.
    async fn settle(&self, declared: &Policy, pool: &str, result: Result<Found, ResolveError>) {
        let Some(d) = declared
            .pools
            .iter()
            .find(|p| p.id == pool)
            .and_then(|p| p.discover.as_ref())
        else {
            return;
        };
        let now = Instant::now();
        let max_stale = declared.discovery.max_stale;
        // The addresses to install, and whether they are an answer (else: dropped as gone).
        let (addrs, answered) = {
            let mut pools = self.lock();
            let Some(s) = pools.get_mut(pool) else {
                return;
            };
            match result {
                Ok(found) => {
                    if s.failures > 0 {
                        tracing::info!(target: "discovery", pool, shards = found.addrs.len(), "lookups answer again");
                    }
                    let ttl = found.valid_until.saturating_duration_since(now);
                    s.next = now + ttl.clamp(d.min_interval, d.max_interval);
                    s.last_ok = Some(now);
                    s.last_ok_unix_ms = Some(unix_ms());
                    s.valid_until = Some(found.valid_until);
                    s.failures = 0;
                    s.error = None;
                    (found.addrs, true)
                }
                Err(e) => {
                    if s.failures == 0 {
                        tracing::warn!(target: "discovery", pool, error = %e, "lookups fail; the pool keeps the shards last found");
                    }
                    s.failures = s.failures.saturating_add(1);
                    s.error = Some(e.to_string());
                    let doubled = 2u32.saturating_pow(s.failures - 1).min(1 << 16);
                    s.next = now + (d.min_interval * doubled).min(d.max_interval);
                    self.metrics
                        .lookups
                        .with_label_values(&[pool, "failed"])
                        .inc();
                    let gone = s.last_ok.is_none_or(|t| now.duration_since(t) >= max_stale);
                    if !(gone && s.shards > 0) {
                        return;
                    }
                    tracing::warn!(target: "discovery", pool, "lookups failed for max_stale_ms; the shards last found are dropped");
                    (Vec::new(), false)
                }
            }
        };
        let reloader = Arc::clone(&self.reloader);
        let pool_id = pool.to_string();
        let changed = tokio::task::spawn_blocking(move || reloader.set_discovered(&pool_id, addrs))
            .await
            .ok()
            .flatten();
        if let Some(shards) = changed {
            if let Some(s) = self.lock().get_mut(pool) {
                s.shards = shards;
            }
            self.metrics
                .shards
                .with_label_values(&[pool])
                .set(shards as i64);
        }
        if answered {
            let result = if changed.is_some() { "changed" } else { "ok" };
            self.metrics
                .lookups
                .with_label_values(&[pool, result])
                .inc();
        }
    }
}
