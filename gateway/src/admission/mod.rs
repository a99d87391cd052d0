//! Admission: who sent a request, whether they are within their limits, and whether the
//! fleet can start it now — else a short wait in the queue, else a fast refusal.
//!
//! # Layout
//! - [`tenant`]: API keys (by SHA-256) → tenants, priorities.
//! - [`rate`]: requests-per-minute and tokens-per-minute buckets.
//! - [`limit`]: each shard's admission limit in tokens in flight, learned from TTFT.
//! - [`slots`]: each shard's batch slots, learned from the engine's running and waiting.
//! - [`queue`]: the bounded priority queue with deadlines.
//! - [`buffer`]: how long the queue may be, sized from the fleet (unless the policy says).
//! - `drain`: the tokens per second the fleet gets through, which predicted waits divide by.
//!
//! A request is *placed* when some shard of its route (home region first, then spilling
//! in region order) has room: its in-flight tokens plus the request's cost within its
//! limit, and its engine not reporting saturation. Placing charges the shard's ledger and
//! returns a [`Slot`]; dropping the slot releases the tokens and hands the room to the
//! queue. A request that cannot be placed waits in its priority's band while the predicted
//! wait (tokens queued ahead ÷ the tokens per second the fleet releases) fits its queue
//! timeout and its own deadline — and, while a queue *stands* (has not emptied for
//! 100 ms: sustained overload, not a burst), only if that wait is within the queue
//! target (sheddable: only if the whole queue is; see [`buffer`] for the target the fleet
//! sets when the policy does not). A queued sheddable request goes before standard ones
//! queued more than that target after it, so it is not starved into a late refusal.
//! Otherwise it is refused at
//! once with 429 and `Retry-After` — before its body is read when the queue ahead of it
//! alone is already too long ([`Admission::precheck`]).

pub mod buffer;
mod drain;
pub mod limit;
pub mod queue;
pub mod rate;
pub mod slots;
pub mod tenant;

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_health::{HealthView, ShardId};

use crate::policy::{AdmissionSettings, Priority};
use crate::proxy::error::{GatewayError, RateLimited, ShedReason};
use crate::routing::affinity::{AffinityKey, AffinityOutcome};
use crate::routing::ledger::LoadCharge;
use crate::routing::{ModelRoute, ShardEntry};
use crate::table::{Table, Tables};
use buffer::QueueBudget;
use drain::{DrainRate, TokenRate};
use queue::{Ticket, WaitQueue};
use rate::Quota;
use tenant::KeyProblem;

/// Admission control for one gateway process (limits are per replica). The queue and the
/// drain rate outlive policy reloads; everything the policy says is read from the table a
/// request started with (a queued request is granted room by the table in force).
pub struct Admission {
    tables: Arc<Tables>,
    queue: WaitQueue<Waiting, Slot>,
    drain: DrainRate,
    /// Tokens admitted per second, by priority (placed at once or queued): what the more
    /// important bands take of the drain before a less important waiter is served.
    admitted: [TokenRate; 3],
    /// What the queue target is sized from when the policy does not set it.
    budget: QueueBudget,
}

/// What a queued request is placed by: its model and its priority (a critical request
/// takes only the batch slots an engine is known to have: [`ShardEntry::max_in_flight_for`]).
/// Two are equal when they wait for the same model: the queue holds a model's younger
/// waiters, of any band, behind its oldest one that did not fit, so a small standard
/// request never takes the room a large critical one waits for.
#[derive(Debug, Clone)]
pub struct Waiting {
    model: Arc<str>,
    priority: Priority,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.model == other.model
    }
}

/// A request's charge on a shard. Dropping it releases the tokens and offers the room to
/// the queue.
pub struct Slot {
    admission: Arc<Admission>,
    /// The shard.
    pub shard: Arc<ShardEntry>,
    charge: Option<LoadCharge>,
    /// When it was charged.
    placed: Instant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(charge) = self.charge.take() {
            let tokens = charge.tokens();
            drop(charge);
            self.admission.drain.released(tokens, self.placed.elapsed());
            self.admission.budget.finished();
            // With admission off nothing queues, so this is one atomic read.
            self.admission.dispatch();
        }
    }
}

/// The fleet's declared capacity (capacity × weight over every shard), tokens/s.
fn capacity_tps(table: &Table) -> f64 {
    table
        .router
        .shards()
        .iter()
        .map(|s| s.effective_capacity)
        .sum()
}

impl Admission {
    /// Admission over the tables in `tables`.
    pub fn new(tables: Arc<Tables>) -> Arc<Self> {
        let capacity = capacity_tps(&tables.peek());
        Arc::new(Self {
            tables,
            queue: WaitQueue::default(),
            drain: DrainRate::new(capacity),
            admitted: Default::default(),
            budget: QueueBudget::default(),
        })
    }

    /// A new table is in force: the drain rate's floor follows its capacity, and its
    /// room (new shards, higher limits) is offered to the queue.
    pub fn retune(self: &Arc<Self>, table: &Table) {
        self.drain.set_capacity(capacity_tps(table));
        self.dispatch();
    }

    /// Requests queued per priority, most important first.
    pub fn queue_depths(&self) -> [usize; 3] {
        self.queue.depths()
    }

    /// The fleet's unloaded time to first token, once a streamed answer has been timed.
    pub fn base_ttft(&self) -> Option<Duration> {
        self.budget.base_ttft()
    }

    /// Requests arriving per request finishing ([`buffer::QueueBudget::arrivals_per_finish`]).
    pub fn arrivals_per_finish(&self) -> Option<f64> {
        self.budget.arrivals_per_finish()
    }

    /// Requests queued for `model`, all priorities (walks the queue: for the cluster's
    /// reports of demand, not the request path).
    pub fn queued_for(&self, model: &str) -> usize {
        self.queue.waiting_for(&Waiting {
            model: Arc::from(model),
            priority: Priority::Standard,
        })
    }

    /// The tokens per second the fleet is releasing, as last measured.
    pub fn drain_tps(&self) -> f64 {
        self.drain.rate()
    }

    /// The tenant a request's headers name. 401 when keys are required and the key is
    /// missing or unknown.
    pub fn identify(
        &self,
        table: &Table,
        headers: &http::HeaderMap,
    ) -> Result<usize, GatewayError> {
        table
            .tenants
            .identify(headers)
            .map_err(|p| GatewayError::InvalidApiKey {
                missing: p == KeyProblem::Missing,
            })
    }

    /// What the request header alone decides, before any body is read: the tenant's
    /// request budget (one is taken), a token budget already spent, a full queue, a queue
    /// ahead of the request's priority already longer than it may wait.
    pub fn precheck(&self, table: &Table, tenant: usize) -> Result<(), GatewayError> {
        let t = table.tenants.get(tenant);
        let requests = match &t.rpm {
            Some(b) => Some(
                b.take(1)
                    .map_err(|q| rate_limited(t.tpm.as_ref().map(|b| b.peek()), Some(q), false))?,
            ),
            None => None,
        };
        if let Some(b) = &t.tpm {
            b.check_not_empty()
                .map_err(|q| rate_limited(Some(q), requests, true))?;
        }
        let settings = &table.policy.admission;
        if !settings.enabled {
            return Ok(());
        }
        if self.queue.len() >= settings.max_queued {
            return Err(self.shed(ShedReason::QueueFull, 0));
        }
        // Behind waiters of its priority or above a request is not placed but queued, and
        // its cost only lengthens the wait: if the queue ahead alone is too long, the body
        // cannot change the answer (a standing queue under sustained overload).
        if self.must_queue(table, t.priority) {
            let now = Instant::now();
            let timeout = settings.queue_timeout[t.priority.index()];
            if self.must_refuse(
                settings,
                t.priority,
                0,
                self.drain.rate(),
                now,
                now + timeout,
            ) {
                return Err(self.shed(ShedReason::Overloaded, 0));
            }
        }
        Ok(())
    }

    /// Charges a request's estimated tokens to its tenant's token budget.
    pub fn charge_tokens(
        &self,
        table: &Table,
        tenant: usize,
        tokens: u64,
    ) -> Result<(), GatewayError> {
        let t = table.tenants.get(tenant);
        if let Some(b) = &t.tpm {
            b.take(tokens)
                .map_err(|q| rate_limited(Some(q), t.rpm.as_ref().map(|b| b.peek()), true))?;
        }
        Ok(())
    }

    /// Corrects a tenant's token budget once the answer's usage is known.
    pub fn correct_tokens(&self, table: &Table, tenant: usize, charged: u64, used: u64) {
        if let Some(b) = &table.tenants.get(tenant).tpm {
            b.correct(charged, used);
        }
    }

    fn charge(self: &Arc<Self>, shard: &Arc<ShardEntry>, cost: u64) -> Slot {
        self.budget.started();
        self.drain.charged(cost);
        Slot {
            admission: Arc::clone(self),
            shard: Arc::clone(shard),
            charge: Some(shard.load.charge(cost)),
            placed: Instant::now(),
        }
    }

    /// Places a request of `priority` on a shard of `table` with room for it, following
    /// its cache `affinity` where that allows; `None` when none has room. With admission
    /// off, any shard routing would pick has room. Also says what affinity did.
    pub fn place(
        self: &Arc<Self>,
        table: &Table,
        route: &ModelRoute,
        priority: Priority,
        cost: u64,
        affinity: Option<&AffinityKey>,
    ) -> Option<(Slot, Option<AffinityOutcome>)> {
        let rng = &mut rand::thread_rng();
        let router = &table.router;
        let affine = affinity.map(|k| (k, cost));
        let (shard, outcome) = if table.policy.admission.enabled {
            let fits = |s: &ShardEntry, h: &HealthView, now| {
                s.limit_fits(cost, priority, h) && router.has_headroom(s, h, now)
            };
            router.pick_affine(route, &[], fits, affine, rng)?
        } else {
            router.pick_affine(route, &[], |_, _, _| true, affine, rng)?
        };
        Some((self.charge(shard, cost), outcome))
    }

    /// [`Self::place`] for a new request of `priority`, counted as admitted when placed.
    pub fn place_new(
        self: &Arc<Self>,
        table: &Table,
        route: &ModelRoute,
        priority: Priority,
        cost: u64,
        affinity: Option<&AffinityKey>,
    ) -> Option<(Slot, Option<AffinityOutcome>)> {
        let placed = self.place(table, route, priority, cost, affinity)?;
        self.admitted[priority.index()].add(cost);
        self.queue
            .passed_by(priority, cost, || self.left(self.drain.rate()));
        Some(placed)
    }

    /// Places a retry: any shard routing picks, room or not (the retry budget bounds them).
    pub fn place_retry(
        self: &Arc<Self>,
        table: &Table,
        route: &ModelRoute,
        cost: u64,
        tried: &[ShardId],
    ) -> Option<Slot> {
        let shard = table.router.pick(route, tried, &mut rand::thread_rng())?;
        Some(self.charge(shard, cost))
    }

    /// Whether routing has any shard for `route`, room or not.
    pub fn can_serve(&self, table: &Table, route: &ModelRoute) -> bool {
        table
            .router
            .pick(route, &[], &mut rand::thread_rng())
            .is_some()
    }

    /// Whether a new request of `priority` may take room now, or must queue behind
    /// waiters of its priority or above.
    pub fn must_queue(&self, table: &Table, priority: Priority) -> bool {
        table.policy.admission.enabled && self.queue.ahead_of(priority) > 0
    }

    /// Queues a request that could not be placed, or refuses it at once when its
    /// predicted wait exceeds what it may wait (see the module's rule). `deadline` is the
    /// request's own. Only for admission that is enabled: with it off nothing waits.
    pub fn enqueue<'a>(
        self: &'a Arc<Self>,
        table: &Table,
        route: &ModelRoute,
        priority: Priority,
        cost: u64,
        deadline: Instant,
    ) -> Result<(Ticket<'a, Waiting, Slot>, Instant), GatewayError> {
        let settings = &table.policy.admission;
        let now = Instant::now();
        let rate = self.drain.rate();
        let timeout = settings.queue_timeout[priority.index()];
        let queue_deadline = (now + timeout).min(deadline);
        if self.must_refuse(settings, priority, cost, rate, now, queue_deadline) {
            return Err(self.shed(ShedReason::Overloaded, cost));
        }
        let current = self.tables.load();
        if priority == Priority::Sheddable {
            self.queue
                .set_sheddable_grace(self.sheddable_buffer(settings));
        }
        let waiting = Waiting {
            model: Arc::clone(&route.name),
            priority,
        };
        let ticket = self.queue.enqueue(
            priority,
            waiting,
            cost,
            queue_deadline,
            self.left(rate),
            |m, c| self.place_queued(&current, m, c),
        );
        self.admitted[priority.index()].add(cost);
        Ok((ticket, queue_deadline))
    }

    /// Whether a new request of `priority` and `cost` is refused rather than queued until
    /// `deadline`: the bands above leave its band (almost) nothing, the queue is longer
    /// than it may join now ([`Self::allowed_wait`]; for a sheddable request, the whole
    /// queue at the fleet's drain rate — it joins only the short buffer of waiters that
    /// keeps slots busy at about capacity, and standard arrivals after it go first for no
    /// longer than the queue target: [`queue`]), or its predicted wait passes the deadline.
    fn must_refuse(
        &self,
        settings: &AdmissionSettings,
        priority: Priority,
        cost: u64,
        rate: f64,
        now: Instant,
        deadline: Instant,
    ) -> bool {
        let wait = self.predicted_wait(priority, cost, rate);
        if wait == Duration::MAX {
            return true;
        }
        let queued = match priority {
            Priority::Sheddable => {
                Duration::from_secs_f64((self.queue.tokens_queued() + cost) as f64 / rate)
            }
            _ => wait,
        };
        queued > self.allowed_wait(settings, priority, now)
            || now.checked_add(wait).is_none_or(|t| t > deadline)
    }

    /// How long a new request of `priority` and `cost` would wait: the tokens served before
    /// it and its own, at what the fleet's drain rate (`rate`, tokens/s) leaves it. Before a
    /// critical request: the critical waiters, at the whole rate. Before a standard one:
    /// the critical and standard waiters, at what critical arrivals leave (they go first,
    /// arriving after it or not). Before a sheddable one: every waiter, at what critical
    /// and standard arrivals leave — a margin, since standard requests arriving once its
    /// grace is over go after it. A band left almost nothing would wait for ever: the wait
    /// is then [`Duration::MAX`], and the request is refused at once instead of starving in
    /// the queue until its deadline.
    fn predicted_wait(&self, priority: Priority, cost: u64, rate: f64) -> Duration {
        let (ahead, left) = match priority {
            Priority::Critical => (self.queue.tokens_ahead_of(priority), rate),
            Priority::Standard => (self.queue.tokens_ahead_of(priority), self.left(rate)),
            Priority::Sheddable => {
                let standard = self.admitted[Priority::Standard.index()].rate();
                (self.queue.tokens_queued(), self.left(rate) - standard)
            }
        };
        if left <= rate * STARVED {
            return Duration::MAX;
        }
        Duration::from_secs_f64((ahead + cost) as f64 / left)
    }

    /// What the drain rate `rate` leaves the standard and sheddable bands once critical
    /// arrivals are served, tokens/s.
    fn left(&self, rate: f64) -> f64 {
        rate - self.admitted[Priority::Critical.index()].rate()
    }

    /// The longest predicted wait a new request of `priority` may be queued for now.
    /// Critical requests wait only behind critical ones, so a standing queue of others
    /// does not shorten their wait; standard ones may join only briefly while the fleet is
    /// overloaded — the queue stands, or requests arrive at [`buffer::OVERLOADED`] times
    /// the rate they finish or more (a queue that grants fast empties now and then even
    /// at twice capacity, and each time it does, a standard request allowed its whole
    /// timeout would make every request behind it late);
    /// sheddable ones only ever briefly (and not at all when their timeout is 0), so the
    /// queue timeout is a margin over the wait they joined for, and a sheddable request
    /// refused is refused on arrival.
    fn allowed_wait(
        &self,
        settings: &AdmissionSettings,
        priority: Priority,
        now: Instant,
    ) -> Duration {
        let timeout = settings.queue_timeout[priority.index()];
        match priority {
            Priority::Critical => timeout,
            Priority::Sheddable => self.sheddable_buffer(settings),
            _ if self.queue.standing(now) || self.budget.overloaded() => {
                self.queue_target(settings).min(timeout)
            }
            _ => timeout,
        }
    }

    /// How long the whole queue may be for a sheddable request to join, and how long
    /// standard arrivals after it may go first: the queue target, within a third of the
    /// sheddable timeout — the two together stay within it with a margin for the standard
    /// work that arrives within the grace (at twice capacity, more than the grace's worth),
    /// so a sheddable request that joined is served, not refused after waiting (unless
    /// critical traffic takes it all).
    fn sheddable_buffer(&self, settings: &AdmissionSettings) -> Duration {
        let timeout = settings.queue_timeout[Priority::Sheddable.index()];
        self.queue_target(settings).min(timeout / 3)
    }

    /// The queue target in force: the policy's, else the one the fleet's readings size
    /// ([`buffer`]), else the default until they have been measured.
    pub fn queue_target(&self, settings: &AdmissionSettings) -> Duration {
        settings
            .queue_target
            .or_else(|| self.budget.target())
            .unwrap_or(AdmissionSettings::DEFAULT_QUEUE_TARGET)
    }

    /// Places a queued request in the table in force.
    fn place_queued(self: &Arc<Self>, table: &Table, w: &Waiting, cost: u64) -> Option<Slot> {
        let route = table.router.route(&w.model)?;
        self.place(table, route, w.priority, cost, None)
            .map(|(slot, _)| slot)
    }

    /// Offers the room there is now to the queue: run when a slot is released, and by
    /// waiters now and then for room that appears without one (health or engine readings
    /// changed, a reload).
    pub fn dispatch(self: &Arc<Self>) {
        if self.queue.is_empty() {
            return;
        }
        let table = self.tables.load();
        self.queue.dispatch(|m, c| self.place_queued(&table, m, c));
    }

    /// A refusal by admission, with `Retry-After` from the time the fleet needs to drain
    /// what is queued (at least a second, the header's unit).
    pub fn shed(&self, reason: ShedReason, cost: u64) -> GatewayError {
        if matches!(reason, ShedReason::Overloaded | ShedReason::QueueFull) {
            self.budget.refused();
        }
        let backlog = self.queue.tokens_queued() + cost;
        let secs = (backlog as f64 / self.drain.rate()).ceil();
        GatewayError::Shed {
            reason,
            retry_after_s: secs.clamp(1.0, 60.0) as u32,
        }
    }

    /// Learns from a request's time to first token on `shard`, less its estimated prefill.
    pub fn observe_ttft(&self, shard: &ShardEntry, ttft: Duration, prefill: Duration) {
        self.budget.observe_ttft(ttft, prefill);
        let load = &shard.load;
        let (tokens, requests) = (load.inflight_tokens(), load.inflight_requests());
        let avg = if requests > 0 {
            tokens as f64 / requests as f64
        } else {
            0.0
        };
        shard
            .limit
            .observe(ttft.saturating_sub(prefill), tokens, avg);
    }

    /// `shard` answered 429: it took more than it can start.
    pub fn shard_overloaded(&self, shard: &ShardEntry) {
        shard.limit.overloaded();
    }
}

fn rate_limited(tokens: Option<Quota>, requests: Option<Quota>, by_tokens: bool) -> GatewayError {
    GatewayError::RateLimited(Box::new(RateLimited {
        by_tokens,
        requests,
        tokens,
    }))
}

/// A band the bands above leave less than this share of the drain is starved.
const STARVED: f64 = 0.05;
