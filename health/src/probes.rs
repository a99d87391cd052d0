//! Every shard's probes — the active check, the engine scrape, the gpu-probe poll — as
//! tasks this module owns. [`Probes::apply`] takes a new set of shards (a policy reload):
//! the probes of shards that left stop, those of shards that joined start, those whose
//! targets or timings changed restart, and the rest keep running undisturbed.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
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

/// The HTTP client probes use (HTTP/1.1, no body; `http://`, and `https://` when built
/// with a [`ProbeTls`]).
pub type ProbeClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The client TLS for a shard's `https://` probes: the same trust anchors and client
/// certificate as its traffic. Equal when `id` is (a digest of what it trusts).
#[derive(Clone)]
pub struct ProbeTls {
    /// Identifies the configuration.
    pub id: String,
    /// The rustls client configuration.
    pub config: Arc<rustls::ClientConfig>,
}

impl PartialEq for ProbeTls {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl fmt::Debug for ProbeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeTls")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

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
    /// Client TLS for an `https://` shard's check and scrape.
    pub tls: Option<ProbeTls>,
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

/// A probe client whose connections time out after `connect`; `http://` only, or both
/// schemes with `tls`.
pub(crate) fn client(connect: Duration, nodelay: bool, tls: Option<&ProbeTls>) -> ProbeClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect));
    connector.set_nodelay(nodelay);
    connector.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let connector = match tls {
        Some(t) => builder
            .with_tls_config({
                // hyper-rustls sets ALPN itself (and insists on doing so).
                let mut config = (*t.config).clone();
                config.alpn_protocols.clear();
                config
            })
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector),
        // No TLS configuration: `https://` fails its handshake (a plain pool has none).
        None => builder
            .with_tls_config(trusting_nothing())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector),
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A client configuration with no trust anchors.
fn trusting_nothing() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b,
        // `ring` offers every default version, so this is not reached.
        Err(_) => rustls::ClientConfig::builder(),
    };
    builder
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

impl Clients {
    fn new(cfg: &HealthConfig, tls: Option<&ProbeTls>) -> Self {
        Self {
            check: client(cfg.check_timeout, true, tls),
            scrape: client(cfg.metrics_timeout, false, tls),
            gpu: client(cfg.gpu_timeout, false, None),
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
            clients: Clients::new(&cfg, None),
            cfg,
            running: SecondaryMap::new(),
        };
        for spec in shards {
            probes.spawn(spec, false);
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
        let joining = if cfg.checks_enabled() {
            Joining::AfterFirstCheck
        } else {
            Joining::InSlowStart
        };
        self.monitor.reconfigure(
            shards.iter().map(|s| s.info.clone()).collect(),
            cfg.clone(),
            joining,
        );
        // Shards new to the probes are checked soon: they take nothing until then.
        let new: std::collections::HashSet<ShardId> = shards
            .iter()
            .map(|s| s.info.id)
            .filter(|id| !self.running.contains_key(*id))
            .collect();
        if cfg != self.cfg {
            self.running.clear();
            self.clients = Clients::new(&cfg, None);
            self.cfg = cfg;
        }
        let keep: std::collections::HashSet<ShardId> = shards.iter().map(|s| s.info.id).collect();
        self.running.retain(|id, _| keep.contains(&id));
        for spec in shards {
            if self
                .running
                .get(spec.info.id)
                .is_some_and(|r| r.spec == spec)
            {
                continue;
            }
            let joined = new.contains(&spec.info.id);
            self.spawn(spec, joined);
        }
    }

    /// Starts `spec`'s probes; the first check of a shard that `joined` after the start
    /// comes within a tenth of the check interval (others' within one interval).
    fn spawn(&mut self, spec: ShardProbes, joined: bool) {
        let cfg = &self.cfg;
        let mut tasks = Vec::with_capacity(3);
        // An `https://` shard's check and scrape use clients with its pool's TLS.
        let own = spec.tls.as_ref().map(|t| Clients::new(cfg, Some(t)));
        let clients = own.as_ref().unwrap_or(&self.clients);
        if cfg.checks_enabled() {
            let (target, client) = (spec.check.clone(), clients.check.clone());
            let first_within = if joined {
                cfg.check_interval / 10
            } else {
                cfg.check_interval
            };
            tasks.push(Owned(spawn_check(
                target,
                client,
                cfg,
                first_within,
                self.monitor.clone(),
            )));
        }
        if let Some(t) = spec.scrape.clone() {
            if !cfg.metrics_interval.is_zero() && t.engine != EngineMetrics::Generic {
                tasks.push(Owned(spawn_scrape(
                    t,
                    clients.scrape.clone(),
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A health endpoint that counts the checks per path (`/a`, `/b`).
    async fn counting_server() -> (String, Arc<[AtomicU64; 2]>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let c = Arc::clone(&counts);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let text = String::from_utf8_lossy(&buf[..n]);
                        let i = usize::from(text.starts_with("GET /b"));
                        c[i].fetch_add(1, Ordering::Relaxed);
                        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(ok.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (base, counts)
    }

    fn spec(id: ShardId, name: &str, url: String) -> ShardProbes {
        ShardProbes {
            info: ShardInfo {
                id,
                name: name.into(),
                pool: "p".into(),
            },
            check: CheckTarget { shard: id, url },
            scrape: None,
            gpu: None,
            tls: None,
        }
    }

    #[tokio::test]
    async fn a_reconfigure_stops_the_probes_of_removed_shards_and_keeps_the_others() {
        let (base, counts) = counting_server().await;
        let mut keys = slotmap::SlotMap::<ShardId, ()>::with_key();
        let (a, b) = (keys.insert(()), keys.insert(()));
        let cfg = HealthConfig {
            check_interval: Duration::from_millis(40),
            check_timeout: Duration::from_millis(30),
            ..HealthConfig::default()
        };
        let monitor = HealthMonitor::spawn(Vec::new(), cfg.clone(), |_| {});
        let specs = vec![
            spec(a, "a", format!("{base}/a")),
            spec(b, "b", format!("{base}/b")),
        ];
        let mut probes = Probes::start(monitor, specs.clone(), cfg.clone());
        assert_eq!(probes.tasks(), 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = |i: usize| counts[i].load(Ordering::Relaxed);
        assert!(
            seen(0) > 0 && seen(1) > 0,
            "both checked: {} {}",
            seen(0),
            seen(1)
        );
        // b leaves; a is unchanged, so its task is the same one (not restarted).
        probes.apply(vec![specs[0].clone()], cfg);
        assert_eq!(probes.tasks(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (a_then, b_then) = (seen(0), seen(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(seen(1), b_then, "the removed shard is still being checked");
        assert!(seen(0) > a_then, "the kept shard is no longer checked");
    }
}
