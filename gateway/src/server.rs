//! Assembles the gateway from a policy and runs it on Pingora: the traffic listener (the
//! proxy) and the admin listener, each a Pingora service; the health thread; the policy
//! reload triggers (the directory watch and `SIGHUP`; the admin API has the third); and
//! the graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::listeners::TcpSocketOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::admin::FaultControls;
use crate::listeners::{ListenError, Listeners};
use crate::metrics::Metrics;
use crate::policy::revision::Revision;
use crate::policy::Policy;
use crate::reload::{HealthUpdates, Reloader, Retuned, Trigger};
use crate::routing::Fleet;
use crate::table::Tables;
use crate::tls::live::LiveCert;
use breakwater_health::{HealthMonitor, HealthView, Probes};

use crate::proxy::budget::BodyBudget;
use crate::proxy::retry::RetryBudget;
use crate::proxy::{Gateway, Lifecycle, State};

/// How to run one gateway process.
pub struct ServeOptions {
    /// The validated policy.
    pub policy: Policy,
    /// The directory it was read from, which reloads read again (`None`: a built-in
    /// policy, which cannot be reloaded).
    pub policy_dir: Option<PathBuf>,
    /// The policy's revision.
    pub revision: Revision,
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
    /// Where listening sockets are handed over in a zero-downtime upgrade: a running
    /// gateway sends them there on `SIGQUIT`; one started with `upgrade` takes them.
    pub upgrade_sock: PathBuf,
    /// Take the listening sockets of the gateway running on `upgrade_sock` instead of
    /// binding them.
    pub upgrade: bool,
    /// Where to write the listen addresses once they accept (for port 0).
    pub addr_file: Option<PathBuf>,
    /// An OTLP/HTTP collector to send spans to (`None`: no export).
    pub otlp_endpoint: Option<url::Url>,
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
    /// The policy directory cannot be watched.
    #[error(transparent)]
    Watch(#[from] crate::policy::watch::WatchError),
    /// A listen address is taken (or cannot be bound).
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// A listener's certificate cannot be used.
    #[error("the {listener} listener's certificate: {source}")]
    Tls {
        /// `traffic` or `admin`.
        listener: &'static str,
        /// Why.
        #[source]
        source: crate::tls::TlsError,
    },
    /// Pingora refused the TLS settings.
    #[error("TLS settings: {0}")]
    TlsSettings(String),
    /// `[cluster]` cannot start (its store client, its thread).
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Starts `[cluster]`, if the policy has one, on a thread of its own: settling leases must
/// not wait behind health checks, nor they behind a slow store.
fn start_cluster(
    tables: &Arc<Tables>,
    admission: &Arc<crate::admission::Admission>,
    metrics: &Metrics,
    port: u16,
) -> Result<Option<Arc<crate::cluster::Cluster>>, ServeError> {
    let Some(settings) = tables.peek().policy.cluster.clone() else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::Cluster(e.to_string()))?;
    // The store client is made here (inside the runtime it runs on), so a password file
    // that cannot be read stops the start; the store itself being down does not (it is
    // connected to on first use).
    let store = {
        let _inside = runtime.enter();
        crate::cluster::store::Store::open(&settings)
            .map_err(|e| ServeError::Cluster(e.to_string()))?
    };
    let cluster = crate::cluster::Cluster::new(settings, port, metrics)
        .map_err(|e| ServeError::Cluster(e.to_string()))?;
    let (run, tables, admission) = (
        Arc::clone(&cluster),
        Arc::clone(tables),
        Arc::clone(admission),
    );
    std::thread::Builder::new()
        .name("cluster".into())
        .spawn(move || runtime.block_on(run.run(store, tables, admission)))
        .map_err(|e| ServeError::Cluster(e.to_string()))?;
    tracing::info!(replica = %cluster.replica_id(), "cluster: tenant limits shared through the store");
    Ok(Some(cluster))
}

/// A listener's certificate, with whether it offers HTTP/2.
struct ListenerCert {
    cert: Arc<LiveCert>,
    http2: bool,
}

fn listener_cert(
    listener: &'static str,
    tls: Option<&crate::policy::ListenerTls>,
) -> Result<Option<ListenerCert>, ServeError> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let cert = LiveCert::load(format!("{listener} listener"), tls.files.clone())
        .map_err(|source| ServeError::Tls { listener, source })?;
    Ok(Some(ListenerCert {
        cert,
        http2: tls.http2,
    }))
}

/// Adds the listening socket `addr` (as Pingora names it) to `service`: HTTPS with `tls`.
fn add_listener<A>(
    service: &mut Service<A>,
    addr: &str,
    tls: Option<&ListenerCert>,
) -> Result<(), ServeError> {
    let mut socket = TcpSocketOptions::default();
    socket.so_reuseport = Some(true); // beside the reservation, and the other workers
    match tls {
        None => service.add_tcp_with_settings(addr, socket),
        Some(t) => {
            let settings = crate::tls::listener::settings(&t.cert, t.http2)
                .map_err(|e| ServeError::TlsSettings(e.to_string()))?;
            service.add_tls_with_settings(addr, Some(socket), settings);
        }
    }
    Ok(())
}

/// The health thread: its own single-threaded runtime (health must not depend on the
/// traffic runtimes' load) running the monitor, the probes and the `SIGHUP` watch.
struct HealthThread {
    monitor: HealthMonitor,
    runtime: tokio::runtime::Handle,
    updates: HealthUpdates,
}

/// Starts the health thread. The monitor publishes into `cell`; the probes start once
/// `initial` arrives on the returned thread's update channel.
fn start_health(
    policy: &Policy,
    cell: Arc<ArcSwap<HealthView>>,
) -> Result<HealthThread, ServeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Health)?;
    let monitor = {
        let _inside = runtime.enter();
        HealthMonitor::spawn(Vec::new(), policy.health.clone(), move |view| {
            cell.store(Arc::new(view))
        })
    };
    let (updates, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = runtime.handle().clone();
    let for_probes = monitor.clone();
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            runtime.block_on(async move {
                // The first update is the fleet the gateway starts with.
                let Some((initial, cfg)) = rx.recv().await else {
                    return;
                };
                let mut probes = Probes::start(for_probes, initial, cfg);
                while let Some((shards, cfg)) = rx.recv().await {
                    probes.apply(shards, cfg);
                }
            })
        })
        .map_err(ServeError::Health)?;
    Ok(HealthThread {
        monitor,
        runtime: handle,
        updates,
    })
}

/// Reloads on `SIGHUP`.
fn reload_on_sighup(runtime: &tokio::runtime::Handle, reloader: Arc<Reloader>) {
    runtime.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, "cannot watch SIGHUP"),
        };
        while hup.recv().await.is_some() {
            let r = Arc::clone(&reloader);
            let _ = tokio::task::spawn_blocking(move || r.reload(Trigger::Signal)).await;
        }
    });
}

/// How long an upgraded gateway keeps accepting beside its successor: Pingora's fixed
/// five seconds after the sockets are sent, and a little more.
const UPGRADE_OVERLAP: Duration = Duration::from_secs(6);

/// How often the policy directory is read even without a change event.
const POLICY_POLL: Duration = Duration::from_secs(10);
/// Quiet after a change event before the directory is read.
const POLICY_DEBOUNCE: Duration = Duration::from_millis(200);

/// Builds the services and serves until the process gets SIGINT or SIGTERM (both stop it
/// gracefully; see [`StopSignal`]). Does not return on success.
pub fn run(opts: ServeOptions) -> Result<(), ServeError> {
    let listen = opts.listen.unwrap_or(opts.policy.listen);
    let admin_listen = opts.admin_listen.unwrap_or(opts.policy.admin_listen);
    // Ports settled (0: chosen) and held before Pingora binds them; see `listeners`.
    let listeners = Listeners::reserve(listen, admin_listen, opts.upgrade)?;
    serve(opts, listeners, Box::pin(os_signals()))
}

/// How the gateway is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Drain and exit (`SIGTERM`, `SIGINT`).
    Drain,
    /// Hand the listening sockets to a new gateway, then drain and exit (`SIGQUIT`).
    HandOver,
}

/// What [`serve`] waits on to stop.
pub type StopSource = std::pin::Pin<Box<dyn std::future::Future<Output = Stop> + Send>>;

/// The process signals: `SIGTERM` and `SIGINT` drain, `SIGQUIT` hands over.
pub async fn os_signals() -> Stop {
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
        _ = wait(SignalKind::interrupt()) => { tracing::info!("SIGINT: stopping"); Stop::Drain }
        _ = wait(SignalKind::terminate()) => { tracing::info!("SIGTERM: stopping"); Stop::Drain }
        _ = wait(SignalKind::quit()) => {
            tracing::info!("SIGQUIT: handing the listening sockets to the new gateway");
            Stop::HandOver
        }
    }
}

/// [`run`] on listeners already reserved, stopping when `stop` resolves (see
/// [`StopSignal`] for what stopping does).
pub fn serve(opts: ServeOptions, listeners: Listeners, stop: StopSource) -> Result<(), ServeError> {
    let policy = opts.policy;
    let (listen, admin_listen) = (listeners.traffic, listeners.admin);
    let traffic_tls = listener_cert("traffic", policy.tls.as_ref())?;
    let admin_tls = listener_cert("admin", policy.admin_tls.as_ref())?;
    let h2c = policy.h2c;
    let metrics = Arc::new(Metrics::try_new()?);
    let cell = Arc::new(ArcSwap::from_pointee(HealthView::default()));
    let health = start_health(&policy, Arc::clone(&cell))?;
    let fleet = Fleet::new(health.monitor.clone(), cell);
    let (max_buffered, retries) = (policy.limits.max_buffered_bytes, policy.retries.clone());
    let tables = Tables::new(policy, opts.revision.label(), fleet);
    {
        let table = tables.peek();
        let _ = health
            .updates
            .send((table.probes(), table.policy.health.clone()));
    }
    let admission = crate::admission::Admission::new(Arc::clone(&tables));
    let cluster = start_cluster(&tables, &admission, &metrics, listen.port())?;
    let lifecycle = Arc::new(Lifecycle::default());
    let state = Arc::new(State {
        cluster,
        tables: Arc::clone(&tables),
        metrics: Arc::clone(&metrics),
        body_budget: BodyBudget::new(max_buffered),
        retry_budget: RetryBudget::new(retries),
        admission: Arc::clone(&admission),
        lifecycle: Arc::clone(&lifecycle),
        history: Arc::default(),
        decisions: Arc::default(),
        journal: Arc::default(),
        otlp: opts.otlp_endpoint.as_ref().map(|url| {
            tracing::info!(endpoint = %url, "exporting spans over OTLP/HTTP");
            crate::otlp::Exporter::start(&health.runtime, url)
        }),
        admin_token: Arc::from(opts.admin_token.as_str()),
        responses: Arc::default(),
    });
    health
        .runtime
        .spawn(Arc::clone(&state.history).run_ticker());
    let reloader = Reloader::new(
        opts.policy_dir.clone(),
        Arc::clone(&tables),
        opts.revision,
        Retuned {
            admission: Arc::clone(&admission),
            body_budget: Arc::clone(&state.body_budget),
            retry_budget: Arc::clone(&state.retry_budget),
            journal: Arc::clone(&state.journal),
            metrics: Arc::clone(&metrics),
            health: health.updates.clone(),
        },
    );
    reload_on_sighup(&health.runtime, Arc::clone(&reloader));
    let discovery = crate::discovery::Discovery::new(Arc::clone(&reloader), &metrics)?;
    health.runtime.spawn(Arc::clone(&discovery).run());
    if let Some(dir) = opts.policy_dir {
        let r = Arc::clone(&reloader);
        crate::policy::watch::spawn(dir, POLICY_DEBOUNCE, POLICY_POLL, move || {
            let _ = r.reload(Trigger::Watch);
        })?;
    }

    let threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let grace = tables.peek().policy.shutdown.grace;
    let conf = ServerConf {
        threads: threads.max(1),
        // One single-threaded runtime per worker, so a request, its upstream connection
        // and their wake-ups stay on one thread (see `proxy::upstream`).
        work_stealing: false,
        // After the listeners close, requests in flight have this long; the process exits
        // as soon as none is left (see `StopSignal`), and a stream still running when
        // `shutdown.grace` ends gets an error event first, hence the extra second.
        grace_period_seconds: Some(grace.as_secs() + 2),
        graceful_shutdown_timeout_seconds: Some(1),
        // Every Pingora timeout of a second or more on Tokio's timers: Pingora's own timer
        // wheel needs a thread that wakes every millisecond, busy or idle.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        upgrade_sock: opts.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade: opts.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    // With `upgrade`: waits here for the running gateway's listening sockets.
    server.bootstrap();

    // One single-threaded service per worker, each with its own SO_REUSEPORT listener: the
    // kernel spreads connections over them, and a connection is accepted, read and answered
    // on one thread. (With one shared listener, Pingora accepts on one runtime and serves on
    // another, and every read then costs a cross-thread wake-up.)
    let traffic = (0..threads.max(1))
        .map(|i| {
            let mut service = Service::new(
                format!("breakwater traffic {i}"),
                Gateway::new(Arc::clone(&state), h2c),
            );
            service.threads = Some(1);
            add_listener(
                &mut service,
                &listener_name(listen, i),
                traffic_tls.as_ref(),
            )?;
            Ok(service)
        })
        .collect::<Result<Vec<_>, ServeError>>()?;
    if opts.admin_token.is_empty() {
        tracing::warn!(
            "BREAKWATER_ADMIN_TOKEN is unset: the admin API's /admin routes refuse every request"
        );
    }
    let admin = Admin::new(Arc::clone(&state), reloader, discovery, opts.fault_controls);
    let mut admin_service = Service::new("breakwater admin".to_string(), admin);
    add_listener(
        &mut admin_service,
        &admin_listen.to_string(),
        admin_tls.as_ref(),
    )?;
    for service in traffic {
        server.add_service(service);
    }
    server.add_service(admin_service);
    tracing::info!(%listen, %admin_listen, threads, "{}", tables.peek().policy.summary());
    let scheme = |tls: &Option<ListenerCert>| if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        "breakwater listening on {}://{listen} (admin {}://{admin_listen})",
        scheme(&traffic_tls),
        scheme(&admin_tls)
    );
    if let Some(path) = opts.addr_file {
        crate::listeners::write_when_listening(path, listen, admin_listen);
    }
    let _held = listeners;
    server.run(RunArgs {
        shutdown_signal: Box::new(StopSignal {
            state,
            stop: std::sync::Mutex::new(Some(stop)),
        }),
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

/// [`Stop::HandOver`] (`SIGQUIT`) hands the listening sockets to a new gateway started
/// with `--upgrade` (a zero-downtime binary upgrade): both accept for five seconds, then
/// this one closes its listeners and drains as below.
///
/// [`Stop::Drain`] (Ctrl-C, SIGTERM) stops the gateway gracefully:
/// 1. `/readyz` answers 503 at once, and answers say `connection: close`, while new
///    connections are still accepted for `gateway.shutdown_delay_ms` (load balancers
///    notice and stop sending);
/// 2. the listeners close; requests and streams in flight have `gateway.shutdown_grace_ms`
///    to finish, and the process exits as soon as none is left;
/// 3. a stream still running when the grace ends gets an SSE error event (`shutting_down`)
///    and is closed.
///
/// (Pingora's own handling of SIGINT shuts the runtimes down at once, and its accept loops
/// can then spin on "runtime is shutting down" errors and keep the process alive.)
struct StopSignal {
    state: Arc<State>,
    /// Taken by the first (and only) wait.
    stop: std::sync::Mutex<Option<StopSource>>,
}

#[async_trait::async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        let upgrade = match stop {
            Some(stop) => stop.await == Stop::HandOver,
            None => std::future::pending().await,
        };
        let shutdown = self.state.tables.peek().policy.shutdown;
        let lifecycle = Arc::clone(&self.state.lifecycle);
        let cluster = self.state.cluster.clone();
        // An upgrade: Pingora sends the sockets, both processes accept for its fixed five
        // seconds, then this one closes its listeners. A stop: the policy's delay.
        let listening_for = if upgrade {
            UPGRADE_OVERLAP
        } else {
            shutdown.delay
        };
        lifecycle.stop(listening_for + shutdown.grace);
        tracing::info!(
            listening_ms = listening_for.as_millis() as u64,
            grace_ms = shutdown.grace.as_millis() as u64,
            in_flight = lifecycle.in_flight(),
            "not ready; closing the listeners after the delay"
        );
        let exit_when_drained = move || {
            std::thread::sleep(if upgrade {
                UPGRADE_OVERLAP
            } else {
                Duration::ZERO
            });
            while lifecycle.in_flight() > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(cluster) = cluster {
                cluster.leave();
            }
            tracing::info!("shutdown: nothing left in flight, exiting");
            std::process::exit(0);
        };
        if !upgrade {
            tokio::time::sleep(shutdown.delay).await;
        }
        // Exit as soon as the last request in flight is done (Pingora would wait out its
        // whole grace period otherwise).
        if let Err(e) = std::thread::Builder::new()
            .name("drain-exit".into())
            .spawn(exit_when_drained)
        {
            tracing::warn!(error = %e, "cannot watch the drain; exiting after the grace period");
        }
        if upgrade {
            return ShutdownSignal::GracefulUpgrade;
        }
        tracing::info!(
            in_flight = self.state.lifecycle.in_flight(),
            "closing the listeners"
        );
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
