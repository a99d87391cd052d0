//! Assembles the gateway from a policy and runs it on Pingora: the traffic listener (the
//! proxy) and the admin listener, each a Pingora service.

use std::net::SocketAddr;
use std::sync::Arc;

use pingora::listeners::TcpSocketOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::demo::FaultControls;
use crate::metrics::Metrics;
use crate::policy::Policy;
use breakwater_health::check::{spawn_checks, CheckTarget};
use breakwater_health::engine::{spawn_scrapes, EngineMetrics, ScrapeTarget};
use breakwater_health::gpu::{spawn_gpu_polls, GpuTarget};
use breakwater_health::{HealthMonitor, ShardInfo};

use crate::proxy::budget::BodyBudget;
use crate::proxy::retry::RetryBudget;
use crate::proxy::upstream::UpstreamClient;
use crate::proxy::{Gateway, State};
use crate::routing::Router;

/// How to run one gateway process.
pub struct ServeOptions {
    /// The validated policy.
    pub policy: Policy,
    /// Traffic listener (overrides the policy's).
    pub listen: Option<SocketAddr>,
    /// Admin listener (overrides the policy's).
    pub admin_listen: Option<SocketAddr>,
    /// Admin bearer token; empty turns the admin API's protected routes off.
    pub admin_token: String,
    /// Demo mode: where the simulated shards and probes take faults.
    pub fault_controls: FaultControls,
    /// Worker threads (default: one per CPU).
    pub threads: Option<usize>,
}

/// Errors building the gateway before it serves.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The health monitor's thread or runtime could not start.
    #[error("starting the health monitor: {0}")]
    Health(#[source] std::io::Error),
    /// The traffic address is taken (or cannot be bound).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Starts the health monitor and the active checks on their own thread and runtime (they
/// must not depend on the traffic runtimes' load), publishing into `router`.
fn start_health(policy: &Policy, router: Arc<Router>) -> Result<HealthMonitor, ServeError> {
    let shards: Vec<ShardInfo> = policy
        .shards
        .iter()
        .map(|s| ShardInfo {
            id: s.id.clone(),
            pool: s.pool.clone(),
        })
        .collect();
    let targets: Vec<CheckTarget> = policy
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let path = policy
                .pools
                .iter()
                .find(|p| p.id == s.pool)
                .map_or("/health", |p| p.health_path.as_str());
            CheckTarget {
                shard: i,
                url: format!("{}{}", s.url.as_str().trim_end_matches('/'), path),
            }
        })
        .collect();
    let gpu_targets: Vec<GpuTarget> = policy
        .shards
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.gpu_probe.as_ref().map(|probe| GpuTarget {
                shard: i,
                probe: probe.as_str().trim_end_matches('/').to_string(),
                devices: s.gpu_devices.clone(),
            })
        })
        .collect();
    let scrape_targets: Vec<ScrapeTarget> = policy
        .shards
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let pool = policy.pools.iter().find(|p| p.id == s.pool)?;
            let kind = serde_json::to_value(pool.engine).ok()?;
            Some(ScrapeTarget {
                shard: i,
                url: format!(
                    "{}{}",
                    s.url.as_str().trim_end_matches('/'),
                    pool.metrics_path
                ),
                engine: EngineMetrics::for_engine(kind.as_str()?),
            })
        })
        .collect();
    let cfg = policy.health.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Health)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            runtime.block_on(async move {
                let monitor = HealthMonitor::spawn(shards, cfg.clone(), move |view| {
                    router.publish_health(view)
                });
                spawn_checks(targets, &cfg, monitor.clone());
                spawn_gpu_polls(gpu_targets, &cfg, monitor.clone());
                spawn_scrapes(
                    scrape_targets,
                    cfg.metrics_interval,
                    cfg.metrics_timeout,
                    cfg.silent_death,
                    monitor.clone(),
                );
                let _ = tx.send(monitor);
                std::future::pending::<()>().await
            })
        })
        .map_err(ServeError::Health)?;
    rx.recv()
        .map_err(|_| ServeError::Health(std::io::Error::other("the health thread exited")))
}

/// Builds the services and serves until the process gets SIGINT or SIGTERM (both stop it
/// gracefully). Does not return on success.
pub fn run(opts: ServeOptions) -> Result<(), ServeError> {
    let policy = Arc::new(opts.policy);
    let listen = opts.listen.unwrap_or(policy.listen);
    let admin_listen = opts.admin_listen.unwrap_or(policy.admin_listen);
    // The workers' listeners share the port through SO_REUSEPORT, which would also let a
    // second gateway started on the same port silently take half the connections. A plain
    // bind first makes a taken port an error, as it is for any server.
    std::net::TcpListener::bind(listen).map_err(|source| ServeError::Listen {
        addr: listen,
        source,
    })?;
    let router = Arc::new(Router::new(&policy));
    let metrics = Arc::new(Metrics::try_new()?);
    let health = start_health(&policy, Arc::clone(&router))?;
    let admission = crate::admission::Admission::new(&policy, Arc::clone(&router));
    let state = Arc::new(State {
        policy: Arc::clone(&policy),
        router: Arc::clone(&router),
        upstream: UpstreamClient::new(policy.timeouts.connect, policy.timeouts.pool_idle),
        metrics: Arc::clone(&metrics),
        body_budget: BodyBudget::new(policy.limits.max_buffered_bytes),
        retry_budget: RetryBudget::new(policy.retries.clone()),
        health: health.clone(),
        shard_tags: crate::proxy::ShardTags::for_router(&router),
        admission: Arc::clone(&admission),
    });

    let threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let conf = ServerConf {
        threads: threads.max(1),
        // One single-threaded runtime per worker, so a request, its upstream connection
        // and their wake-ups stay on one thread (see `proxy::upstream`).
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        // Every Pingora timeout of a second or more on Tokio's timers: Pingora's own timer
        // wheel needs a thread that wakes every millisecond, busy or idle.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    // One single-threaded service per worker, each with its own SO_REUSEPORT listener: the
    // kernel spreads connections over them, and a connection is accepted, read and answered
    // on one thread. (With one shared listener, Pingora accepts on one runtime and serves on
    // another, and every read then costs a cross-thread wake-up.)
    let traffic: Vec<_> = (0..threads.max(1))
        .map(|i| {
            let mut service = Service::new(
                format!("breakwater traffic {i}"),
                Gateway::new(Arc::clone(&state)),
            );
            service.threads = Some(1);
            let mut socket = TcpSocketOptions::default();
            socket.so_reuseport = Some(true);
            service.add_tcp_with_settings(&listener_name(listen, i), socket);
            service
        })
        .collect();
    if opts.admin_token.is_empty() {
        tracing::warn!(
            "BREAKWATER_ADMIN_TOKEN is unset: the admin API's /admin routes refuse every request"
        );
    }
    let admin = Admin::new(
        router,
        metrics,
        health,
        admission,
        opts.admin_token,
        policy.home_region.clone(),
        opts.fault_controls,
    );
    let mut admin_service = Service::new("breakwater admin".to_string(), admin);
    admin_service.add_tcp(&admin_listen.to_string());
    for service in traffic {
        server.add_service(service);
    }
    server.add_service(admin_service);
    tracing::info!(%listen, %admin_listen, threads, "{}", policy.summary());
    tracing::info!("breakwater listening on http://{listen} (admin http://{admin_listen})");
    server.run(RunArgs {
        shutdown_signal: Box::new(StopSignal),
    });
    std::process::exit(0)
}

/// The `i`-th worker's spelling of `addr`. Pingora hands every service that names the same
/// address string the same listening socket (and each closes it at shutdown: the process
/// aborts on the second close); a port padded with `i` more leading zeros is the same address
/// under another name, so each worker binds a socket of its own in the SO_REUSEPORT group.
fn listener_name(addr: SocketAddr, i: usize) -> String {
    let port = addr.port();
    let width = port.to_string().len() + i;
    match addr {
        SocketAddr::V4(a) => format!("{}:{port:0width$}", a.ip()),
        SocketAddr::V6(a) => format!("[{}]:{port:0width$}", a.ip()),
    }
}

/// Ctrl-C (SIGINT) and SIGTERM both stop the gateway gracefully: listeners stop accepting
/// first, then in-flight requests get `graceful_shutdown_timeout_seconds` to finish.
/// Pingora's own handling of SIGINT shuts the runtimes down at once, and its accept loops
/// can then spin on "runtime is shutting down" errors and keep the process alive (seen
/// under test: 15 s and a million log lines before it was killed).
struct StopSignal;

#[async_trait::async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        async fn wait(kind: SignalKind) {
            match signal(kind) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch a signal");
                    std::future::pending::<()>().await
                }
            }
        }
        tokio::select! {
            _ = wait(SignalKind::interrupt()) => tracing::info!("SIGINT: stopping"),
            _ = wait(SignalKind::terminate()) => tracing::info!("SIGTERM: stopping"),
        }
        ShutdownSignal::GracefulTerminate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_names_the_same_address_differently() {
        for addr in ["127.0.0.1:8080", "[::1]:443", "0.0.0.0:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let names: Vec<String> = (0..4).map(|i| listener_name(addr, i)).collect();
            for (i, name) in names.iter().enumerate() {
                assert_eq!(name.parse::<SocketAddr>().unwrap(), addr, "{name}");
                assert!(!names[..i].contains(name), "{name} repeats");
            }
        }
        assert_eq!(
            listener_name("127.0.0.1:8080".parse().unwrap(), 0),
            "127.0.0.1:8080"
        );
    }
}
