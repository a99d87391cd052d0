//! The simulated engine: a fixed number of batch slots with a FIFO queue in front of them,
//! paced as one of several [`Behaviour`]s (continuous batching sharing a token rate, fixed
//! decode per slot, decode that slows with the batch, serial prefill, a KV cache that
//! preempts).
//!
//! It does not own HTTP; `server` turns requests into [`Engine::admit`] calls and paces
//! output with [`Running::next_token`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::fault::Fault;

/// How an engine schedules and paces its batch: the ways real engines differ under load
/// that a gateway's admission must cope with without being told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    /// Continuous batching: the batch shares the engine's decode throughput
    /// (`capacity_tps`), no request faster than `itl`.
    Continuous,
    /// A hard slot limit with a FIFO queue, each running request decoding at `itl` whatever
    /// the batch (vLLM's `max_num_seqs` on a GPU with compute to spare): the request after
    /// the last slot waits a whole request's duration.
    FifoSlots,
    /// Decode slows as the batch grows: a token takes `itl × (1 + slowdown × (batch − 1) /
    /// (slots − 1))`, so a full batch decodes `1 + slowdown` times slower than one request.
    SlowingDecode {
        /// Extra time per token at a full batch, as a multiple of `itl`.
        slowdown: f64,
    },
    /// Prefill-heavy: prompts are prefilled one at a time at `prefill_tps` (long prompts
    /// queue behind each other before their first token); decode as [`Behaviour::Continuous`].
    PrefillHeavy {
        /// Prefill throughput, prompt tokens per second.
        prefill_tps: f64,
    },
    /// A KV-cache limit that preempts (vLLM's recompute preemption): a request starts only
    /// when its prompt fits in the KV cache beside the running ones; when the running
    /// requests' tokens outgrow the cache, the youngest is preempted back to the waiting
    /// queue and prefills its prompt and output again when it returns. Decode as
    /// [`Behaviour::Continuous`].
    KvPreempt,
}

impl Behaviour {
    /// The names `--behaviour` takes.
    pub const NAMES: &'static str = "continuous, fifo, slowing-decode, prefill-heavy, kv-preempt";

    /// A behaviour by name, with its knobs (`slowdown`, `prefill_tps`; the others ignore
    /// them).
    pub fn parse(name: &str, slowdown: f64, prefill_tps: f64) -> Option<Self> {
        Some(match name {
            "continuous" => Self::Continuous,
            "fifo" => Self::FifoSlots,
            "slowing-decode" => Self::SlowingDecode { slowdown },
            "prefill-heavy" => Self::PrefillHeavy { prefill_tps },
            "kv-preempt" => Self::KvPreempt,
            _ => return None,
        })
    }
}

/// Engine parameters, as given on the command line.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The one model this engine serves.
    pub model: String,
    /// Decode throughput of the whole engine, tokens per second, shared by the batch.
    pub capacity_tps: f64,
    /// Requests that can run at once; the rest wait in a FIFO queue.
    pub slots: usize,
    /// Base time to first token, before queueing and prefill.
    pub ttft: Duration,
    /// Minimum time between two tokens of one request.
    pub itl: Duration,
    /// KV-cache size in tokens; `vllm:kv_cache_usage_perc` is the share in use.
    pub kv_capacity_tokens: u64,
    /// How the batch is scheduled and paced.
    pub behaviour: Behaviour,
}

impl SimConfig {
    /// A small engine for tests: 1,000 tokens/s, 8 slots, 20 ms TTFT, 5 ms between tokens.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            capacity_tps: 1000.0,
            slots: 8,
            ttft: Duration::from_millis(20),
            itl: Duration::from_millis(5),
            kv_capacity_tokens: 65_536,
            behaviour: Behaviour::Continuous,
        }
    }
}

/// Counters a test or benchmark reads to see what the engine received and did.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimStats {
    /// Inference requests received (any outcome).
    pub requests_total: u64,
    /// Inference requests answered in full.
    pub completed_total: u64,
    /// Requests whose client went away before the answer was complete.
    pub aborted_total: u64,
    /// Prompt tokens received, by this engine's own count.
    pub prompt_tokens_total: u64,
    /// Completion tokens produced.
    pub generation_tokens_total: u64,
    /// Largest request body received, in bytes.
    pub max_body_bytes: u64,
    /// Requests in the batch now.
    pub running: u64,
    /// Requests queued for a slot now.
    pub waiting: u64,
    /// Tokens (prompt + generated so far) held by running requests.
    pub kv_tokens: u64,
    /// TCP connections accepted on the serving port.
    pub connections_total: u64,
    /// Prompt tokens looked up in the prefix cache (vLLM's `prefix_cache_queries`).
    pub prefix_cache_queries_total: u64,
    /// Of them, tokens found cached, whose prefill was skipped.
    pub prefix_cache_hits_total: u64,
    /// Running requests sent back to the waiting queue because the KV cache was full.
    pub preemptions_total: u64,
}

/// Bytes of prompt text per prefix-cache block (about 70 tokens at 3.6 bytes a token).
pub const PREFIX_BLOCK_BYTES: usize = 256;

/// The engine's prefix cache: hashes of prompt blocks it has prefilled, each chained to
/// the ones before it (a block matches only if the whole prefix up to it does). Bounded by
/// the KV cache's size, in two generations: when the newer fills up it becomes the older
/// and the older is dropped, so what is not reused ages out.
#[derive(Default)]
struct PrefixCache {
    newer: std::collections::HashSet<u64>,
    older: std::collections::HashSet<u64>,
}

impl PrefixCache {
    /// How many of `blocks`' leading blocks are cached; then caches all of them.
    fn look_up_and_keep(&mut self, blocks: &[u64], capacity_blocks: usize) -> usize {
        let hits = blocks
            .iter()
            .take_while(|b| self.newer.contains(b) || self.older.contains(b))
            .count();
        for b in blocks {
            if self.newer.len() >= capacity_blocks.div_ceil(2).max(1) {
                self.older = std::mem::take(&mut self.newer);
            }
            self.newer.insert(*b);
        }
        hits
    }
}

#[derive(Default)]
struct Counters {
    requests_total: AtomicU64,
    completed_total: AtomicU64,
    aborted_total: AtomicU64,
    prompt_tokens_total: AtomicU64,
    generation_tokens_total: AtomicU64,
    max_body_bytes: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    kv_tokens: AtomicU64,
    connections_total: AtomicU64,
    prefix_cache_queries_total: AtomicU64,
    prefix_cache_hits_total: AtomicU64,
    preemptions_total: AtomicU64,
}

/// A cheap handle on one simulated engine; clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimConfig,
    slots: Arc<Semaphore>,
    counters: Counters,
    // A watch channel, so the serving loop can wake on a change (to close its port) while
    // requests read the current value once per token without locking.
    fault: watch::Sender<Fault>,
    /// Responses kept for `GET /v1/responses/{id}` (vLLM's `store`), oldest first.
    stored: std::sync::Mutex<std::collections::VecDeque<(String, serde_json::Value)>>,
    prefix_cache: std::sync::Mutex<PrefixCache>,
    /// Held by the head of the waiting line while it waits for a slot (and, with
    /// [`Behaviour::KvPreempt`], for room in the KV cache): arrivals start in FIFO order.
    line: tokio::sync::Mutex<()>,
    /// Woken when KV-cache tokens are released ([`Behaviour::KvPreempt`]).
    kv_freed: tokio::sync::Notify,
    /// One prefill at a time ([`Behaviour::PrefillHeavy`]).
    prefill_lane: tokio::sync::Mutex<()>,
    /// Admission order of the running requests, for picking the youngest to preempt.
    running_order: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    next_seq: AtomicU64,
}

/// Responses an engine keeps.
const STORED_RESPONSES: usize = 1024;

impl Engine {
    /// Builds an idle engine.
    pub fn new(config: SimConfig) -> Self {
        let slots = Arc::new(Semaphore::new(config.slots.max(1)));
        Self {
            inner: Arc::new(Inner {
                config,
                slots,
                counters: Counters::default(),
                fault: watch::Sender::new(Fault::default()),
                stored: Default::default(),
                prefix_cache: Default::default(),
                line: Default::default(),
                kv_freed: Default::default(),
                prefill_lane: Default::default(),
                running_order: Default::default(),
                next_seq: AtomicU64::new(0),
            }),
        }
    }

    /// Keeps a finished response for later retrieval (the oldest goes past 1024).
    pub fn store_response(&self, id: &str, response: serde_json::Value) {
        let mut stored = self.inner.stored.lock().unwrap_or_else(|p| p.into_inner());
        if stored.len() >= STORED_RESPONSES {
            stored.pop_front();
        }
        stored.push_back((id.to_string(), response));
    }

    /// A stored response.
    pub fn stored_response(&self, id: &str) -> Option<serde_json::Value> {
        let stored = self.inner.stored.lock().unwrap_or_else(|p| p.into_inner());
        stored.iter().find(|(i, _)| i == id).map(|(_, v)| v.clone())
    }

    /// Forgets a stored response; whether it was there.
    pub fn delete_response(&self, id: &str) -> bool {
        let mut stored = self.inner.stored.lock().unwrap_or_else(|p| p.into_inner());
        let before = stored.len();
        stored.retain(|(i, _)| i != id);
        stored.len() != before
    }

    /// The engine's parameters.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// The fault now in force.
    pub fn fault(&self) -> Fault {
        self.inner.fault.borrow().clone()
    }

    /// Replaces the fault in force; takes effect for the next request and the next token.
    pub fn set_fault(&self, fault: Fault) {
        self.inner.fault.send_replace(fault);
    }

    /// A receiver that wakes on every fault change.
    pub fn watch_fault(&self) -> watch::Receiver<Fault> {
        self.inner.fault.subscribe()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        let c = &self.inner.counters;
        SimStats {
            requests_total: c.requests_total.load(Ordering::Relaxed),
            completed_total: c.completed_total.load(Ordering::Relaxed),
            aborted_total: c.aborted_total.load(Ordering::Relaxed),
            prompt_tokens_total: c.prompt_tokens_total.load(Ordering::Relaxed),
            generation_tokens_total: c.generation_tokens_total.load(Ordering::Relaxed),
            max_body_bytes: c.max_body_bytes.load(Ordering::Relaxed),
            running: c.running.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed),
            kv_tokens: c.kv_tokens.load(Ordering::Relaxed),
            connections_total: c.connections_total.load(Ordering::Relaxed),
            prefix_cache_queries_total: c.prefix_cache_queries_total.load(Ordering::Relaxed),
            prefix_cache_hits_total: c.prefix_cache_hits_total.load(Ordering::Relaxed),
            preemptions_total: c.preemptions_total.load(Ordering::Relaxed),
        }
    }

    /// Share of the KV cache in use, 0..=1.
    pub fn kv_usage(&self) -> f64 {
        let used = self.inner.counters.kv_tokens.load(Ordering::Relaxed) as f64;
        (used / self.inner.config.kv_capacity_tokens.max(1) as f64).min(1.0)
    }

    pub(crate) fn note_connection(&self) {
        self.inner
            .counters
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_request(&self, body_bytes: usize) {
        let c = &self.inner.counters;
        c.requests_total.fetch_add(1, Ordering::Relaxed);
        c.max_body_bytes
            .fetch_max(body_bytes as u64, Ordering::Relaxed);
    }

    /// Queues a request for a batch slot, waits for one, then waits out the time to first
    /// token (base TTFT plus prefill). Dropping the future leaves the queue.
    pub async fn admit(&self, prompt_tokens: u64) -> Running {
        self.admit_with_prefix(prompt_tokens, &[]).await
    }

    /// [`Engine::admit`] for a prompt whose text hashes to `blocks` (see
    /// [`crate::openai::InferenceRequest::prefix_blocks`]): the leading blocks found in the
    /// prefix cache skip their prefill.
    pub async fn admit_with_prefix(&self, prompt_tokens: u64, blocks: &[u64]) -> Running {
        let c = &self.inner.counters;
        let permit = self.wait_for_room(prompt_tokens).await;
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut running = Running {
            engine: self.clone(),
            permit: None,
            active: false,
            seq,
            kv_tokens: prompt_tokens,
            finished: false,
        };
        running.activate(permit);
        c.prompt_tokens_total
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        let cached = if blocks.is_empty() {
            0
        } else {
            let capacity_blocks = (self.inner.config.kv_capacity_tokens as f64 * 3.6
                / PREFIX_BLOCK_BYTES as f64) as usize;
            let hits = self
                .inner
                .prefix_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .look_up_and_keep(blocks, capacity_blocks);
            ((hits * PREFIX_BLOCK_BYTES) as f64 / 3.6) as u64
        }
        .min(prompt_tokens);
        c.prefix_cache_queries_total
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        c.prefix_cache_hits_total
            .fetch_add(cached, Ordering::Relaxed);
        // A cached prefix is not prefilled again.
        self.prefill(prompt_tokens - cached, true).await;
        running
    }

    /// Waits in the FIFO line for a batch slot and, with [`Behaviour::KvPreempt`], for
    /// `kv_needed` tokens of room in the KV cache (an engine with nothing running takes
    /// any request). Counted as waiting meanwhile.
    async fn wait_for_room(&self, kv_needed: u64) -> Option<OwnedSemaphorePermit> {
        let inner = &self.inner;
        inner.counters.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = WaitingGuard(self.clone());
        let _head = inner.line.lock().await;
        let permit = Arc::clone(&inner.slots).acquire_owned().await.ok();
        if inner.config.behaviour == Behaviour::KvPreempt {
            loop {
                // Registered before the check, so a release between the two still wakes it.
                let freed = inner.kv_freed.notified();
                let used = inner.counters.kv_tokens.load(Ordering::Relaxed);
                let idle = inner.counters.running.load(Ordering::Relaxed) == 0;
                if idle || used + kv_needed <= inner.config.kv_capacity_tokens {
                    break;
                }
                freed.await;
            }
        }
        permit
    }

    /// Waits out the time to compute `tokens` of prompt (and the base TTFT when `first`):
    /// prefill runs about ten times faster than decode, or, prefill-heavy, one prompt at a
    /// time at its own rate.
    async fn prefill(&self, tokens: u64, first: bool) {
        let config = &self.inner.config;
        let slow = self.fault().slow_factor();
        let base = if first { config.ttft } else { Duration::ZERO };
        match config.behaviour {
            Behaviour::PrefillHeavy { prefill_tps } => {
                tokio::time::sleep(base.mul_f64(slow)).await;
                let _lane = self.inner.prefill_lane.lock().await;
                let t = Duration::from_secs_f64(tokens as f64 / prefill_tps.max(1.0));
                tokio::time::sleep(t.mul_f64(slow)).await;
            }
            _ => {
                let t =
                    Duration::from_secs_f64(tokens as f64 / (config.capacity_tps * 10.0).max(1.0));
                tokio::time::sleep((base + t).mul_f64(slow)).await;
            }
        }
    }

    /// How long one decode step takes with `batch` requests running.
    fn decode_step(&self, batch: u64) -> Duration {
        let config = &self.inner.config;
        let batch = batch.max(1) as f64;
        match config.behaviour {
            Behaviour::FifoSlots => config.itl,
            Behaviour::SlowingDecode { slowdown } => {
                let fill = (batch - 1.0) / (config.slots.max(2) - 1) as f64;
                config.itl.mul_f64(1.0 + slowdown.max(0.0) * fill.min(1.0))
            }
            _ => Duration::from_secs_f64(batch / config.capacity_tps.max(1.0)).max(config.itl),
        }
    }

    fn order(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.inner
            .running_order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

struct WaitingGuard(Engine);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0
            .inner
            .counters
            .waiting
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in the batch. Dropping it before [`Running::finish`] counts as an abort and
/// frees the slot, as an engine does when the client disconnects.
pub struct Running {
    engine: Engine,
    permit: Option<OwnedSemaphorePermit>,
    /// Whether it holds its slot and KV tokens now (not while preempted).
    active: bool,
    /// Its place in admission order: the youngest running request is preempted first.
    seq: u64,
    kv_tokens: u64,
    finished: bool,
}

impl Running {
    /// Waits for the engine to produce this request's next token (paced by the engine's
    /// [`Behaviour`]); with [`Behaviour::KvPreempt`], a request that is the youngest when
    /// the cache overflows is preempted first and recomputes when it returns.
    pub async fn next_token(&mut self) {
        let engine = self.engine.clone();
        let inner = &engine.inner;
        let batch = inner.counters.running.load(Ordering::Relaxed);
        let slow = engine.fault().slow_factor();
        tokio::time::sleep(engine.decode_step(batch).mul_f64(slow)).await;
        inner.counters.kv_tokens.fetch_add(1, Ordering::Relaxed);
        inner
            .counters
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);
        self.kv_tokens += 1;
        if inner.config.behaviour == Behaviour::KvPreempt && self.must_yield() {
            inner
                .counters
                .preemptions_total
                .fetch_add(1, Ordering::Relaxed);
            self.deactivate();
            let permit = engine.wait_for_room(self.kv_tokens).await;
            self.activate(permit);
            engine.prefill(self.kv_tokens, false).await;
        }
    }

    /// The KV cache has overflowed and this is the youngest of several running requests.
    fn must_yield(&self) -> bool {
        let inner = &self.engine.inner;
        if inner.counters.kv_tokens.load(Ordering::Relaxed) <= inner.config.kv_capacity_tokens {
            return false;
        }
        let order = self.engine.order();
        order.len() > 1 && order.last() == Some(&self.seq)
    }

    /// Takes its slot and its KV tokens.
    fn activate(&mut self, permit: Option<OwnedSemaphorePermit>) {
        let c = &self.engine.inner.counters;
        self.permit = permit;
        self.active = true;
        c.running.fetch_add(1, Ordering::Relaxed);
        c.kv_tokens.fetch_add(self.kv_tokens, Ordering::Relaxed);
        self.engine.order().insert(self.seq);
    }

    /// Gives its slot and KV tokens back (done, aborted or preempted).
    fn deactivate(&mut self) {
        if !std::mem::take(&mut self.active) {
            return;
        }
        let inner = &self.engine.inner;
        self.engine.order().remove(&self.seq);
        inner.counters.running.fetch_sub(1, Ordering::Relaxed);
        inner
            .counters
            .kv_tokens
            .fetch_sub(self.kv_tokens, Ordering::Relaxed);
        self.permit = None;
        inner.kv_freed.notify_waiters();
    }

    /// Marks the request as answered in full.
    pub fn finish(mut self) {
        self.finished = true;
        self.engine
            .inner
            .counters
            .completed_total
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.deactivate();
        if !self.finished {
            self.engine
                .inner
                .counters
                .aborted_total
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
