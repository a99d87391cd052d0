//! The single owner of every shard's [`Tracker`]: a task fed by a bounded channel of
//! signals. It applies the pool's ejection cap, records every transition (a bounded ring,
//! a log line) and publishes a whole new [`HealthView`] whenever a state changes.
//!
//! Senders use `try_send`: the data path never waits on health. A signal dropped because
//! the channel is full is counted, and harmless — the next one carries the same news.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::HealthConfig;
use crate::tracker::{EjectPermit, Signal, Tracker};
use crate::view::{HealthView, ShardHealth, ShardId, ShardState};
use slotmap::SecondaryMap;

/// Transitions kept for `GET /admin/events`.
const EVENTS_KEPT: usize = 256;
/// Signals that may wait in the channel.
const CHANNEL_CAPACITY: usize = 4096;
/// How often ejection timers are looked at.
const TICK: Duration = Duration::from_millis(100);

/// Readings alone republish the view at most this often.
const READINGS_GAP: Duration = Duration::from_millis(10);

/// What the monitor needs to know about a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardInfo {
    /// The shard's key.
    pub id: ShardId,
    /// Its policy id (for events and logs).
    pub name: String,
    /// Pool id (for the ejection cap).
    pub pool: String,
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The shard.
    pub shard: String,
    /// State before.
    pub from: ShardState,
    /// State after.
    pub to: ShardState,
    /// Why.
    pub reason: String,
}

/// What a message changed, for when the view is published.
enum Change {
    /// Nothing shown.
    None,
    /// A reading only: published at once unless the view went out within READINGS_GAP.
    Reading,
    /// A shard's state (or the set, or the settings): published at once.
    State,
}

impl Change {
    fn or_none(changed: bool) -> Self {
        if changed {
            Self::State
        } else {
            Self::None
        }
    }
}

/// How shards new to the monitor start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joining {
    /// At full weight: the fleet the gateway started with.
    AtFullWeight,
    /// In slow start: shards a reload added, which may have just booted (with active
    /// checks off).
    InSlowStart,
    /// Taking nothing until their first active check passes, then in slow start: shards a
    /// reload or discovery added, with active checks on.
    AfterFirstCheck,
}

/// A new set of shards (and settings) for the monitor.
struct Reconfigure {
    shards: Vec<ShardInfo>,
    cfg: HealthConfig,
    joining: Joining,
}

/// A cheap handle on the monitor task; clones share it.
#[derive(Clone)]
pub struct HealthMonitor {
    tx: mpsc::Sender<(ShardId, Signal)>,
    control: mpsc::UnboundedSender<Reconfigure>,
    events: Arc<Mutex<VecDeque<Transition>>>,
    dropped: Arc<AtomicU64>,
    transitions: Arc<AtomicU64>,
}

/// Where the data path reports one shard's request outcomes: a [`HealthMonitor`] handle
/// bound to the shard, with the flag that keeps a healthy shard's successes off the channel.
#[derive(Clone)]
pub struct ShardReporter {
    shard: ShardId,
    monitor: HealthMonitor,
    /// A failure was reported since the last success that was passed on.
    unsettled: Arc<AtomicBool>,
}

impl std::fmt::Debug for ShardReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReporter")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl ShardReporter {
    /// Tells the monitor how a request to the shard ended. Never waits.
    ///
    /// A success only matters to reset a run of failures, so it is passed on only when a
    /// failure came before it: a healthy fleet costs the data path no message (and the
    /// health thread no wake-up) per request.
    // Racing: a success that reads the flag just before a concurrent failure sets it is
    // not passed on; the run of failures then looks one longer than it is until the next
    // success, which is harmless.
    pub fn report(&self, signal: Signal) {
        match &signal {
            Signal::Success if !self.unsettled.swap(false, Ordering::Relaxed) => return,
            Signal::Failure { .. } => self.unsettled.store(true, Ordering::Relaxed),
            _ => {}
        }
        self.monitor.report(self.shard, signal);
    }

    /// The shard it reports on.
    pub fn shard(&self) -> ShardId {
        self.shard
    }
}

impl HealthMonitor {
    /// Starts the monitor task on the current Tokio runtime, watching `shards`. `publish`
    /// receives every new view (the gateway swaps it into its routing state).
    pub fn spawn(
        shards: Vec<ShardInfo>,
        cfg: HealthConfig,
        publish: impl Fn(HealthView) + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (control, control_rx) = mpsc::unbounded_channel();
        let events = Arc::new(Mutex::new(VecDeque::with_capacity(EVENTS_KEPT)));
        let transitions = Arc::new(AtomicU64::new(0));
        let mut owner = Owner {
            entries: SecondaryMap::new(),
            cfg,
            events: Arc::clone(&events),
            transitions: Arc::clone(&transitions),
        };
        for info in shards {
            owner
                .entries
                .insert(info.id, Entry::new(info, Tracker::new()));
        }
        tokio::spawn(owner.run(rx, control_rx, publish));
        Self {
            tx,
            control,
            events,
            dropped: Arc::new(AtomicU64::new(0)),
            transitions,
        }
    }

    /// A handle with no monitor behind it: every report is dropped (and counted). For
    /// tools and tests that build routing tables without a health thread.
    pub fn disconnected() -> Self {
        let (tx, _) = mpsc::channel(1);
        let (control, _) = mpsc::unbounded_channel();
        Self {
            tx,
            control,
            events: Arc::default(),
            dropped: Arc::new(AtomicU64::new(0)),
            transitions: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Replaces the set of shards watched (a policy reload). Shards in both sets keep
    /// their state and history — an ejected shard stays ejected; shards no longer listed
    /// are forgotten; new ones start healthy, at full weight or in slow start (ramping up
    /// rather than taking a full share cold) as `joining` says.
    pub fn reconfigure(&self, shards: Vec<ShardInfo>, cfg: HealthConfig, joining: Joining) {
        let _ = self.control.send(Reconfigure {
            shards,
            cfg,
            joining,
        });
    }

    /// The data path's reporter for shard `shard`.
    pub fn reporter(&self, shard: ShardId) -> ShardReporter {
        ShardReporter {
            shard,
            monitor: self.clone(),
            unsettled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Tells the monitor something about shard `shard` (a probe's reading). Never waits;
    /// a shard the monitor does not know (removed by a reload) is ignored.
    pub fn report(&self, shard: ShardId, signal: Signal) {
        if self.tx.try_send((shard, signal)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Recent transitions, oldest first.
    pub fn events(&self) -> Vec<Transition> {
        self.events
            .lock()
            .map(|e| e.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// State transitions since the monitor started.
    pub fn transitions_total(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// Signals dropped because the channel was full.
    pub fn dropped_signals(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One watched shard.
struct Entry {
    info: ShardInfo,
    tracker: Tracker,
    last: Option<Transition>,
}

impl Entry {
    fn new(info: ShardInfo, tracker: Tracker) -> Self {
        Self {
            info,
            tracker,
            last: None,
        }
    }
}

struct Owner {
    entries: SecondaryMap<ShardId, Entry>,
    cfg: HealthConfig,
    events: Arc<Mutex<VecDeque<Transition>>>,
    transitions: Arc<AtomicU64>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Owner {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<(ShardId, Signal)>,
        mut control: mpsc::UnboundedReceiver<Reconfigure>,
        publish_view: impl Fn(HealthView) + Send + 'static,
    ) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Readings (engine metrics, GPU) go out at most every READINGS_GAP: a fleet of
        // thousands scraped every second would otherwise rebuild the whole view thousands
        // of times a second. A small fleet's readings go out at once, as do state changes.
        let mut readings_waiting = false;
        let mut published = tokio::time::Instant::now();
        loop {
            let flush_at = published + READINGS_GAP;
            let change = tokio::select! {
                msg = rx.recv() => match msg {
                    Some((id, signal)) => self.apply(id, signal),
                    None => return,
                },
                Some(r) = control.recv() => Change::or_none(self.reconfigure(r)),
                _ = ticker.tick() => Change::or_none(self.tick()),
                _ = tokio::time::sleep_until(flush_at), if readings_waiting => Change::State,
            };
            let now = tokio::time::Instant::now();
            let publish = match change {
                Change::State => true,
                Change::Reading => {
                    readings_waiting = true;
                    now.saturating_duration_since(published) >= READINGS_GAP
                }
                Change::None => false,
            };
            if publish {
                publish_view(self.view());
                published = now;
                readings_waiting = false;
            }
        }
    }

    fn reconfigure(&mut self, r: Reconfigure) -> bool {
        let now = tokio::time::Instant::now().into_std();
        let keep: std::collections::HashSet<ShardId> = r.shards.iter().map(|s| s.id).collect();
        self.entries.retain(|id, _| keep.contains(&id));
        for info in r.shards {
            match self.entries.get_mut(info.id) {
                Some(e) => e.info = info,
                None => {
                    let tracker = match r.joining {
                        Joining::AtFullWeight => Tracker::new(),
                        Joining::InSlowStart => Tracker::returning(now),
                        Joining::AfterFirstCheck => Tracker::joining(),
                    };
                    self.entries.insert(info.id, Entry::new(info, tracker));
                }
            }
        }
        self.cfg = r.cfg;
        true
    }

    fn permit(&self, shard: ShardId) -> EjectPermit {
        let pool = &self.entries[shard].info.pool;
        let members = self.entries.values().filter(|e| &e.info.pool == pool);
        let (mut total, mut ejected) = (0, 0);
        for e in members {
            total += 1;
            ejected += usize::from(e.tracker.is_ejected());
        }
        let cap = total * self.cfg.max_ejection_percent as usize / 100;
        if ejected == 0 || ejected < cap {
            EjectPermit::Allowed
        } else {
            EjectPermit::Denied
        }
    }

    fn apply(&mut self, shard: ShardId, signal: Signal) -> Change {
        if !self.entries.contains_key(shard) {
            return Change::None;
        }
        // Only a failure or a stall may eject; the pool's count is read only for them.
        let permit = if matches!(signal, Signal::Failure { .. } | Signal::Stalled { .. }) {
            self.permit(shard)
        } else {
            EjectPermit::Allowed
        };
        let jitter = if self.cfg.ejection_jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..=self.cfg.ejection_jitter)
        };
        let now = tokio::time::Instant::now().into_std();
        // A GPU reading is news for the admin API even when the state stays.
        let is_reading = matches!(signal, Signal::Gpu(_) | Signal::Engine(_));
        let tracker = &mut self.entries[shard].tracker;
        match tracker.on(signal, now, &self.cfg, permit, jitter) {
            Some((from, _)) => {
                self.record(shard, from);
                Change::State
            }
            None if is_reading => Change::Reading,
            None => Change::None,
        }
    }

    fn tick(&mut self) -> bool {
        let now = tokio::time::Instant::now().into_std();
        // A shard in slow start needs its rising weight republished.
        let mut changed = self
            .entries
            .values()
            .any(|e| e.tracker.slow_start_factor(now, &self.cfg) < 1.0);
        let ids: Vec<ShardId> = self.entries.keys().collect();
        for id in ids {
            if let Some((from, _)) = self.entries[id].tracker.tick(now, &self.cfg) {
                self.record(id, from);
                changed = true;
            }
        }
        changed
    }

    fn record(&mut self, shard: ShardId, from: ShardState) {
        let entry = &mut self.entries[shard];
        let t = &entry.tracker;
        let event = Transition {
            at_unix_ms: now_unix_ms(),
            shard: entry.info.name.clone(),
            from,
            to: t.state(),
            reason: t.reason().to_string(),
        };
        tracing::info!(
            target: "health",
            shard = %event.shard,
            from = event.from.as_str(),
            to = event.to.as_str(),
            reason = %event.reason,
            "shard state changed"
        );
        self.transitions.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut events) = self.events.lock() {
            if events.len() == EVENTS_KEPT {
                events.pop_front();
            }
            events.push_back(event.clone());
        }
        entry.last = Some(event);
    }

    fn view(&self) -> HealthView {
        let now = tokio::time::Instant::now().into_std();
        HealthView::from_entries(self.entries.iter().map(|(id, e)| {
            let t = &e.tracker;
            let health = ShardHealth {
                state: t.state(),
                reason: t.reason().to_string(),
                weight_factor: match t.state() {
                    ShardState::Healthy => 1.0,
                    ShardState::Degraded => self.cfg.gpu_degraded_weight,
                    ShardState::Ejected | ShardState::Draining => 0.0,
                } * t.slow_start_factor(now, &self.cfg),
                ejection_count: t.ejections(),
                last_transition: e.last.clone(),
                gpu: t.gpu().cloned(),
                engine: t.engine().copied(),
            };
            (id, health)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> (Vec<ShardId>, Vec<ShardInfo>) {
        let mut keys = slotmap::SlotMap::<ShardId, ()>::with_key();
        let ids: Vec<ShardId> = (0..n).map(|_| keys.insert(())).collect();
        let infos = ids
            .iter()
            .enumerate()
            .map(|(i, id)| ShardInfo {
                id: *id,
                name: format!("s{i}"),
                pool: "p".into(),
            })
            .collect();
        (ids, infos)
    }

    fn fail() -> Signal {
        Signal::Failure {
            local: true,
            detail: "connection refused".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_after_failures_still_resets_the_run() {
        // Successes are only passed on after a failure; this one must be, or the four
        // failures around it would add up to an ejection (3 local failures in a row).
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ids, infos) = shards(2);
        let m = HealthMonitor::spawn(infos, HealthConfig::default(), move |v| {
            let _ = tx.send(v);
        });
        let r = m.reporter(ids[0]);
        r.report(Signal::Success);
        r.report(fail());
        r.report(fail());
        r.report(Signal::Success);
        r.report(Signal::Success);
        r.report(fail());
        r.report(fail());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            rx.try_recv().is_err(),
            "ejected although no 3 failures were consecutive"
        );
        r.report(fail());
        assert!(!rx.recv().await.unwrap().takes_new_requests(ids[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_ejections_keeps_events_and_caps_the_pool() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cfg = HealthConfig {
            max_ejection_percent: 50,
            ejection_jitter: Duration::ZERO,
            ..HealthConfig::default()
        };
        let (ids, infos) = shards(2);
        let m = HealthMonitor::spawn(infos, cfg, move |v| {
            let _ = tx.send(v);
        });
        for _ in 0..3 {
            m.report(ids[0], fail());
        }
        let view = rx.recv().await.unwrap();
        assert!(!view.takes_new_requests(ids[0]));
        assert!(view.takes_new_requests(ids[1]));
        assert_eq!(view.get(ids[0]).ejection_count, 1);
        // Half of a two-shard pool is ejected: the second may not be.
        for _ in 0..10 {
            m.report(ids[1], fail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err());
        let events = m.events();
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].from, events[0].to),
            (ShardState::Healthy, ShardState::Ejected)
        );
        assert_eq!(events[0].shard, "s0");
        // Unknown shards are ignored, not a panic (and not a drop).
        let (stranger, _) = shards(3);
        m.report(stranger[2], fail());
        assert_eq!(m.dropped_signals(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconfigure_keeps_known_shards_forgets_removed_ones_and_slow_starts_new_ones() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cfg = HealthConfig {
            ejection_jitter: Duration::ZERO,
            slow_start: Duration::from_secs(10),
            ..HealthConfig::default()
        };
        let (ids, infos) = shards(3);
        let m = HealthMonitor::spawn(infos[..2].to_vec(), cfg.clone(), move |v| {
            let _ = tx.send(v);
        });
        for _ in 0..3 {
            m.report(ids[0], fail());
        }
        let view = rx.recv().await.unwrap();
        assert!(!view.takes_new_requests(ids[0]));
        // s1 leaves, s2 joins; s0 (ejected) is kept as it is.
        m.reconfigure(
            vec![infos[0].clone(), infos[2].clone()],
            cfg,
            Joining::InSlowStart,
        );
        let view = loop {
            let v = rx.recv().await.unwrap();
            if v.len() == 2 {
                break v;
            }
        };
        assert!(
            !view.takes_new_requests(ids[0]),
            "an ejected shard stayed ejected"
        );
        assert_eq!(view.get(ids[0]).ejection_count, 1);
        assert!(view.takes_new_requests(ids[2]));
        assert!(view.weight_factor(ids[2]) < 0.2, "a new shard starts slow");
        // Signals for the removed shard are ignored.
        for _ in 0..3 {
            m.report(ids[1], fail());
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        let view = rx.recv().await.unwrap();
        assert_eq!(view.len(), 2);
        assert!(m.events().iter().all(|e| e.shard != "s1"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn signals_past_a_full_queue_are_dropped_and_counted() {
        // On a current-thread runtime the owner task cannot run until this test yields,
        // so the channel fills: every failure past its capacity is dropped, never waited on.
        let (ids, infos) = shards(1);
        let m = HealthMonitor::spawn(infos, HealthConfig::default(), |_| {});
        let extra = 25;
        for _ in 0..CHANNEL_CAPACITY + extra {
            m.report(ids[0], fail());
        }
        assert_eq!(m.dropped_signals(), extra as u64);
        // Once the owner has drained the queue, signals flow again.
        tokio::time::sleep(Duration::from_millis(10)).await;
        m.report(ids[0], fail());
        assert_eq!(m.dropped_signals(), extra as u64);
    }
}
