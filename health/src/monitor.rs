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
use crate::view::{HealthView, ShardHealth, ShardState};

/// Transitions kept for `GET /admin/events`.
const EVENTS_KEPT: usize = 256;
/// Signals that may wait in the channel.
const CHANNEL_CAPACITY: usize = 4096;
/// How often ejection timers are looked at.
const TICK: Duration = Duration::from_millis(100);

/// What the monitor needs to know about a shard.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    /// Shard id (for events and logs).
    pub id: String,
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

/// A cheap handle on the monitor task; clones share it.
#[derive(Clone)]
pub struct HealthMonitor {
    tx: mpsc::Sender<(usize, Signal)>,
    events: Arc<Mutex<VecDeque<Transition>>>,
    dropped: Arc<AtomicU64>,
    /// Per shard: a failure was reported since the last success that was passed on.
    unsettled: Arc<Vec<AtomicBool>>,
    transitions: Arc<AtomicU64>,
}

impl HealthMonitor {
    /// Starts the monitor task on the current Tokio runtime. `publish` receives every new
    /// view (the gateway swaps it into its routing table).
    pub fn spawn(
        shards: Vec<ShardInfo>,
        cfg: HealthConfig,
        publish: impl Fn(HealthView) + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let events = Arc::new(Mutex::new(VecDeque::with_capacity(EVENTS_KEPT)));
        let transitions = Arc::new(AtomicU64::new(0));
        let owner = Owner {
            trackers: vec![Tracker::new(); shards.len()],
            last: vec![None; shards.len()],
            shards,
            cfg,
            events: Arc::clone(&events),
            transitions: Arc::clone(&transitions),
        };
        let unsettled = Arc::new(
            (0..owner.shards.len())
                .map(|_| AtomicBool::new(false))
                .collect(),
        );
        tokio::spawn(owner.run(rx, publish));
        Self {
            tx,
            events,
            dropped: Arc::new(AtomicU64::new(0)),
            unsettled,
            transitions,
        }
    }

    /// Tells the monitor something about shard `shard`. Never waits.
    ///
    /// A success only matters to reset a run of failures, so it is passed on only when a
    /// failure came before it: a healthy fleet costs the data path no message (and the
    /// health thread no wake-up) per request.
    // Racing: a success that reads the flag just before a concurrent failure sets it is
    // not passed on; the run of failures then looks one longer than it is until the next
    // success, which is harmless.
    pub fn report(&self, shard: usize, signal: Signal) {
        let Some(flag) = self.unsettled.get(shard) else {
            return;
        };
        match &signal {
            Signal::Success if !flag.swap(false, Ordering::Relaxed) => return,
            Signal::Failure { .. } => flag.store(true, Ordering::Relaxed),
            _ => {}
        }
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

struct Owner {
    shards: Vec<ShardInfo>,
    trackers: Vec<Tracker>,
    last: Vec<Option<Transition>>,
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
        mut rx: mpsc::Receiver<(usize, Signal)>,
        publish: impl Fn(HealthView) + Send + 'static,
    ) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = tokio::select! {
                msg = rx.recv() => match msg {
                    Some((i, signal)) => self.apply(i, signal),
                    None => return,
                },
                _ = ticker.tick() => self.tick(),
            };
            if changed {
                publish(self.view());
            }
        }
    }

    fn permit(&self, shard: usize) -> EjectPermit {
        let pool = &self.shards[shard].pool;
        let members: Vec<usize> = (0..self.shards.len())
            .filter(|i| &self.shards[*i].pool == pool)
            .collect();
        let ejected = members
            .iter()
            .filter(|i| self.trackers[**i].is_ejected())
            .count();
        let cap = members.len() * self.cfg.max_ejection_percent as usize / 100;
        if ejected == 0 || ejected < cap {
            EjectPermit::Allowed
        } else {
            EjectPermit::Denied
        }
    }

    fn apply(&mut self, shard: usize, signal: Signal) -> bool {
        if shard >= self.trackers.len() {
            return false;
        }
        let permit = self.permit(shard);
        let jitter = if self.cfg.ejection_jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..=self.cfg.ejection_jitter)
        };
        let now = tokio::time::Instant::now().into_std();
        // A GPU reading is news for the admin API even when the state stays.
        let is_reading = matches!(signal, Signal::Gpu(_) | Signal::Engine(_));
        match self.trackers[shard].on(signal, now, &self.cfg, permit, jitter) {
            Some((from, _)) => {
                self.record(shard, from);
                true
            }
            None => is_reading,
        }
    }

    fn tick(&mut self) -> bool {
        let now = tokio::time::Instant::now().into_std();
        // A shard in slow start needs its rising weight republished.
        let mut changed = self
            .trackers
            .iter()
            .any(|t| t.slow_start_factor(now, &self.cfg) < 1.0);
        for i in 0..self.trackers.len() {
            if let Some((from, _)) = self.trackers[i].tick(now, &self.cfg) {
                self.record(i, from);
                changed = true;
            }
        }
        changed
    }

    fn record(&mut self, shard: usize, from: ShardState) {
        let t = &self.trackers[shard];
        let event = Transition {
            at_unix_ms: now_unix_ms(),
            shard: self.shards[shard].id.clone(),
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
        self.last[shard] = Some(event);
    }

    fn view(&self) -> HealthView {
        let now = tokio::time::Instant::now().into_std();
        HealthView::from_entries(
            self.trackers
                .iter()
                .zip(&self.last)
                .map(|(t, last)| ShardHealth {
                    state: t.state(),
                    reason: t.reason().to_string(),
                    weight_factor: match t.state() {
                        ShardState::Healthy => 1.0,
                        ShardState::Degraded => self.cfg.gpu_degraded_weight,
                        ShardState::Ejected | ShardState::Draining => 0.0,
                    } * t.slow_start_factor(now, &self.cfg),
                    ejection_count: t.ejections(),
                    last_transition: last.clone(),
                    gpu: t.gpu().cloned(),
                    engine: t.engine().copied(),
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> Vec<ShardInfo> {
        (0..n)
            .map(|i| ShardInfo {
                id: format!("s{i}"),
                pool: "p".into(),
            })
            .collect()
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
        let m = HealthMonitor::spawn(shards(2), HealthConfig::default(), move |v| {
            let _ = tx.send(v);
        });
        m.report(0, Signal::Success);
        m.report(0, fail());
        m.report(0, fail());
        m.report(0, Signal::Success);
        m.report(0, Signal::Success);
        m.report(0, fail());
        m.report(0, fail());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            rx.try_recv().is_err(),
            "ejected although no 3 failures were consecutive"
        );
        m.report(0, fail());
        assert!(!rx.recv().await.unwrap().takes_new_requests(0));
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_ejections_keeps_events_and_caps_the_pool() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cfg = HealthConfig {
            max_ejection_percent: 50,
            ejection_jitter: Duration::ZERO,
            ..HealthConfig::default()
        };
        let m = HealthMonitor::spawn(shards(2), cfg, move |v| {
            let _ = tx.send(v);
        });
        for _ in 0..3 {
            m.report(0, fail());
        }
        let view = rx.recv().await.unwrap();
        assert!(!view.takes_new_requests(0));
        assert!(view.takes_new_requests(1));
        assert_eq!(view.get(0).ejection_count, 1);
        // Half of a two-shard pool is ejected: the second may not be.
        for _ in 0..10 {
            m.report(1, fail());
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
        // Out-of-range shards are ignored, not a panic (and not a drop).
        m.report(9, fail());
        assert_eq!(m.dropped_signals(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn signals_past_a_full_queue_are_dropped_and_counted() {
        // On a current-thread runtime the owner task cannot run until this test yields,
        // so the channel fills: every failure past its capacity is dropped, never waited on.
        let m = HealthMonitor::spawn(shards(1), HealthConfig::default(), |_| {});
        let extra = 25;
        for _ in 0..CHANNEL_CAPACITY + extra {
            m.report(0, fail());
        }
        assert_eq!(m.dropped_signals(), extra as u64);
        // Once the owner has drained the queue, signals flow again.
        tokio::time::sleep(Duration::from_millis(10)).await;
        m.report(0, fail());
        assert_eq!(m.dropped_signals(), extra as u64);
    }
}
