//! A fleet of gateways: replicas that share tenant limits through a store (`[cluster]`).
//!
//! Every tenant's RPM and TPM bucket lives in the store (Redis or Valkey), refilled by the
//! store's clock. A replica holds a *lease* on each — units taken from the store's bucket
//! that its requests spend without asking anyone ([`crate::admission::rate`]) — and settles
//! every lease in one script call each `sync_ms` ([`store::Store::settle`]): what it spent
//! and what it wants next (what it was asked for lately, a share of the store's level while
//! that is plenty, nothing when idle: an idle replica hands its lease back). Units are
//! conserved — whatever a replica spends was first taken from the store — so the tenants'
//! limits hold across replicas to within the leases outstanding, whatever the replicas'
//! number or clocks.
//!
//! Each replica beats a heartbeat into a sorted set every `heartbeat_ms`
//! ([`store::Store::heartbeat`]) with what it asks of each pool (requests in flight and
//! queued), so every replica knows the others and their demand, and divides each shard's
//! batch slots among them the same way ([`crate::admission::slots::allot`]): the replicas
//! together fill no more slots than the engine runs. The token limit each learns from time
//! to first token is the shard's, divided the same way; and one replica per pool tries one
//! more slot while the others follow the engine's counts.
//!
//! The store is optional and fallible. When the store does not answer within `timeout_ms` (down, hung, partitioned)
//! every leased bucket refills locally at `1 ÷ replicas` of its tenant's rate until the
//! store answers again, one log line per transition; no request waits on the store.

pub mod store;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use serde::Serialize;

use crate::admission::rate::{Bucket, LeaseAsk};
use crate::admission::slots::allot;
use crate::admission::Admission;
use crate::metrics::Metrics;
use crate::policy::ClusterSettings;
use crate::table::Tables;
use store::{Beat, Report, Settle, Store};

/// The units a shard's token limit is divided into among replicas ([`allot`]).
const SHARE_UNITS: u64 = 1000;

/// Why the cluster cannot start or a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The store refused, failed or answered something unexpected.
    #[error("store: {0}")]
    Store(String),
    /// The store did not answer in time.
    #[error("store: no answer within {0:?}")]
    Timeout(Duration),
    /// The password could not be read.
    #[error("store password: {0}")]
    Secret(String),
    /// A `[cluster.tls]` file could not be read.
    #[error("store TLS: {0}")]
    Tls(String),
    /// The cluster's metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Whether the store answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    /// Not reached yet since start.
    Connecting,
    /// Answering: limits are the store's.
    Up,
    /// Not answering: limits are local, at this replica's share.
    Down,
}

/// One replica the store has heard from.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaSeen {
    /// Its id.
    pub id: String,
    /// Since its last heartbeat, milliseconds.
    pub last_beat_ms: u64,
}

/// What `/admin/status` and the dashboard show of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// This replica's id.
    pub replica_id: String,
    /// The store's URL (never credentials: the policy holds none).
    pub store: String,
    /// Whether the store answers.
    pub state: StoreState,
    /// Since the last change of `state`, milliseconds.
    pub state_for_ms: u64,
    /// The last store error, if the store is down.
    pub last_error: Option<String>,
    /// The replicas heard from within the TTL, this one included.
    pub replicas: Vec<ReplicaSeen>,
    /// Settlings that failed since start.
    pub store_errors_total: u64,
}

struct Shared {
    state: StoreState,
    since: Instant,
    last_error: Option<String>,
    replicas: Vec<ReplicaSeen>,
}

/// The cluster: this replica's link to the others through the store.
pub struct Cluster {
    settings: ClusterSettings,
    replica_id: String,
    shared: Mutex<Shared>,
    gauges: Gauges,
    /// Told when the process stops: hand the leases back and leave.
    stopping: tokio::sync::Notify,
    /// Set (and signalled) once the leases are handed back.
    left: (Mutex<bool>, std::sync::Condvar),
}

struct Gauges {
    store_up: IntGauge,
    replicas: IntGauge,
    store_errors: IntCounter,
    settles: IntCounter,
}

impl Gauges {
    fn new(metrics: &Metrics) -> Result<Self, ClusterError> {
        let g = Self {
            store_up: IntGauge::new(
                "cluster_store_up",
                "1 while the cluster store answers (limits shared), 0 while limits are local.",
            )?,
            replicas: IntGauge::new(
                "cluster_replicas",
                "Gateway replicas the store has heard from within replica_ttl_ms, this one included.",
            )?,
            store_errors: IntCounter::new(
                "cluster_store_errors_total",
                "Store calls (settling leases, heartbeats) that failed or timed out.",
            )?,
            settles: IntCounter::new(
                "cluster_settles_total",
                "Settlings of this replica's leases with the store.",
            )?,
        };
        metrics.register(Box::new(g.store_up.clone()))?;
        metrics.register(Box::new(g.replicas.clone()))?;
        metrics.register(Box::new(g.store_errors.clone()))?;
        metrics.register(Box::new(g.settles.clone()))?;
        Ok(g)
    }
}

/// The store key of tenant `tenant`'s `kind` (`rpm` or `tpm`) bucket.
pub fn bucket_key(prefix: &str, tenant: &str, kind: &str) -> String {
    format!("{prefix}:tenant:{tenant}:{kind}")
}

/// This replica's id when the policy names none: the host name and the traffic port.
pub fn default_replica_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into());
    format!("{host}:{port}")
}

impl Cluster {
    /// The cluster of `settings`, its metrics registered; [`Cluster::run`] drives it.
    pub fn new(
        settings: ClusterSettings,
        traffic_port: u16,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, ClusterError> {
        let replica_id = settings
            .replica_id
            .clone()
            .unwrap_or_else(|| default_replica_id(traffic_port));
        Ok(Arc::new(Self {
            settings,
            replica_id,
            shared: Mutex::new(Shared {
                state: StoreState::Connecting,
                since: Instant::now(),
                last_error: None,
                replicas: Vec::new(),
            }),
            gauges: Gauges::new(metrics)?,
            stopping: tokio::sync::Notify::new(),
            left: (Mutex::new(false), std::sync::Condvar::new()),
        }))
    }

    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// A snapshot for the admin API.
    pub fn view(&self) -> ClusterView {
        let s = self.lock();
        ClusterView {
            replica_id: self.replica_id.clone(),
            store: self.settings.store.to_string(),
            state: s.state,
            state_for_ms: s.since.elapsed().as_millis() as u64,
            last_error: s.last_error.clone(),
            replicas: s.replicas.clone(),
            store_errors_total: self.gauges.store_errors.get(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replicas last seen (at least this one).
    fn replica_count(&self) -> usize {
        self.lock().replicas.len().max(1)
    }

    /// The process is stopping (nothing is in flight any more): hands this replica's leases
    /// back to the store and leaves the replica set, so the others have the tenants'
    /// allowance and the shards' slots at once rather than after `replica_ttl_ms`. Waits for
    /// a settling under way and the two calls, each bounded by `timeout_ms`; `false` if that
    /// was not done in time (the store down: the leases then return to the store by its
    /// refill, and the replica drops out by its TTL).
    pub fn leave(&self) -> bool {
        let wait = self.settings.timeout * 4 + Duration::from_millis(50);
        self.stopping.notify_one();
        let (done, signal) = &self.left;
        let done = done.lock().unwrap_or_else(|p| p.into_inner());
        let (done, _) = signal
            .wait_timeout_while(done, wait, |d| !*d)
            .unwrap_or_else(|p| p.into_inner());
        *done
    }

    async fn hand_back(&self, store: &Store, tables: &Tables, replicas_key: &str, prefix: &str) {
        let settled = self.settle(store, tables, Duration::ZERO, true).await;
        let left = store.leave(replicas_key, &self.replica_id, prefix).await;
        match settled.and_then(|units| left.map(|()| units)) {
            Ok(units) => tracing::info!(
                replica = %self.replica_id,
                units = units.round() as u64,
                "cluster: leases handed back to the store, left the replica set"
            ),
            Err(e) => tracing::warn!(
                replica = %self.replica_id,
                error = %e,
                "cluster: could not hand the leases back; the store refills them"
            ),
        }
        let (done, signal) = &self.left;
        *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        signal.notify_all();
    }

    /// Settles leases and beats the heartbeat through `store` until the process ends. The
    /// store being unreachable is a state ([`StoreState::Down`]), not an end.
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        tables: Arc<Tables>,
        admission: Arc<Admission>,
    ) {
        let replicas_key = format!("{}:replicas", self.settings.key_prefix);
        let demand_prefix = format!("{}:demand:", self.settings.key_prefix);
        let mut tick = tokio::time::interval(self.settings.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_settle = Instant::now();
        let mut last_beat: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stopping.notified() => {
                    self.hand_back(&store, &tables, &replicas_key, &demand_prefix).await;
                    return;
                }
            }
            let beat_due = last_beat.is_none_or(|b| b.elapsed() >= self.settings.heartbeat);
            let elapsed = last_settle.elapsed();
            last_settle = Instant::now();
            // The heartbeat (with the report the division follows) and the settling go out
            // together, so neither waits a round trip for the other.
            let report = own_report(&tables, &admission);
            let beat = async {
                if !beat_due && self.lock().state == StoreState::Up {
                    return None;
                }
                Some(
                    store
                        .heartbeat(
                            &replicas_key,
                            &self.replica_id,
                            self.settings.replica_ttl,
                            &report.format(),
                            &demand_prefix,
                        )
                        .await,
                )
            };
            let (beat, settled) = tokio::join!(beat, self.settle(&store, &tables, elapsed, false));
            match beat {
                Some(Ok(beats)) => {
                    last_beat = Some(Instant::now());
                    self.allot_slots(&tables, &beats, &report);
                    self.replicas_seen(beats);
                    if settled.is_ok() {
                        self.store_answered(&tables);
                    }
                }
                Some(Err(e)) => self.store_failed(&tables, &e),
                None => {}
            }
            if let Err(e) = settled {
                self.store_failed(&tables, &e);
            }
        }
    }

    /// Divides each shard's slots (declared or learned) and its learned token limit among
    /// the replicas the heartbeat saw, by what each asks of the shard's pool ([`allot`]),
    /// and leaves the tries of one more slot to one replica: the first (by id) that asks
    /// anything of the pool, which adds the slot it tries to its part (the others divide
    /// the slots without it, and learn the answer from the engine's counts). A part is
    /// never more than the slots less what the others reported in flight on the shard:
    /// when the division moves slots from one replica to another, the one gaining them
    /// fills them as the other's requests end, not before, so together they never run
    /// more than the engine has (the engine would queue the rest where the gateway's
    /// priorities cannot reach). Alone, this replica has everything. Allotments stand
    /// while the store is unreachable (the last share known).
    fn allot_slots(&self, tables: &Tables, beats: &[Beat], own: &Report) {
        let table = tables.peek();
        let mut replicas: Vec<&Beat> = beats.iter().collect();
        replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        let me = replicas.iter().position(|b| b.replica == self.replica_id);
        // What the other replicas reported in flight, by shard: summed once, not per shard.
        let mut others_in_flight: std::collections::HashMap<&str, f64> = Default::default();
        for b in replicas.iter().filter(|b| b.replica != self.replica_id) {
            for (shard, n) in &b.report.in_flight {
                *others_in_flight.entry(shard.as_str()).or_default() += n;
            }
        }
        for s in table.router.shards() {
            let Some(me) = me.filter(|_| replicas.len() > 1) else {
                s.slots.set_allotment(None);
                s.slots.set_may_try(true);
                s.limit.set_share(None);
                continue;
            };
            let demand: Vec<f64> = replicas
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let of = if i == me { own } else { &b.report };
                    of.demand
                        .iter()
                        .find(|(p, _)| *p == s.pool)
                        .map_or(0.0, |(_, d)| *d)
                })
                .collect();
            let prober = demand.iter().position(|d| *d > 0.0).unwrap_or(0);
            s.slots.set_may_try(me == prober);
            s.limit.set_share(Some(
                allot(SHARE_UNITS, &demand)[me] as f64 / SHARE_UNITS as f64,
            ));
            let Some(slots) = s.max_in_flight() else {
                s.slots.set_allotment(None);
                continue;
            };
            let trying = u64::from(s.max_requests.is_none() && s.slots.is_trying());
            let part = allot(slots.saturating_sub(trying), &demand)[me] + trying;
            let others = others_in_flight.get(s.id.as_str()).copied().unwrap_or(0.0);
            let free = slots.saturating_sub(others.round() as u64);
            s.slots.set_allotment(Some(part.min(free)));
        }
    }

    /// One settling of every leased bucket of the table in force; with `hand_back`, every
    /// lease goes back whole (the replica is leaving). Returns the units handed back.
    async fn settle(
        &self,
        store: &Store,
        tables: &Tables,
        elapsed: Duration,
        hand_back: bool,
    ) -> Result<f64, ClusterError> {
        let table = tables.load();
        let replicas = self.replica_count();
        // Leases cover the demand of two settlings, so one late answer refuses nobody.
        let ahead = self.settings.sync_interval * 2;
        let mut buckets: Vec<(&Bucket, LeaseAsk)> = Vec::new();
        let mut batch = Vec::new();
        for t in table.tenants.all() {
            for (kind, bucket) in [("rpm", &t.rpm), ("tpm", &t.tpm)] {
                let Some(bucket) = bucket else { continue };
                let Some(mut ask) = bucket.lease_ask(elapsed, ahead, replicas) else {
                    continue;
                };
                if hand_back {
                    ask.want = 0.0;
                }
                batch.push(Settle {
                    key: bucket_key(&self.settings.key_prefix, &t.id, kind),
                    per_minute: bucket.per_minute(),
                    want: ask.want,
                    held: ask.held,
                    init: bucket.store_level(),
                });
                buckets.push((bucket, ask));
            }
        }
        // On failure nothing was settled: the leases stand, and the buckets fall back.
        let answers = store.settle(&batch).await?;
        let mut returned = 0.0;
        for ((bucket, ask), answer) in buckets.iter().zip(answers) {
            bucket.lease_settled(*ask, answer.granted, answer.level);
            returned += (-answer.granted).max(0.0);
        }
        self.gauges.settles.inc();
        Ok(returned)
    }

    fn replicas_seen(&self, mut seen: Vec<Beat>) {
        seen.sort_by(|a, b| a.replica.cmp(&b.replica));
        let mut s = self.lock();
        s.replicas = seen
            .into_iter()
            .map(|b| ReplicaSeen {
                id: b.replica,
                last_beat_ms: b.ago.as_millis() as u64,
            })
            .collect();
        self.gauges.replicas.set(s.replicas.len() as i64);
    }

    /// The store answered: if it had not been, leasing resumes.
    fn store_answered(&self, tables: &Tables) {
        let mut s = self.lock();
        if s.state == StoreState::Up {
            return;
        }
        let was = s.state;
        s.state = StoreState::Up;
        s.since = Instant::now();
        s.last_error = None;
        drop(s);
        self.gauges.store_up.set(1);
        for_each_bucket(tables, Bucket::resume_leasing);
        match was {
            StoreState::Down => tracing::info!(
                replica = %self.replica_id,
                "cluster store answers again: tenant limits are shared again"
            ),
            _ => tracing::info!(
                replica = %self.replica_id,
                replicas = self.replica_count(),
                "cluster store reached: tenant limits are shared"
            ),
        }
    }

    /// A store call failed: every leased bucket falls back to this replica's share — at
    /// every failure, not only the first, so a bucket a reload made during the outage
    /// (leased, empty) falls back too; for one already falling back it changes nothing.
    fn store_failed(&self, tables: &Tables, e: &ClusterError) {
        self.gauges.store_errors.inc();
        let mut s = self.lock();
        s.last_error = Some(e.to_string());
        let was_down = std::mem::replace(&mut s.state, StoreState::Down) == StoreState::Down;
        let replicas = s.replicas.len().max(1);
        if !was_down {
            s.since = Instant::now();
        }
        drop(s);
        let share = 1.0 / replicas as f64;
        for_each_bucket(tables, |b| b.fall_back(share));
        if was_down {
            return;
        }
        self.gauges.store_up.set(0);
        tracing::warn!(
            replica = %self.replica_id,
            error = %e,
            replicas,
            "cluster store unreachable: tenant limits are local, at 1/{replicas} of each"
        );
    }
}

/// What this replica reports: what it asks of each pool (requests in flight on its shards
/// and queued for its models) and what it has in flight on each shard.
fn own_report(tables: &Tables, admission: &Admission) -> Report {
    let table = tables.peek();
    let shards = table.router.shards();
    let demand = table
        .policy
        .pools
        .iter()
        .map(|p| {
            let in_flight: u64 = shards
                .iter()
                .filter(|s| s.pool == p.id)
                .map(|s| s.load.inflight_requests())
                .sum();
            let queued: usize = p.models.iter().map(|m| admission.queued_for(m)).sum();
            (p.id.clone(), in_flight as f64 + queued as f64)
        })
        .collect();
    let in_flight = shards
        .iter()
        .map(|s| (s.id.to_string(), s.load.inflight_requests() as f64))
        .filter(|(_, n)| *n > 0.0)
        .collect();
    Report { demand, in_flight }
}

fn for_each_bucket(tables: &Tables, f: impl Fn(&Bucket)) {
    let table = tables.peek();
    for t in table.tenants.all() {
        for b in [&t.rpm, &t.tpm].into_iter().flatten() {
            f(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_prefix_tenant_and_kind() {
        assert_eq!(
            bucket_key("breakwater", "acme", "rpm"),
            "breakwater:tenant:acme:rpm"
        );
    }

    #[test]
    fn a_default_replica_id_ends_in_the_port() {
        let id = default_replica_id(8080);
        assert!(id.ends_with(":8080") && id.len() > 5, "{id}");
    }
}
