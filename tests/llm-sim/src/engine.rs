//! The simulated engine: continuous batching over a fixed number of slots, a FIFO queue in
//! front of them, and a token rate shared by everything in the batch.
//!
//! It does not own HTTP; `server` turns requests into [`Engine::admit`] calls and paces
//! output with [`Running::next_token`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::fault::Fault;

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
        c.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = WaitingGuard(self.clone());
        let permit = Arc::clone(&self.inner.slots).acquire_owned().await;
        drop(waiting);
        c.running.fetch_add(1, Ordering::Relaxed);
        c.kv_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        c.prompt_tokens_total
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        let running = Running {
            engine: self.clone(),
            _permit: permit.ok(),
            kv_tokens: prompt_tokens,
            finished: false,
        };
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
        // Prefill runs about ten times faster than decode on real engines; a cached prefix
        // is not prefilled again.
        let prefill = Duration::from_secs_f64(
            (prompt_tokens - cached) as f64 / (self.inner.config.capacity_tps * 10.0).max(1.0),
        );
        let slow = self.fault().slow_factor();
        tokio::time::sleep((self.inner.config.ttft + prefill).mul_f64(slow)).await;
        running
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
    _permit: Option<OwnedSemaphorePermit>,
    kv_tokens: u64,
    finished: bool,
}

impl Running {
    /// Waits for the engine to produce this request's next token: the batch shares the
    /// engine's capacity, and no request goes faster than the inter-token latency.
    pub async fn next_token(&mut self) {
        let inner = &self.engine.inner;
        let batch = inner.counters.running.load(Ordering::Relaxed).max(1) as f64;
        let shared = Duration::from_secs_f64(batch / inner.config.capacity_tps.max(1.0));
        let step = shared.max(inner.config.itl);
        let slow = self.engine.fault().slow_factor();
        tokio::time::sleep(step.mul_f64(slow)).await;
        inner.counters.kv_tokens.fetch_add(1, Ordering::Relaxed);
        inner
            .counters
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);
        self.kv_tokens += 1;
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
        let c = &self.engine.inner.counters;
        c.running.fetch_sub(1, Ordering::Relaxed);
        c.kv_tokens.fetch_sub(self.kv_tokens, Ordering::Relaxed);
        if !self.finished {
            c.aborted_total.fetch_add(1, Ordering::Relaxed);
        }
    }
}
