//! The gateway's bounded wait queue: one FIFO band per priority, served critical first —
//! except that a sheddable waiter counts as arrived a grace later than it did
//! ([`WaitQueue::set_sheddable_grace`]) and, once standard waiters queued after that are
//! ahead of it, goes before them: standard arrivals can delay it by the grace, not starve
//! it until its deadline and a refusal after all that waiting.
//!
//! A waiter is granted a place (`G`, a charged shard) by [`WaitQueue::dispatch`], which
//! runs whenever tokens are released; the grant is made under the queue's lock and sent to
//! the waiter, so two waiters never race for the same room and a new arrival cannot jump a
//! queue of its own priority. A waiter that gives up (deadline, client gone) leaves the
//! queue when its [`Ticket`] drops. A waiter that more important arrivals have pushed past
//! its deadline is refused at once rather than left to time out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::policy::Priority;

/// How long a queue must have stood (never emptied) to count as standing: CoDel's interval.
pub const STANDING_AFTER: Duration = Duration::from_millis(100);

/// Most waiters one dispatch looks at without placing one.
const MAX_SCAN: usize = 64;

/// Why a queued request was refused by the queue itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted;

/// What a waiter receives.
pub type Outcome<G> = Result<G, Evicted>;

struct Waiter<K, G> {
    id: u64,
    model: K,
    cost: u64,
    /// When it counts as arrived, for the order of standard and sheddable waiters: when
    /// it was queued, a sheddable one the grace in force then later.
    counts_from: Instant,
    deadline: Instant,
    tx: oneshot::Sender<Outcome<G>>,
}

struct Inner<K, G> {
    bands: [VecDeque<Waiter<K, G>>; 3],
    next_id: u64,
    /// Since when the queue has held someone without a break.
    nonempty_since: Option<Instant>,
}

/// The queue, shared by every worker thread.
pub struct WaitQueue<K, G> {
    inner: Mutex<Inner<K, G>>,
    /// Waiters per band, readable without the lock.
    waiting: [AtomicUsize; 3],
    /// Tokens queued per band.
    tokens: [AtomicUsize; 3],
    /// How much later than it arrived a sheddable waiter counts against standard ones,
    /// nanoseconds.
    sheddable_grace: AtomicU64,
}

/// One queued request. Dropping it leaves the queue.
pub struct Ticket<'q, K, G> {
    queue: &'q WaitQueue<K, G>,
    id: u64,
    band: usize,
    rx: oneshot::Receiver<Outcome<G>>,
    /// When it was queued.
    pub enqueued: Instant,
}

impl<K, G> Ticket<'_, K, G> {
    /// Waits for the grant (or the eviction). `None`: the queue dropped the waiter without
    /// an answer, which only happens when the gateway is going away.
    pub async fn granted(&mut self) -> Option<Outcome<G>> {
        (&mut self.rx).await.ok()
    }
}

impl<K, G> Drop for Ticket<'_, K, G> {
    fn drop(&mut self) {
        self.queue.remove(self.band, self.id);
    }
}

impl<K, G> Default for WaitQueue<K, G> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                bands: Default::default(),
                next_id: 0,
                nonempty_since: None,
            }),
            waiting: Default::default(),
            tokens: Default::default(),
            sheddable_grace: AtomicU64::new(STANDING_AFTER.as_nanos() as u64),
        }
    }
}

impl<K: PartialEq + Clone, G> WaitQueue<K, G> {
    /// Waiters in each band, most important first.
    pub fn depths(&self) -> [usize; 3] {
        [0, 1, 2].map(|b| self.waiting[b].load(Ordering::Relaxed))
    }

    /// Waiters for `key`, all bands (walks the queue: for reports, not the request path).
    pub fn waiting_for(&self, key: &K) -> usize {
        let inner = self.lock();
        inner
            .bands
            .iter()
            .map(|b| b.iter().filter(|w| w.model == *key).count())
            .sum()
    }

    /// Waiters in all bands.
    pub fn len(&self) -> usize {
        self.depths().iter().sum()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waiters at `priority` or more important: a new request of `priority` queues behind
    /// them instead of taking room first.
    pub fn ahead_of(&self, priority: Priority) -> usize {
        (0..=priority.index())
            .map(|b| self.waiting[b].load(Ordering::Relaxed))
            .sum()
    }

    /// Tokens a new request of `priority` would wait behind.
    pub fn tokens_ahead_of(&self, priority: Priority) -> u64 {
        (0..=priority.index())
            .map(|b| self.tokens[b].load(Ordering::Relaxed) as u64)
            .sum()
    }

    /// Tokens queued in all bands.
    pub fn tokens_queued(&self) -> u64 {
        self.tokens_ahead_of(Priority::Sheddable)
    }

    /// Sets how long standard arrivals may go before a sheddable waiter that came first,
    /// for the sheddable waiters queued from now on (default [`STANDING_AFTER`]).
    pub fn set_sheddable_grace(&self, grace: Duration) {
        self.sheddable_grace
            .store(grace.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Whether the queue has held someone for longer than [`STANDING_AFTER`] without a
    /// break: a standing queue, i.e. sustained overload rather than a burst.
    pub fn standing(&self, now: Instant) -> bool {
        if self.is_empty() {
            return false;
        }
        self.lock()
            .nonempty_since
            .is_some_and(|t| now.saturating_duration_since(t) > STANDING_AFTER)
    }

    /// Queues a request of model `model`, `cost` tokens, until `deadline`, then runs a
    /// dispatch at once (room may have freed since the caller looked). `rate` (tokens/s
    /// the fleet releases for standard and sheddable waiters, once critical arrivals are
    /// served) decides which less important waiters can no longer make their deadlines
    /// and are evicted.
    pub fn enqueue(
        &self,
        priority: Priority,
        model: K,
        cost: u64,
        deadline: Instant,
        rate: f64,
        place: impl FnMut(&K, u64) -> Option<G>,
    ) -> Ticket<'_, K, G> {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let band = priority.index();
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        if self.is_empty() {
            inner.nonempty_since = Some(now);
        }
        inner.bands[band].push_back(Waiter {
            id,
            model,
            cost,
            counts_from: if priority == Priority::Sheddable {
                now + Duration::from_nanos(self.sheddable_grace.load(Ordering::Relaxed))
            } else {
                now
            },
            deadline,
            tx,
        });
        self.waiting[band].fetch_add(1, Ordering::Relaxed);
        self.tokens[band].fetch_add(cost as usize, Ordering::Relaxed);
        let mut sends = Vec::new();
        if band < 2
            && self.waiting[band + 1..]
                .iter()
                .any(|w| w.load(Ordering::Relaxed) > 0)
        {
            self.evict_overdue(&mut inner, now, rate, 0, &mut sends);
        }
        self.grant(&mut inner, place, &mut sends);
        drop(inner);
        deliver(sends);
        Ticket {
            queue: self,
            id,
            band,
            rx,
            enqueued: now,
        }
    }

    /// After a request of `priority` and `cost` took room directly, ahead of the less
    /// important waiters: refuses those it pushed past their deadlines at `rate()`, as
    /// [`Self::enqueue`] does for one that queues (the room it took was theirs), so a
    /// waiter that more important arrivals keep passing is told at once, not at its
    /// deadline.
    pub fn passed_by(&self, priority: Priority, cost: u64, rate: impl FnOnce() -> f64) {
        let band = priority.index();
        if band >= 2
            || self.waiting[band + 1..]
                .iter()
                .all(|w| w.load(Ordering::Relaxed) == 0)
        {
            return;
        }
        let mut sends = Vec::new();
        let mut inner = self.lock();
        self.evict_overdue(&mut inner, Instant::now(), rate(), cost, &mut sends);
        drop(inner);
        deliver(sends);
    }

    /// Grants room to waiters, most important first, while `place` finds some.
    pub fn dispatch(&self, place: impl FnMut(&K, u64) -> Option<G>) {
        if self.is_empty() {
            return;
        }
        let mut sends = Vec::new();
        let mut inner = self.lock();
        self.grant(&mut inner, place, &mut sends);
        drop(inner);
        deliver(sends);
    }

    fn grant(
        &self,
        inner: &mut Inner<K, G>,
        mut place: impl FnMut(&K, u64) -> Option<G>,
        sends: &mut Vec<(oneshot::Sender<Outcome<G>>, Outcome<G>)>,
    ) {
        // A model whose oldest waiter did not fit: its younger waiters wait behind it.
        let mut blocked: Vec<K> = Vec::new();
        let mut scanned = 0;
        // Critical first; then standard and sheddable waiters in the order they count as
        // arrived, a sheddable one a grace after it did. `next[b]`: band b's next waiter.
        let mut next = [0usize; 3];
        while scanned < MAX_SCAN {
            let band = if next[0] < inner.bands[0].len() {
                0
            } else {
                let standard = inner.bands[1].get(next[1]).map(|w| w.counts_from);
                let sheddable = inner.bands[2].get(next[2]).map(|w| w.counts_from);
                match (standard, sheddable) {
                    (None, None) => break,
                    (Some(_), None) => 1,
                    (None, Some(_)) => 2,
                    (Some(a), Some(b)) => {
                        if b < a {
                            2
                        } else {
                            1
                        }
                    }
                }
            };
            let i = next[band];
            let w = &inner.bands[band][i];
            if w.tx.is_closed() {
                self.take(inner, band, i);
                continue;
            }
            if blocked.contains(&w.model) {
                next[band] += 1;
                continue;
            }
            match place(&w.model, w.cost) {
                Some(g) => {
                    if let Some(w) = self.take(inner, band, i) {
                        sends.push((w.tx, Ok(g)));
                    }
                    scanned = 0;
                }
                None => {
                    blocked.push(w.model.clone());
                    scanned += 1;
                    next[band] += 1;
                }
            }
        }
    }

    /// Refuses the less important waiters that, behind everything served before them,
    /// would be served after their deadline. Before a sheddable waiter: `passing` (the
    /// tokens of a request that just took room ahead of every waiter), every critical
    /// one, the standard ones that count as earlier (queued within the grace after it)
    /// and the sheddable ones ahead in its band.
    fn evict_overdue(
        &self,
        inner: &mut Inner<K, G>,
        now: Instant,
        rate: f64,
        passing: u64,
        sends: &mut Vec<(oneshot::Sender<Outcome<G>>, Outcome<G>)>,
    ) {
        let rate = rate.max(1.0);
        let critical: u64 = passing + inner.bands[0].iter().map(|w| w.cost).sum::<u64>();
        // The standard waiters kept: when each was queued and the tokens up to it.
        let mut standard: Vec<(Instant, u64)> = Vec::new();
        let mut sheddable = 0u64;
        for band in 1..3 {
            let mut i = 0;
            while i < inner.bands[band].len() {
                let w = &inner.bands[band][i];
                let ahead = if band == 1 {
                    critical + standard.last().map_or(0, |s| s.1)
                } else {
                    let before = standard.partition_point(|s| s.0 < w.counts_from);
                    critical + before.checked_sub(1).map_or(0, |j| standard[j].1) + sheddable
                };
                let wait = Duration::from_secs_f64((ahead + w.cost) as f64 / rate);
                if now + wait > w.deadline {
                    if let Some(w) = self.take(inner, band, i) {
                        sends.push((w.tx, Err(Evicted)));
                    }
                    continue;
                }
                if band == 1 {
                    let total = standard.last().map_or(0, |s| s.1) + w.cost;
                    standard.push((w.counts_from, total));
                } else {
                    sheddable += w.cost;
                }
                i += 1;
            }
        }
    }
}

impl<K, G> WaitQueue<K, G> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, G>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, inner: &mut Inner<K, G>, band: usize, i: usize) -> Option<Waiter<K, G>> {
        let w = inner.bands[band].remove(i)?;
        self.waiting[band].fetch_sub(1, Ordering::Relaxed);
        self.tokens[band].fetch_sub(w.cost as usize, Ordering::Relaxed);
        if inner.bands.iter().all(VecDeque::is_empty) {
            inner.nonempty_since = None;
        }
        Some(w)
    }

    fn remove(&self, band: usize, id: u64) {
        let mut inner = self.lock();
        if let Some(i) = inner.bands[band].iter().position(|w| w.id == id) {
            drop(self.take(&mut inner, band, i));
        }
    }
}

/// Sends grants after the lock is released: a grant whose waiter has just left comes back
/// and is dropped here, which may release room and dispatch again.
fn deliver<G>(sends: Vec<(oneshot::Sender<Outcome<G>>, Outcome<G>)>) {
    for (tx, outcome) in sends {
        drop(tx.send(outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn grants_go_to_the_most_important_band_first_and_fifo_within_it() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        let never = |_: &usize, _: u64| None;
        let mut c1 = q.enqueue(Priority::Critical, 0, 10, far(), 1e6, never);
        let mut s1 = q.enqueue(Priority::Sheddable, 0, 10, far(), 1e6, never);
        let mut a1 = q.enqueue(Priority::Standard, 0, 10, far(), 1e6, never);
        let mut a2 = q.enqueue(Priority::Standard, 0, 10, far(), 1e6, never);
        assert_eq!(q.depths(), [1, 2, 1]);
        assert_eq!(q.ahead_of(Priority::Standard), 3);
        assert_eq!(q.tokens_ahead_of(Priority::Critical), 10);
        // Room for two.
        let room = Cell::new(2u32);
        q.dispatch(|_, _| {
            let r = room.get();
            (r > 0).then(|| {
                room.set(r - 1);
                r
            })
        });
        assert_eq!(c1.granted().await, Some(Ok(2)));
        assert_eq!(a1.granted().await, Some(Ok(1)));
        assert_eq!(q.depths(), [0, 1, 1]);
        q.dispatch(|_, _| Some(9));
        assert_eq!(a2.granted().await, Some(Ok(9)));
        assert_eq!(s1.granted().await, Some(Ok(9)));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_is_gone_and_never_granted() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        let t = q.enqueue(Priority::Standard, 0, 10, far(), 1e6, |_, _| None);
        assert_eq!(q.len(), 1);
        drop(t);
        assert_eq!(q.len(), 0);
        assert_eq!(q.tokens_queued(), 0);
        let placed = Cell::new(0);
        q.dispatch(|_, _| {
            placed.set(placed.get() + 1);
            Some(1)
        });
        assert_eq!(placed.get(), 0);
    }

    #[tokio::test]
    async fn a_model_whose_head_does_not_fit_does_not_block_another_model() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        let mut big = q.enqueue(Priority::Standard, 0, 1000, far(), 1e6, |_, _| None);
        let mut small_same = q.enqueue(Priority::Standard, 0, 1, far(), 1e6, |_, _| None);
        let mut other = q.enqueue(Priority::Standard, 1, 10, far(), 1e6, |_, _| None);
        // Only model 1 has room; model 0's small request must not overtake its big one.
        q.dispatch(|model, _| (*model == 1).then_some(7));
        assert_eq!(other.granted().await, Some(Ok(7)));
        assert_eq!(q.depths(), [0, 2, 0]);
        q.dispatch(|_, _| Some(3));
        assert_eq!(big.granted().await, Some(Ok(3)));
        assert_eq!(small_same.granted().await, Some(Ok(3)));
    }

    #[tokio::test]
    async fn a_critical_arrival_evicts_the_waiters_it_pushes_past_their_deadline() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        // 1,000 tokens/s drain: a 100-token standard waiter is due in 100 ms.
        let soon = Instant::now() + Duration::from_millis(300);
        let mut std1 = q.enqueue(Priority::Standard, 0, 100, soon, 1000.0, |_, _| None);
        let mut shed = q.enqueue(Priority::Sheddable, 0, 100, soon, 1000.0, |_, _| None);
        // 250 critical tokens ahead: standard is then due at 350 ms, sheddable at 450 ms.
        let _crit = q.enqueue(Priority::Critical, 0, 250, far(), 1000.0, |_, _| None);
        assert_eq!(shed.granted().await, Some(Err(Evicted)));
        assert_eq!(std1.granted().await, Some(Err(Evicted)));
        assert_eq!(q.depths(), [1, 0, 0]);
    }

    #[tokio::test]
    async fn a_critical_arrival_leaves_the_waiters_that_still_make_their_deadlines() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        // 1,000 tokens/s: 100 critical tokens ahead put the sheddable waiter's 100 at
        // 200 ms, within its 300 ms.
        let soon = Instant::now() + Duration::from_millis(300);
        let mut shed = q.enqueue(Priority::Sheddable, 0, 100, soon, 1000.0, |_, _| None);
        let _crit = q.enqueue(Priority::Critical, 0, 100, far(), 1000.0, |_, _| None);
        assert_eq!(q.depths(), [1, 0, 1]);
        q.dispatch(|_, _| Some(1));
        assert_eq!(shed.granted().await, Some(Ok(1)));
    }

    #[tokio::test]
    async fn a_request_taking_room_ahead_evicts_the_waiters_it_pushes_past_their_deadline() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        // 1,000 tokens/s: the sheddable waiter's 100 tokens are due in 100 ms, its
        // deadline in 300 ms.
        let soon = Instant::now() + Duration::from_millis(300);
        let mut shed = q.enqueue(Priority::Sheddable, 0, 100, soon, 1000.0, |_, _| None);
        // A critical request of 100 tokens takes room directly: due at 200 ms, kept.
        q.passed_by(Priority::Critical, 100, || 1000.0);
        // A sheddable request takes room ahead of nobody, however large.
        q.passed_by(Priority::Sheddable, 1000, || 1000.0);
        assert_eq!(q.depths(), [0, 0, 1]);
        // 250 critical tokens: due at 350 ms, refused now.
        q.passed_by(Priority::Critical, 250, || 1000.0);
        assert_eq!(shed.granted().await, Some(Err(Evicted)));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_sheddable_waiter_goes_before_standard_ones_queued_a_grace_after_it() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        q.set_sheddable_grace(Duration::from_millis(30));
        let never = |_: &usize, _: u64| None;
        let mut crit = q.enqueue(Priority::Critical, 0, 10, far(), 1e6, never);
        let mut shed = q.enqueue(Priority::Sheddable, 0, 10, far(), 1e6, never);
        let mut early = q.enqueue(Priority::Standard, 0, 10, far(), 1e6, never);
        std::thread::sleep(Duration::from_millis(50));
        let mut late = q.enqueue(Priority::Standard, 0, 10, far(), 1e6, never);
        // Room for all: granted in the order critical, early, sheddable, late.
        let order = Cell::new(0u32);
        q.dispatch(|_, _| {
            order.set(order.get() + 1);
            Some(order.get())
        });
        assert_eq!(crit.granted().await, Some(Ok(1)));
        assert_eq!(early.granted().await, Some(Ok(2)));
        assert_eq!(
            shed.granted().await,
            Some(Ok(3)),
            "starved behind later standards"
        );
        assert_eq!(late.granted().await, Some(Ok(4)));
    }

    #[tokio::test]
    async fn standard_arrivals_after_the_grace_do_not_evict_a_sheddable_waiter() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        q.set_sheddable_grace(Duration::from_millis(20));
        // 1,000 tokens/s: the sheddable waiter's 100 tokens are due in 100 ms, its
        // deadline in 300 ms.
        let soon = Instant::now() + Duration::from_millis(300);
        let mut shed = q.enqueue(Priority::Sheddable, 0, 100, soon, 1000.0, |_, _| None);
        std::thread::sleep(Duration::from_millis(40));
        // 400 standard tokens queued after its grace: served after it, no eviction.
        let _std = q.enqueue(Priority::Standard, 0, 400, far(), 1000.0, |_, _| None);
        assert_eq!(q.depths(), [0, 1, 1]);
        // 400 critical tokens do go first: it can no longer make its deadline.
        let _crit = q.enqueue(Priority::Critical, 0, 400, far(), 1000.0, |_, _| None);
        assert_eq!(shed.granted().await, Some(Err(Evicted)));
    }

    #[test]
    fn a_queue_that_never_empties_becomes_standing() {
        let q: WaitQueue<usize, u32> = WaitQueue::default();
        let now = Instant::now();
        assert!(!q.standing(now));
        let _t = q.enqueue(Priority::Standard, 0, 1, far(), 1e6, |_, _| None);
        assert!(!q.standing(Instant::now()));
        assert!(q.standing(Instant::now() + STANDING_AFTER * 2));
    }
}
