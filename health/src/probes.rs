//! Every shard's probes — the active check, the engine scrape, the gpu-probe poll — as
//! tasks this module owns. [`Probes::apply`] takes a new set of shards (a policy reload):
//! the probes of shards that left stop, those of shards that joined start, those whose
//! targets or timings changed restart, and the rest keep running undisturbed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use slotmap::SecondaryMap;
use tokio::task::JoinHandle;

use crate::check::{spawn_check, CheckTarget};
use crate::config::HealthConfig;
use crate::engine::{spawn_scrape, EngineMetrics, ScrapeTarget};
use crate::gpu::{spawn_gpu_poll, GpuTarget};
use crate::monitor::{HealthMonitor, Joining, ShardInfo};
use crate::view::ShardId;

/// The HTTP client probes use (plain HTTP/1.1, no body).
pub type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// What to watch on one shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardProbes {
    /// The shard, for the monitor.
    pub info: ShardInfo,
    /// Its active check.
    pub check: CheckTarget,
    /// Its engine's metrics, unless the engine is generic.
    pub scrape: Option<ScrapeTarget>,
    /// Its gpu-probe, if it has one.
    pub gpu: Option<GpuTarget>,
}

/// A task that is stopped when this is dropped.
struct Owned(JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Running {
    spec: ShardProbes,
    /// Held for their drop.
    _tasks: Vec<Owned>,
}

/// The monitor and every shard's probe tasks.
pub struct Probes {
    monitor: HealthMonitor,
    cfg: HealthConfig,
    clients: Clients,
    running: SecondaryMap<ShardId, Running>,
}

struct Clients {
    check: ProbeClient,
    scrape: ProbeClient,
    gpu: ProbeClient,
}

/// A probe client whose connections time out after `connect`.
pub(crate) fn client(connect: Duration, nodelay: bool) -> ProbeClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect));
    connector.set_nodelay(nodelay);
    Client::builder(TokioExecutor::new()).build(connector)
}

impl Clients {
    fn new(cfg: &HealthConfig) -> Self {
        Self {
            check: client(cfg.check_timeout, true),
            scrape: client(cfg.metrics_timeout, false),
            gpu: client(cfg.gpu_timeout, false),
        }
    }
}

impl Probes {
    /// Starts the probes of `shards` on the current Tokio runtime, reporting to `monitor`,
    /// which is told of the shards (at full weight: the fleet the gateway starts with).
    pub fn start(monitor: HealthMonitor, shards: Vec<ShardProbes>, cfg: HealthConfig) -> Self {
        let infos = shards.iter().map(|s| s.info.clone()).collect();
        monitor.reconfigure(infos, cfg.clone(), Joining::AtFullWeight);
        let mut probes = Self {
            monitor,
            clients: Clients::new(&cfg),
            cfg,
            running: SecondaryMap::new(),
        };
        for spec in shards {
            probes.spawn(spec);
        }
        probes
    }

    /// The monitor the probes report to.
    pub fn monitor(&self) -> &HealthMonitor {
        &self.monitor
    }

    /// Probe tasks running now (for the admin API and tests).
    pub fn tasks(&self) -> usize {
        self.running.values().map(|r| r._tasks.len()).sum()
    }

    /// Moves to a new set of shards and settings: see the module's rule. With new
    /// timings, every probe restarts.
    pub fn apply(&mut self, shards: Vec<ShardProbes>, cfg: HealthConfig) {
        self.monitor.reconfigure(
            shards.iter().map(|s| s.info.clone()).collect(),
            cfg.clone(),
            Joining::InSlowStart,
        );
        if cfg != self.cfg {
            self.running.clear();
            self.clients = Clients::new(&cfg);
            self.cfg = cfg;
        }
        let keep: Vec<ShardId> = shards.iter().map(|s| s.info.id).collect();
        self.running.retain(|id, _| keep.contains(&id));
        for spec in shards {
            if self
                .running
                .get(spec.info.id)
                .is_some_and(|r| r.spec == spec)
            {
                continue;
            }
            self.spawn(spec);
        }
    }

    fn spawn(&mut self, spec: ShardProbes) {
        let cfg = &self.cfg;
        let mut tasks = Vec::with_capacity(3);
        if cfg.checks_enabled() {
            let (target, client) = (spec.check.clone(), self.clients.check.clone());
            tasks.push(Owned(spawn_check(
                target,
                client,
                cfg,
                self.monitor.clone(),
            )));
        }
        if let Some(t) = spec.scrape.clone() {
            if !cfg.metrics_interval.is_zero() && t.engine != EngineMetrics::Generic {
                tasks.push(Owned(spawn_scrape(
                    t,
                    self.clients.scrape.clone(),
                    cfg.metrics_interval,
                    cfg.metrics_timeout,
                    cfg.silent_death,
                    self.monitor.clone(),
                )));
            }
        }
        if let Some(t) = spec.gpu.clone() {
            let client = self.clients.gpu.clone();
            tasks.push(Owned(spawn_gpu_poll(t, client, cfg, self.monitor.clone())));
        }
        // Replacing an entry drops (and so stops) the tasks it had.
        self.running.insert(
            spec.info.id,
            Running {
                spec,
                _tasks: tasks,
            },
        );
    }
}
