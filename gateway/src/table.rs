//! The routing table: everything a request reads from the policy — shards (keyed by
//! [`ShardId`]), pools, regions, models, tenants, limits, timeouts — compiled into one
//! immutable [`Table`] behind one `ArcSwap` and swapped whole by a reload. A request loads
//! the table once and keeps it until it ends, so it never sees half of two policies.
//!
//! Per-shard live state (in-flight ledger, admission limit, drain) and learned statistics
//! travel from one table to the next (see [`Router::build`]); what outlives every table —
//! shard ids, the health snapshot, the monitor — is the [`Fleet`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};
use std::time::Duration;

use breakwater_health::{ShardInfo, ShardProbes};

use crate::admission::tenant::Tenants;
use crate::policy::{Policy, Shard};
use crate::proxy::upstream::UpstreamClient;
use crate::routing::{Fleet, Router, ShardEntry};

/// One compiled policy set.
pub struct Table {
    /// The policy it was compiled from.
    pub policy: Policy,
    /// Shards, routes and the token estimator.
    pub router: Router,
    /// Tenants and their rate buckets.
    pub tenants: Tenants,
    /// The upstream client, with the policy's connect and pool timeouts.
    pub upstream: UpstreamClient,
    /// Which policy this is: the Git commit of its directory, or a hash of its contents.
    pub revision: String,
}

impl Table {
    /// Compiles `policy`, carrying live state over from `previous`; with `shared_limits`,
    /// tenant buckets are leased from the cluster's store.
    fn build(
        policy: Policy,
        revision: String,
        previous: Option<&Table>,
        fleet: &Arc<Fleet>,
        shared_limits: bool,
    ) -> Self {
        let router = Router::build(&policy, previous.map(|p| &p.router), fleet);
        let tenants = Tenants::carried(
            &policy.tenants,
            &policy.admission,
            previous.map(|p| &p.tenants),
            shared_limits,
        );
        Self {
            upstream: UpstreamClient::new(policy.timeouts.connect, policy.timeouts.pool_idle),
            policy,
            router,
            tenants,
            revision,
        }
    }

    /// The estimated prefill time of `prompt_tokens` on `shard`: prefill runs
    /// `routing.prefill_speedup` times faster than the shard's decode capacity.
    pub fn prefill_time(&self, shard: &ShardEntry, prompt_tokens: u64) -> Duration {
        let rate = shard.capacity_tps * self.policy.routing.prefill_speedup;
        Duration::from_secs_f64(prompt_tokens as f64 / rate.max(1.0))
    }

    /// What the health thread should watch for this table's shards.
    pub fn probes(&self) -> Vec<ShardProbes> {
        let specs: HashMap<&str, &Shard> = self
            .policy
            .shards
            .iter()
            .map(|s| (s.id.as_str(), s))
            .collect();
        self.router
            .shards()
            .iter()
            .map(|s| shard_probes(&self.policy, s, specs.get(s.id.as_str()).copied()))
            .collect()
    }
}

fn shard_probes(policy: &Policy, s: &ShardEntry, spec: Option<&Shard>) -> ShardProbes {
    use breakwater_health::check::CheckTarget;
    use breakwater_health::engine::{EngineMetrics, ScrapeTarget};
    use breakwater_health::gpu::GpuTarget;
    let base = s.url.as_str().trim_end_matches('/');
    let pool = policy.pools.iter().find(|p| p.id == s.pool);
    ShardProbes {
        info: ShardInfo {
            id: s.key,
            name: s.id.clone(),
            pool: s.pool.clone(),
        },
        check: CheckTarget {
            shard: s.key,
            url: format!(
                "{base}{}",
                pool.map_or("/health", |p| p.health_path.as_str())
            ),
        },
        scrape: pool.map(|p| ScrapeTarget {
            shard: s.key,
            url: format!("{base}{}", p.metrics_path),
            engine: EngineMetrics::for_engine(p.engine),
        }),
        gpu: spec.and_then(|sp| {
            sp.gpu_probe.as_ref().map(|probe| GpuTarget {
                shard: s.key,
                probe: probe.as_str().trim_end_matches('/').to_string(),
                devices: sp.gpu_devices.clone(),
            })
        }),
        tls: s.tls.as_ref().map(|t| breakwater_health::ProbeTls {
            id: t.id().to_string(),
            config: t.config(),
        }),
    }
}

/// The table in force, and the fleet every table shares.
pub struct Tables {
    current: ArcSwap<Table>,
    fleet: Arc<Fleet>,
    /// Whether tenant limits are leased from a cluster store: fixed at start, since the
    /// cluster task that settles the leases starts with the process.
    shared_limits: bool,
    /// Held while a table is built and installed: two reloads must not both build from
    /// the same previous table.
    installing: Mutex<()>,
}

impl Tables {
    /// The first table, from `policy`; its `[cluster]`, if any, shares tenant limits for
    /// as long as the process runs.
    pub fn new(policy: Policy, revision: String, fleet: Arc<Fleet>) -> Arc<Self> {
        let shared_limits = policy.cluster.is_some();
        let first = Table::build(policy, revision, None, &fleet, shared_limits);
        Arc::new(Self {
            current: ArcSwap::from_pointee(first),
            fleet,
            shared_limits,
            installing: Mutex::new(()),
        })
    }

    /// The table in force now, to keep for a whole request.
    pub fn load(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// The table in force now, for a quick look (do not hold it across an await).
    pub fn peek(&self) -> Guard<Arc<Table>> {
        self.current.load()
    }

    /// The fleet.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Compiles `policy` against the table in force and swaps it in; returns the new table
    /// and the one it replaced. Requests already running keep the old one.
    pub fn install(&self, policy: Policy, revision: String) -> (Arc<Table>, Arc<Table>) {
        let _one_at_a_time = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        let new = Arc::new(Table::build(
            policy,
            revision,
            Some(&old),
            &self.fleet,
            self.shared_limits,
        ));
        self.current.store(Arc::clone(&new));
        (new, old)
    }
}
