//! Where a request goes: model → the regions that serve it (home first, then policy order)
//! → a shard chosen by power-of-two-choices on in-flight tokens per unit of capacity.
//!
//! # Layout
//! - [`estimate`]: a request's token cost, calibrated by reported usage.
//! - [`explain`]: what a pick saw, for the decisions log.
//! - [`ledger`]: in-flight tokens per shard, released exactly once.
//! - [`select`]: the power-of-two-choices selector.
//!
//! This module does not talk to shards or judge their health; it reads the published
//! [`HealthView`].

pub mod affinity;
pub mod estimate;
pub mod explain;
pub mod ledger;
pub mod select;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use breakwater_health::{
    EngineLoad, HealthMonitor, HealthView, ShardId, ShardReporter, ShardState,
};
use http::HeaderValue;
use rand::Rng;
use slotmap::{Key as _, SlotMap};
use smallvec::SmallVec;
use url::Url;

use crate::admission::limit::ShardLimit;
use crate::admission::slots::EngineSlots;
use crate::policy::{Policy, Priority, Shard};
use crate::proxy::request::EndpointSet;
use crate::proxy::upstream::Endpoint;
use crate::stats::LatencyWindow;
use crate::tls::upstream::UpstreamTls;
use affinity::{AffinityKey, AffinityMode, AffinityOutcome, PrefixIndex, RouteAffinity};
use estimate::Estimator;
use ledger::ShardLoad;

/// A shard as routing sees it: what the policy says of it (fixed for one table) and its
/// live state (carried from table to table while the shard keeps its id and URL).
#[derive(Debug)]
pub struct ShardEntry {
    /// The shard's key beyond this table: health, probes and logs of in-flight requests.
    pub key: ShardId,
    /// Shard id.
    pub id: String,
    /// Region id.
    pub region: String,
    /// Pool id.
    pub pool: String,
    /// Base URL.
    pub url: Url,
    /// `host:port`, for the upstream `Host` header.
    pub authority: String,
    /// Its pool's client TLS, for an `https://` shard.
    pub tls: Option<Arc<UpstreamTls>>,
    /// Requests in flight on it at most (its declared batch slots).
    pub max_requests: Option<u64>,
    /// What its kept connections are filed under: the authority, and for TLS the scheme
    /// and the trust settings, so a TLS and a plain connection (or two pools' different
    /// CAs) never share one.
    pub conn_key: String,
    /// Capacity × weight, tokens/s: the denominator of the load score.
    pub effective_capacity: f64,
    /// Declared capacity, tokens/s.
    pub capacity_tps: f64,
    /// `x-breakwater-shard` and `x-breakwater-region`, made once.
    pub tags: ShardTags,
    /// Live load.
    pub load: Arc<ShardLoad>,
    /// Admission's limit on the tokens in flight, learned.
    pub limit: Arc<ShardLimit>,
    /// Its engine's batch slots, learned from the engine's running and waiting counts.
    pub slots: Arc<EngineSlots>,
    /// Where request outcomes on it are reported.
    pub reporter: ShardReporter,
    /// Its last minute of answers (rate, TTFT percentiles), for the dashboard.
    pub window: Arc<LatencyWindow>,
}

impl ShardEntry {
    /// Where the upstream client sends its requests.
    pub fn endpoint(&self) -> Endpoint<'_> {
        Endpoint {
            authority: &self.authority,
            conn_key: &self.conn_key,
            tls: self
                .tls
                .as_deref()
                .map(|t| (t, self.url.host_str().unwrap_or_default())),
        }
    }

    /// Whether an operator has drained the shard.
    pub fn is_drained(&self) -> bool {
        self.load.is_drained()
    }

    /// The most requests admission keeps in flight on it: its declared batch slots
    /// (`max_requests`), else the slots learned from its engine, else no bound in requests.
    pub fn max_in_flight(&self) -> Option<u64> {
        self.max_requests.or_else(|| self.slots.learned())
    }

    /// [`Self::max_in_flight`] for a request of `priority`: a critical one only takes the
    /// slots the engine is known to have, not one more being tried
    /// ([`EngineSlots::confirmed`]); with `[cluster]`, within this replica's allotment.
    pub fn max_in_flight_for(&self, priority: Priority) -> Option<u64> {
        match (self.max_requests, priority) {
            (Some(m), _) => Some(m),
            (None, Priority::Critical) => self.slots.confirmed(),
            (None, _) => self.slots.learned(),
        }
        .map(|m| self.slots.allotted(m))
    }

    /// Whether its admission limit, scaled by its health weight in `health`, has room for
    /// a request of `cost` tokens and `priority` beside what is in flight, and a batch
    /// slot is free ([`Self::max_in_flight_for`]; the engine's latest reading in `health`
    /// is learned from first).
    pub fn limit_fits(&self, cost: u64, priority: Priority, health: &HealthView) -> bool {
        if let Some(e) = health.engine(self.key) {
            if let (Some(taken), Some(running), Some(waiting)) = (e.taken, e.running, e.queue_depth)
            {
                self.slots.observe(taken, running, waiting);
            }
        }
        // A shard health keeps out is picked only when its route has no other (panic
        // routing): it is then served as if healthy, not at the zero weight its state gives
        // it — which would let it take one request at a time and queue the rest, so a fleet
        // that fails would answer "overloaded" instead of its errors.
        let weight = if health.takes_new_requests(self.key) {
            health.weight_factor(self.key)
        } else {
            1.0
        };
        self.max_in_flight_for(priority)
            .is_none_or(|m| self.load.inflight_requests() < m)
            && self.limit.fits(self.load.inflight_tokens(), cost, weight)
    }
}

/// The values of `x-breakwater-shard` and `x-breakwater-region` for one shard.
#[derive(Debug, Clone)]
pub struct ShardTags {
    /// The shard id.
    pub shard: HeaderValue,
    /// The shard's region.
    pub region: HeaderValue,
}

impl ShardTags {
    fn new(shard: &str, region: &str) -> Self {
        // Policy ids are ASCII letters, digits, `-`, `_` and `.`: always valid values.
        let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("?"));
        Self {
            shard: value(shard),
            region: value(region),
        }
    }
}

/// The shards that may serve one model, grouped by region in the order they are tried.
#[derive(Debug)]
pub struct ModelRoute {
    /// The model's name.
    pub name: Arc<str>,
    /// Index into the estimator's per-model statistics.
    pub model: usize,
    /// `tiers[0]` is the home region (if it serves the model), then other regions in
    /// policy order. Each tier lists positions in [`Router::shards`].
    pub tiers: Vec<Vec<usize>>,
    /// The smallest context window the model's pools declare, tokens.
    pub context_window: Option<u64>,
    /// The endpoints its pools serve (the same for all of them: the policy checks).
    pub endpoints: EndpointSet,
    /// Cache affinity, when its pools ask for it (the same for all of them).
    pub affinity: Option<Arc<RouteAffinity>>,
    /// Each tier's share of first attempts, as last worked out ([`Router::spill_tier`]).
    spill: Mutex<Option<SpillShares>>,
}

/// The tiers' shares of first attempts for one health snapshot, for at most
/// [`SPILL_REFRESH`]: working them out reads every shard of the route.
#[derive(Debug)]
struct SpillShares {
    /// The snapshot they were worked out on (its address).
    view: usize,
    at: Instant,
    shares: SmallVec<[f64; 4]>,
}

/// How long the tiers' shares are kept for one health snapshot: an operator's drain and
/// engine readings going stale change them without a new snapshot.
const SPILL_REFRESH: std::time::Duration = std::time::Duration::from_millis(100);

/// What outlives every routing table: the shard ids handed out, the health snapshot the
/// monitor publishes, and the monitor itself.
pub struct Fleet {
    ids: Mutex<SlotMap<ShardId, ()>>,
    health: Arc<HealthCell>,
    monitor: HealthMonitor,
}

/// Where the health monitor publishes its snapshots.
pub type HealthCell = ArcSwap<HealthView>;

impl Fleet {
    /// A fleet whose shards report to `monitor`, which publishes into `health`.
    pub fn new(monitor: HealthMonitor, health: Arc<HealthCell>) -> Arc<Self> {
        Arc::new(Self {
            ids: Mutex::new(SlotMap::with_key()),
            health,
            monitor,
        })
    }

    /// A fleet with no monitor behind it (reports go nowhere): tools and tests.
    pub fn detached() -> Arc<Self> {
        let health = Arc::new(ArcSwap::from_pointee(HealthView::default()));
        Self::new(HealthMonitor::disconnected(), health)
    }

    /// The health snapshot routing uses now.
    pub fn health(&self) -> Arc<HealthView> {
        self.health.load_full()
    }

    /// Publishes a new health snapshot (swapped whole).
    pub fn publish_health(&self, view: HealthView) {
        self.health.store(Arc::new(view));
    }

    /// The health monitor.
    pub fn monitor(&self) -> &HealthMonitor {
        &self.monitor
    }
}

/// The compiled routing table plus the live state routing reads: loads, learned token
/// statistics and the health snapshot. Immutable once built; a policy reload builds the
/// next one from the previous ([`Router::build`]).
pub struct Router {
    shards: Arc<[Arc<ShardEntry>]>,
    /// Routes by model index (the estimator's numbering).
    routes: Vec<ModelRoute>,
    /// Model name → index into `routes`.
    /// Looked up on every request: a fast hasher (the keys are the policy's; a client's
    /// model name only probes the map).
    models: HashMap<Arc<str>, usize, foldhash::fast::RandomState>,
    model_names: Vec<String>,
    estimator: Estimator,
    fleet: Arc<Fleet>,
    /// Engine readings older than this are ignored.
    engine_stale_after: std::time::Duration,
    /// Tokens assumed per engine-reported request when the ledger has none to average.
    default_request_tokens: f64,
    /// How far a region's healthy capacity is stretched before traffic spills.
    overprovisioning: f64,
    /// Queue depth at which an engine has no headroom.
    saturation_queue_depth: f64,
    /// KV-cache use at which an engine has no headroom.
    saturation_kv_usage: f64,
}

/// KV-cache use above which a shard's score grows: GIE's and vLLM's "near saturation".
const KV_PRESSURE_FROM: f64 = 0.8;

impl Router {
    /// A first table from a validated policy, on a fleet of its own with no monitor.
    pub fn new(policy: &Policy) -> Self {
        Self::build(policy, None, &Fleet::detached())
    }

    /// Builds the table for `policy`. A shard that `previous` has with the same id and URL
    /// keeps its key and live state (load, admission limit, drain); any other shard is new.
    /// Shards of `previous` that are gone give their ids back; their entries live on in
    /// the tables that in-flight requests still hold. Model statistics carry by name.
    pub fn build(policy: &Policy, previous: Option<&Router>, fleet: &Arc<Fleet>) -> Self {
        let mut ids = fleet.ids.lock().unwrap_or_else(|p| p.into_inner());
        // By id, so a table of thousands of shards builds in linear time.
        let before: HashMap<&str, &Arc<ShardEntry>> = previous
            .map(|p| p.shards.iter().map(|o| (o.id.as_str(), o)).collect())
            .unwrap_or_default();
        let shards: Vec<Arc<ShardEntry>> = policy
            .shards
            .iter()
            .map(|s| {
                let old = before.get(s.id.as_str()).copied();
                Arc::new(shard_entry(policy, s, old, &mut ids, &fleet.monitor))
            })
            .collect();
        if let Some(p) = previous {
            let kept: std::collections::HashSet<ShardId> = shards.iter().map(|n| n.key).collect();
            for gone in p.shards.iter().filter(|o| !kept.contains(&o.key)) {
                ids.remove(gone.key);
            }
        }
        drop(ids);
        // Region order: home first, then the policy's order.
        let mut regions: Vec<&str> = vec![policy.home_region.as_str()];
        regions.extend(
            policy
                .regions
                .iter()
                .map(|r| r.id.as_str())
                .filter(|r| *r != policy.home_region),
        );
        let mut model_names: Vec<String> = policy
            .pools
            .iter()
            .flat_map(|p| p.models.iter().cloned())
            .collect();
        model_names.sort();
        model_names.dedup();
        let routes: Vec<ModelRoute> = model_names
            .iter()
            .enumerate()
            .map(|(idx, model)| {
                let tiers = regions
                    .iter()
                    .filter_map(|region| {
                        let pool = policy
                            .pools
                            .iter()
                            .find(|p| p.region == *region && p.models.contains(model))?;
                        let tier: Vec<usize> = shards
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.pool == pool.id)
                            .map(|(i, _)| i)
                            .collect();
                        (!tier.is_empty()).then_some(tier)
                    })
                    .collect();
                let context_window = policy
                    .pools
                    .iter()
                    .filter(|p| p.models.contains(model))
                    .filter_map(|p| p.context_window)
                    .min();
                let first_pool = policy.pools.iter().find(|p| p.models.contains(model));
                let endpoints = first_pool.map_or(EndpointSet::ALL, |p| p.endpoints);
                // The index outlives a reload that keeps the settings.
                let affinity = first_pool
                    .map(|p| &p.affinity)
                    .filter(|a| a.mode != AffinityMode::None)
                    .map(|settings| {
                        let carried = previous
                            .and_then(|prev| prev.route(model))
                            .and_then(|r| r.affinity.as_ref())
                            .filter(|a| a.settings == *settings);
                        match carried {
                            Some(a) => Arc::clone(a),
                            None => Arc::new(RouteAffinity {
                                settings: settings.clone(),
                                index: PrefixIndex::new(affinity::INDEX_BLOCKS),
                            }),
                        }
                    });
                ModelRoute {
                    name: Arc::from(model.as_str()),
                    model: idx,
                    tiers,
                    context_window,
                    endpoints,
                    affinity,
                    spill: Mutex::new(None),
                }
            })
            .collect();
        let models = routes
            .iter()
            .enumerate()
            .map(|(i, r)| (Arc::clone(&r.name), i))
            .collect();
        let estimator = Estimator::carried(
            &model_names,
            policy.routing.bytes_per_token,
            policy.routing.default_completion_tokens,
            previous.map(|p| (p.model_names.as_slice(), &p.estimator)),
        );
        Self {
            shards: shards.into(),
            routes,
            models,
            model_names,
            estimator,
            fleet: Arc::clone(fleet),
            engine_stale_after: policy.health.metrics_stale_after(),
            default_request_tokens: policy.routing.default_completion_tokens as f64,
            overprovisioning: policy.routing.overprovisioning_factor,
            saturation_queue_depth: policy.routing.saturation_queue_depth,
            saturation_kv_usage: policy.routing.saturation_kv_usage,
        }
    }

    /// The route for a model, or `None` when no pool serves it.
    pub fn route(&self, model: &str) -> Option<&ModelRoute> {
        self.models.get(model).map(|i| &self.routes[*i])
    }

    /// The route [`ModelRoute::model`] numbers `i`.
    pub fn route_by_index(&self, i: usize) -> Option<&ModelRoute> {
        self.routes.get(i)
    }

    /// Every model some pool serves, sorted.
    pub fn model_names(&self) -> &[String] {
        &self.model_names
    }

    /// Every shard, in policy order.
    pub fn shards(&self) -> &[Arc<ShardEntry>] {
        &self.shards
    }

    /// The shard with policy id `id`.
    pub fn shard(&self, id: &str) -> Option<&Arc<ShardEntry>> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// The token estimator.
    pub fn estimator(&self) -> &Estimator {
        &self.estimator
    }

    /// The health snapshot routing uses now.
    pub fn health(&self) -> Arc<HealthView> {
        self.fleet.health()
    }

    /// Publishes a new health snapshot (swapped whole).
    pub fn publish_health(&self, view: HealthView) {
        self.fleet.publish_health(view);
    }

    /// The health monitor the shards report to.
    pub fn monitor(&self) -> &HealthMonitor {
        self.fleet.monitor()
    }

    /// Shard `i`'s engine reading, if it is recent enough to act on (three scrapes);
    /// an older one is unknown.
    fn fresh_engine<'h>(
        &self,
        i: usize,
        health: &'h HealthView,
        now: Instant,
    ) -> Option<&'h EngineLoad> {
        self.fresh(self.shards[i].key, health, now)
    }

    /// `now`: read once per routing decision, not once per shard looked at.
    fn fresh<'h>(
        &self,
        key: ShardId,
        health: &'h HealthView,
        now: Instant,
    ) -> Option<&'h EngineLoad> {
        health.engine(key).filter(|e| {
            e.taken
                .is_some_and(|t| now.saturating_duration_since(t) <= self.engine_stale_after)
        })
    }

    /// Whether shard `i` may take new requests: health admits it and no operator drained it.
    fn admitted(&self, i: usize, health: &HealthView) -> bool {
        let s = &self.shards[i];
        !s.is_drained() && health.takes_new_requests(s.key)
    }

    /// The load score of shard `i`: tokens of work on it per token/s of effective capacity
    /// (roughly, seconds of work queued), scaled up for a shard health has degraded.
    ///
    /// The work is the larger of this gateway's ledger and what the engine itself reports
    /// (requests running and queued, at this shard's average request size): with one
    /// gateway the two agree; with several replicas, or clients that bypass the gateway,
    /// only the engine sees everything. KV-cache use past 80 % adds up to 100 % more, as
    /// the engine is about to preempt. Engine readings older than three scrapes are ignored.
    /// `now` is the decision's time (engine readings older than three scrapes by then are
    /// ignored).
    pub fn score(&self, i: usize, health: &HealthView, now: Instant) -> f64 {
        let s = &self.shards[i];
        let factor = health.weight_factor(s.key).clamp(0.01, 1.0);
        let ledger = s.load.inflight_tokens() as f64;
        let mut work = ledger;
        let mut pressure = 1.0;
        if let Some(e) = self.fresh_engine(i, health, now) {
            let requests = s.load.inflight_requests();
            let per_request = if requests > 0 {
                ledger / requests as f64
            } else {
                self.default_request_tokens
            };
            let engine_requests = e.queue_depth.unwrap_or(0.0) + e.running.unwrap_or(0.0);
            work = work.max(engine_requests * per_request);
            if let Some(kv) = e.kv_usage.filter(|kv| *kv > KV_PRESSURE_FROM) {
                pressure += (kv - KV_PRESSURE_FROM) / (1.0 - KV_PRESSURE_FROM);
            }
        }
        work * pressure / (s.effective_capacity * factor)
    }

    /// Picks a shard for the next attempt: the first tier (home region first) with a shard
    /// that health admits and this request has not tried yet, then power-of-two-choices
    /// within it. When health admits no shard of the model anywhere, it picks as if every
    /// shard were healthy (Envoy's "panic" routing): an outage of the health signals must
    /// not become an outage of serving. A shard an operator drained is never picked.
    /// `None`: nothing left to try.
    pub fn pick<R: Rng + ?Sized>(
        &self,
        route: &ModelRoute,
        tried: &[ShardId],
        rng: &mut R,
    ) -> Option<&Arc<ShardEntry>> {
        self.pick_fitting(route, tried, |_, _, _| true, rng)
    }

    /// [`Router::pick`] among the shards `fits` accepts (given the shard, the health
    /// snapshot and the decision's time): admission's "has room for this request". A region whose shards are all
    /// full is passed over for the next one, so traffic spills before it queues.
    pub fn pick_fitting<R: Rng + ?Sized>(
        &self,
        route: &ModelRoute,
        tried: &[ShardId],
        fits: impl Fn(&ShardEntry, &HealthView, Instant) -> bool,
        rng: &mut R,
    ) -> Option<&Arc<ShardEntry>> {
        self.pick_affine(route, tried, fits, None, rng)
            .map(|(s, _)| s)
    }

    /// [`Router::pick_fitting`] for a first attempt with an affinity key (`affine`: the
    /// key and the request's cost): within the tier chosen, the key's shard when it is a
    /// candidate and within the load bound (see [`affinity`]). Also says what affinity did;
    /// `None` when it had no say (no key, no affinity for the model, or a retry).
    pub fn pick_affine<R: Rng + ?Sized>(
        &self,
        route: &ModelRoute,
        tried: &[ShardId],
        fits: impl Fn(&ShardEntry, &HealthView, Instant) -> bool,
        affine: Option<(&AffinityKey, u64)>,
        rng: &mut R,
    ) -> Option<(&Arc<ShardEntry>, Option<AffinityOutcome>)> {
        let health = self.fleet.health.load();
        let now = Instant::now();
        let panic = !route
            .tiers
            .iter()
            .flatten()
            .any(|i| self.admitted(*i, &health));
        let mut candidates: SmallVec<[usize; 8]> = SmallVec::new();
        // A first attempt may start in a later region: the share of traffic each region
        // keeps follows its healthy capacity (see `region_shares`). Retries go in order.
        let first_tier = if tried.is_empty() && !panic {
            self.spill_tier(route, &health, now, rng.gen::<f64>())
        } else {
            0
        };
        for tier in route
            .tiers
            .iter()
            .skip(first_tier)
            .chain(route.tiers.iter().take(first_tier))
        {
            let eligible = |i: usize| {
                let s = &self.shards[i];
                let allowed = if panic {
                    !s.is_drained()
                } else {
                    self.admitted(i, &health)
                };
                allowed && !tried.contains(&s.key) && fits(s, &health, now)
            };
            let score = |i: usize| self.score(i, &health, now);
            let (Some((key, cost)), Some(aff)) = (affine, route.affinity.as_deref()) else {
                // Sampled, not listed: the same cost whatever the tier's size.
                if let Some(i) = select::sampled_p2c(tier, eligible, score, rng) {
                    return Some((&self.shards[i], None));
                }
                continue;
            };
            // Affinity ranks the whole tier (rendezvous order): it lists the candidates.
            candidates.clear();
            candidates.extend(tier.iter().copied().filter(|i| eligible(*i)));
            if let Some((i, outcome)) =
                self.affine_choice(tier, &candidates, key, cost, aff, &health, now)
            {
                let chosen = match outcome {
                    AffinityOutcome::OverriddenByLoad => select::p2c(&candidates, score, rng),
                    _ => Some(i),
                };
                if let Some(i) = chosen {
                    return Some((&self.shards[i], Some(outcome)));
                }
            }
            if let Some(i) = select::p2c(&candidates, score, rng) {
                return Some((&self.shards[i], None));
            }
        }
        None
    }

    /// The key's shard among a tier's `candidates` and what affinity did: the shard the
    /// prefix index remembers for the longest prefix, else the first in rendezvous order
    /// over the whole tier — passed over (fenced) when it is not a candidate, or is in slow
    /// start and not yet taking this key back, for the next in that order that is — and
    /// then checked against the load bound. `None`: the key says nothing here (no
    /// candidate, no usable hash).
    #[allow(clippy::too_many_arguments)]
    fn affine_choice(
        &self,
        tier: &[usize],
        candidates: &[usize],
        key: &AffinityKey,
        cost: u64,
        aff: &RouteAffinity,
        health: &HealthView,
        now: Instant,
    ) -> Option<(usize, AffinityOutcome)> {
        if candidates.is_empty() {
            return None;
        }
        let hash = key.rendezvous_hash()?;
        let id = |i: usize| self.shards[i].key.data().as_ffi();
        let factor = |i: usize| health.weight_factor(self.shards[i].key).clamp(0.01, 1.0);
        // A shard back from an ejection ramps up its weight (slow start); it takes back
        // each key once its weight passes that key's own fraction, so its keys return in
        // proportion, not all at once.
        let takes = |i: usize| {
            candidates.contains(&i) && {
                let f = factor(i);
                f >= 1.0 || affinity::key_fraction(hash, id(i)) < f
            }
        };
        let remembered = match key {
            AffinityKey::Prefix(blocks) => aff
                .index
                .deepest(blocks, now, aff.settings.ttl)
                .and_then(|k| tier.iter().copied().find(|i| self.shards[*i].key == k)),
            AffinityKey::Session(_) => None,
        };
        let (preferred, fenced) = match remembered {
            Some(i) if takes(i) => (i, false),
            _ => {
                let ids: SmallVec<[(u64, f64); 8]> = tier
                    .iter()
                    .map(|i| (id(*i), self.shards[*i].effective_capacity))
                    .collect();
                let order = affinity::rendezvous_order(hash, &ids);
                let first = order.iter().position(|p| takes(tier[*p]));
                match first {
                    Some(n) => (tier[order[n]], n > 0 || remembered.is_some()),
                    // None takes it (all ramping up): the first candidate in its order.
                    None => {
                        let n = order.iter().position(|p| candidates.contains(&tier[*p]))?;
                        (tier[order[n]], true)
                    }
                }
            }
        };
        // Bounded load, on this gateway's own ledger (its assignments, always current; an
        // engine's reading lags and may still count a request that just ended): after
        // taking this request the shard stays within max_load of the candidates' mean.
        // Both are per unit of healthy capacity.
        let per_capacity = |i: usize, tokens: f64| {
            tokens / (self.shards[i].effective_capacity * factor(i)).max(1e-9)
        };
        let load = |i: usize| per_capacity(i, self.shards[i].load.inflight_tokens() as f64);
        let mean = candidates.iter().map(|i| load(*i)).sum::<f64>() / candidates.len() as f64;
        let typical = candidates
            .iter()
            .map(|i| per_capacity(*i, cost as f64))
            .sum::<f64>()
            / candidates.len() as f64;
        let after = load(preferred) + per_capacity(preferred, cost as f64);
        let outcome = if after > aff.settings.max_load * (mean + typical) {
            AffinityOutcome::OverriddenByLoad
        } else if fenced {
            AffinityOutcome::Fenced
        } else {
            AffinityOutcome::Chosen
        };
        Some((preferred, outcome))
    }

    /// The tier a first attempt starts in, for a uniform draw `u` in [0, 1): Envoy's
    /// priority load. Each region in order keeps `min(rest, health × overprovisioning)` of
    /// the traffic, `health` being the share of its capacity that is admitted and has
    /// headroom (weighted by health: a degraded or slow-starting shard counts for less; a
    /// saturated one not at all); the rest spills to the next. When every region is
    /// saturated, traffic stays home and queues there. With the default factor 1.4, a region keeps all its traffic until less than
    /// about 71 % of its capacity is healthy, then sheds the surplus proportionally — and
    /// takes it back as its shards return and ramp up (slow start), which makes failback
    /// gradual.
    fn spill_tier(&self, route: &ModelRoute, health: &HealthView, now: Instant, u: f64) -> usize {
        if route.tiers.len() < 2 {
            return 0;
        }
        // A short route is read whole each time (as cheap as a look in the cache, and no
        // lock); a long one is read once per health snapshot.
        let shards: usize = route.tiers.iter().map(Vec::len).sum();
        let shares = if shards <= select::SCAN_UP_TO {
            self.tier_shares(route, health, now)
        } else {
            let view = std::ptr::from_ref(health) as usize;
            let mut cached = route.spill.lock().unwrap_or_else(|p| p.into_inner());
            match cached.as_ref() {
                Some(c)
                    if c.view == view && now.saturating_duration_since(c.at) < SPILL_REFRESH =>
                {
                    c.shares.clone()
                }
                _ => {
                    let shares = self.tier_shares(route, health, now);
                    *cached = Some(SpillShares {
                        view,
                        at: now,
                        shares: shares.clone(),
                    });
                    shares
                }
            }
        };
        let mut acc = 0.0;
        for (t, share) in shares.iter().enumerate() {
            acc += share;
            if u < acc {
                return t;
            }
        }
        0
    }

    /// Each tier's share of first attempts (see [`Self::spill_tier`]).
    fn tier_shares(
        &self,
        route: &ModelRoute,
        health: &HealthView,
        now: Instant,
    ) -> SmallVec<[f64; 4]> {
        let mut rest = 1.0;
        let mut shares = SmallVec::new();
        for tier in &route.tiers {
            let total: f64 = tier
                .iter()
                .map(|i| self.shards[*i].effective_capacity)
                .sum();
            let healthy: f64 = tier
                .iter()
                .filter(|i| self.admitted(**i, health) && self.has_room(**i, health, now))
                .map(|i| {
                    let s = &self.shards[*i];
                    s.effective_capacity * health.weight_factor(s.key)
                })
                .sum();
            let share = if total > 0.0 {
                (healthy / total * self.overprovisioning).min(rest)
            } else {
                0.0
            };
            rest -= share;
            shares.push(share);
        }
        shares
    }

    /// Whether a shard's engine has room: fresh metrics below both saturation thresholds
    /// (queue depth and KV use; GIE's defaults 5 and 0.8). Unknown metrics count as room —
    /// nothing is held against a shard for a signal that is missing.
    /// `now`: the decision's time.
    pub fn has_headroom(&self, shard: &ShardEntry, health: &HealthView, now: Instant) -> bool {
        match self.fresh(shard.key, health, now) {
            Some(e) => {
                e.queue_depth
                    .is_none_or(|q| q < self.saturation_queue_depth)
                    && e.kv_usage.is_none_or(|kv| kv < self.saturation_kv_usage)
            }
            None => true,
        }
    }

    fn has_room(&self, i: usize, health: &HealthView, now: Instant) -> bool {
        self.has_headroom(&self.shards[i], health, now)
    }

    /// The other shards of `shard`'s tier for `route` when that whole tier is saturated
    /// (no admitted shard with headroom), so a 429 is not retried into it; empty otherwise.
    pub fn saturated_peers(&self, route: &ModelRoute, shard: ShardId) -> Vec<ShardId> {
        let health = self.fleet.health.load();
        let Some(tier) = route
            .tiers
            .iter()
            .find(|t| t.iter().any(|i| self.shards[*i].key == shard))
        else {
            return Vec::new();
        };
        let saturated = !tier
            .iter()
            .any(|i| self.admitted(*i, &health) && self.has_room(*i, &health, Instant::now()));
        if saturated {
            tier.iter()
                .map(|i| self.shards[*i].key)
                .filter(|k| *k != shard)
                .collect()
        } else {
            Vec::new()
        }
    }

    /// Every shard of `route` as a pick for a request of `cost` tokens would see it now:
    /// tier, score, and why one is passed over (`limits`: the priority admission limits
    /// apply for, as for a first attempt; `None` for none). The decisions log keeps it;
    /// routing itself never calls it. A route of more than [`explain::LISTED`] shards is
    /// shown by about that many, each tier by its share of them, evenly spaced from a
    /// random start — so recording a decision costs the same whatever the fleet's size.
    pub fn explain(
        &self,
        route: &ModelRoute,
        cost: u64,
        tried: &[ShardId],
        limits: Option<Priority>,
    ) -> explain::Candidates {
        use explain::Exclusion;
        let health = self.fleet.health.load();
        let now = Instant::now();
        let mut list = smallvec::SmallVec::new();
        let total: usize = route.tiers.iter().map(Vec::len).sum();
        let mut rng = rand::thread_rng();
        for (tier, shards) in route.tiers.iter().enumerate() {
            let shown = if total <= explain::LISTED {
                shards.len()
            } else {
                (shards.len() * explain::LISTED)
                    .div_ceil(total)
                    .min(shards.len())
            };
            let start = if shown < shards.len() {
                rng.gen_range(0..shards.len())
            } else {
                0
            };
            for k in 0..shown {
                let i = shards[(start + k * shards.len() / shown.max(1)) % shards.len()];
                let s = &self.shards[i];
                let excluded = if s.is_drained() {
                    Some(Exclusion::Drained)
                } else if tried.contains(&s.key) {
                    Some(Exclusion::Tried)
                } else if !health.takes_new_requests(s.key) {
                    Some(match health.get(s.key).state {
                        ShardState::Draining => Exclusion::Draining,
                        _ => Exclusion::Ejected,
                    })
                } else if limits.is_some() && !self.has_headroom(s, &health, now) {
                    Some(Exclusion::Saturated)
                } else if limits.is_some_and(|p| !s.limit_fits(cost, p, &health)) {
                    Some(Exclusion::Full)
                } else {
                    None
                };
                list.push(explain::Candidate {
                    shard: i as u32,
                    tier: tier.min(u8::MAX as usize) as u8,
                    score: self.score(i, &health, now) as f32,
                    excluded,
                });
            }
        }
        explain::Candidates {
            shards: Arc::clone(&self.shards),
            list,
        }
    }

    /// Whether any shard may take traffic now (`/readyz`).
    pub fn ready(&self) -> bool {
        let health = self.fleet.health.load();
        (0..self.shards.len()).any(|i| self.admitted(i, &health))
    }
}

/// The entry for policy shard `s`. `old`, the previous table's shard of the same id, lends
/// its key and live state when its URL is the same (its admission limit is rescaled to a
/// new capacity); an operator's drain is kept even across a URL change.
fn shard_entry(
    policy: &Policy,
    s: &Shard,
    old: Option<&Arc<ShardEntry>>,
    ids: &mut SlotMap<ShardId, ()>,
    monitor: &HealthMonitor,
) -> ShardEntry {
    let a = &policy.admission;
    let effective_capacity = s.capacity_tps * s.weight;
    let (key, load, limit, slots, reporter, window) = match old.filter(|o| o.url == s.url) {
        Some(o) => {
            o.limit.reconfigure(
                effective_capacity,
                a.min_limit,
                a.max_limit,
                a.ttft_tolerance,
            );
            (
                o.key,
                Arc::clone(&o.load),
                Arc::clone(&o.limit),
                Arc::clone(&o.slots),
                o.reporter.clone(),
                Arc::clone(&o.window),
            )
        }
        None => {
            let key = ids.insert(());
            let limit = ShardLimit::new(
                effective_capacity,
                a.initial_limit,
                a.min_limit,
                a.max_limit,
                a.ttft_tolerance,
            );
            let load = ShardLoad::default();
            // An operator's drain outlives a change of URL.
            load.set_drained(old.is_some_and(|o| o.is_drained()));
            (
                key,
                Arc::new(load),
                Arc::new(limit),
                Arc::default(),
                monitor.reporter(key),
                Arc::default(),
            )
        }
    };
    let authority = match s.url.port_or_known_default() {
        Some(p) => format!("{}:{p}", s.url.host_str().unwrap_or_default()),
        None => s.url.host_str().unwrap_or_default().to_string(),
    };
    let tls = (s.url.scheme() == "https")
        .then(|| policy.pools.iter().find(|p| p.id == s.pool))
        .flatten()
        .and_then(|p| p.tls.clone());
    let conn_key = match &tls {
        Some(t) => format!("https://{authority}#{}", t.id()),
        None => authority.clone(),
    };
    ShardEntry {
        key,
        id: s.id.clone(),
        region: s.region.clone(),
        pool: s.pool.clone(),
        authority,
        tls,
        max_requests: s.max_requests,
        conn_key,
        url: s.url.clone(),
        effective_capacity,
        capacity_tps: s.capacity_tps,
        tags: ShardTags::new(&s.id, &s.region),
        load,
        limit,
        slots,
        reporter,
        window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakwater_health::{ShardHealth, ShardState};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    /// The position of a picked shard.
    fn pos(r: &Router, picked: Option<&Arc<ShardEntry>>) -> Option<usize> {
        picked.map(|s| r.shards().iter().position(|o| o.key == s.key).unwrap())
    }

    /// The keys of the shards at `positions`.
    fn keys(r: &Router, positions: &[usize]) -> Vec<ShardId> {
        positions.iter().map(|i| r.shards()[*i].key).collect()
    }

    /// A health view of the router's shards, in policy order.
    fn view(r: &Router, entries: Vec<ShardHealth>) -> HealthView {
        HealthView::from_entries(r.shards().iter().map(|s| s.key).zip(entries))
    }

    fn policy() -> Policy {
        crate::policy::from_sources(&[(
            "t.toml".into(),
            r#"
[gateway]
home_region = "west"
[[regions]]
id = "east"
[[regions]]
id = "west"
[[regions]]
id = "south"
[[pools]]
id = "pe"
region = "east"
models = ["m"]
[[pools]]
id = "pw"
region = "west"
models = ["m", "only-west"]
[[pools]]
id = "ps"
region = "south"
models = ["m"]
[[shards]]
id = "e1"
pool = "pe"
url = "http://127.0.0.1:1"
capacity_tps = 100
[[shards]]
id = "w1"
pool = "pw"
url = "http://127.0.0.1:2"
capacity_tps = 100
[[shards]]
id = "w2"
pool = "pw"
url = "http://127.0.0.1:3"
capacity_tps = 200
[[shards]]
id = "s1"
pool = "ps"
url = "http://127.0.0.1:4"
capacity_tps = 100
"#
            .into(),
        )])
        .unwrap()
    }

    /// `west` shards in the home region and `east` in the other, all for model "m".
    fn fleet_policy(west: usize, east: usize) -> Policy {
        let mut t = String::from(
            "[gateway]\nhome_region = \"west\"\n[[regions]]\nid = \"west\"\n[[regions]]\nid = \"east\"\n\
             [[pools]]\nid = \"pw\"\nregion = \"west\"\nmodels = [\"m\"]\n\
             [[pools]]\nid = \"pe\"\nregion = \"east\"\nmodels = [\"m\"]\n",
        );
        for (pool, n, base) in [("pw", west, 0), ("pe", east, west)] {
            for i in base..base + n {
                t += &format!(
                    "[[shards]]\nid = \"s{i}\"\npool = \"{pool}\"\nurl = \"http://10.0.{}.{}:8000\"\ncapacity_tps = 100\n",
                    i / 250,
                    i % 250 + 1
                );
            }
        }
        crate::policy::from_sources(&[("t.toml".into(), t)]).unwrap()
    }

    #[test]
    fn a_large_route_is_explained_by_a_bounded_spread_sample_and_a_small_one_whole() {
        let r = Router::new(&fleet_policy(3000, 300));
        let route = r.route("m").unwrap();
        let c = r.explain(route, 10, &[], None);
        assert!(
            (explain::LISTED..=explain::LISTED + 2).contains(&c.list.len()),
            "{}",
            c.list.len()
        );
        let home = c.list.iter().filter(|x| x.tier == 0).count();
        assert!((7..=8).contains(&home), "{home} of {}", c.list.len());
        let mut ids: Vec<u32> = c.list.iter().map(|x| x.shard).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), c.list.len(), "a shard shown twice");
        let small = Router::new(&fleet_policy(5, 3));
        let c = small.explain(small.route("m").unwrap(), 10, &[], None);
        assert_eq!(c.list.len(), 8);
    }

    #[test]
    fn a_long_routes_spill_follows_each_new_health_snapshot() {
        // 40 shards: the regions' shares are kept per snapshot, not read per pick.
        let r = Router::new(&fleet_policy(20, 20));
        let route = r.route("m").unwrap();
        let mut rng = SmallRng::seed_from_u64(31);
        // Few picks, well within the cache's 100 ms: a stale share would still show.
        let home_share = |r: &Router, rng: &mut SmallRng| {
            let n = 400;
            let home = (0..n)
                .filter(|_| pos(r, r.pick(route, &[], rng)).is_some_and(|i| i < 20))
                .count();
            home as f64 / n as f64
        };
        assert_eq!(home_share(&r, &mut rng), 1.0);
        // Half of home ejected: 1/2 × 1.4 = 70 % stays.
        let mut entries = vec![ShardHealth::healthy(); 40];
        for e in entries.iter_mut().take(10) {
            e.state = ShardState::Ejected;
        }
        r.publish_health(view(&r, entries.clone()));
        assert!((home_share(&r, &mut rng) - 0.7).abs() < 0.1);
        // Back: the next snapshot is read at once, not after the cache's 100 ms.
        r.publish_health(view(&r, vec![ShardHealth::healthy(); 40]));
        assert_eq!(home_share(&r, &mut rng), 1.0);
    }

    #[test]
    fn when_every_shard_is_ejected_each_takes_requests_up_to_its_whole_limit() {
        let r = Router::new(&fleet_policy(2, 0));
        let route = r.route("m").unwrap();
        let ejected = ShardHealth {
            state: ShardState::Ejected,
            weight_factor: 0.0,
            ..ShardHealth::healthy()
        };
        r.publish_health(view(&r, vec![ejected.clone(), ejected]));
        let _busy: Vec<_> = r.shards().iter().map(|s| s.load.charge(10)).collect();
        let health = r.fleet.health.load();
        // Panic routing picks them; admission must let them take more than one each.
        for s in r.shards() {
            assert!(s.limit_fits(10, Priority::Standard, &health), "{}", s.id);
        }
        let fits = |s: &ShardEntry, h: &HealthView, _| s.limit_fits(10, Priority::Standard, h);
        let mut rng = SmallRng::seed_from_u64(3);
        assert!(r.pick_fitting(route, &[], fits, &mut rng).is_some());
        // One healthy shard in slow start keeps its low weight.
        let starting = ShardHealth {
            weight_factor: 0.001,
            ..ShardHealth::healthy()
        };
        r.publish_health(view(&r, vec![starting.clone(), starting]));
        let health = r.fleet.health.load();
        assert!(!r.shards()[0].limit_fits(10, Priority::Standard, &health));
    }

    #[test]
    fn a_pick_in_a_large_tier_spreads_over_it_and_skips_what_is_drained() {
        let r = Router::new(&fleet_policy(2000, 0));
        let route = r.route("m").unwrap();
        for s in r.shards().iter().skip(10) {
            s.load.set_drained(true);
        }
        let mut rng = SmallRng::seed_from_u64(21);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let i = pos(&r, r.pick(route, &[], &mut rng)).unwrap();
            assert!(i < 10, "a drained shard was picked");
            seen.insert(i);
        }
        assert_eq!(seen.len(), 10, "{seen:?}");
    }

    #[test]
    fn a_region_keeps_traffic_while_its_healthy_capacity_covers_it_then_spills_the_surplus() {
        let r = Router::new(&policy());
        let route = r.route("m").unwrap();
        let mut rng = SmallRng::seed_from_u64(11);
        let home_share = |r: &Router, rng: &mut SmallRng| {
            let n = 10_000;
            let home = (0..n)
                .filter(|_| matches!(pos(r, r.pick(route, &keys(r, &[]), rng)), Some(1 | 2)))
                .count();
            home as f64 / n as f64
        };
        assert_eq!(home_share(&r, &mut rng), 1.0);
        // w1 (100 of the region's 300 tok/s) out: 2/3 healthy × 1.4 = 93 % stays home.
        let mut entries = vec![ShardHealth::healthy(); 4];
        entries[1].state = ShardState::Ejected;
        r.publish_health(view(&r, entries.clone()));
        assert!((home_share(&r, &mut rng) - 0.933).abs() < 0.02);
        // w2 (200 of 300) out instead: 1/3 × 1.4 = 47 % stays; the rest spills to east
        // first (it keeps all it is offered: east is fully healthy).
        entries[1].state = ShardState::Healthy;
        entries[2].state = ShardState::Ejected;
        r.publish_health(view(&r, entries.clone()));
        assert!((home_share(&r, &mut rng) - 0.467).abs() < 0.02);
        // Retries still go home first while it has an untried shard.
        assert_eq!(pos(&r, r.pick(route, &keys(&r, &[0]), &mut rng)), Some(1));
    }

    #[test]
    fn a_saturated_region_spills_and_a_429_is_not_retried_into_it() {
        let r = Router::new(&policy());
        let route = r.route("m").unwrap();
        let mut rng = SmallRng::seed_from_u64(12);
        let now = std::time::Instant::now();
        let full = breakwater_health::EngineLoad {
            queue_depth: Some(9.0),
            taken: Some(now),
            ..Default::default()
        };
        let mut entries = vec![ShardHealth::healthy(); 4];
        entries[1].engine = Some(full);
        r.publish_health(view(&r, entries.clone()));
        // One home shard saturated: w2 (2/3 of home) × 1.4 still covers home.
        assert!(r.saturated_peers(route, keys(&r, &[1])[0]).is_empty());
        entries[2].engine = Some(breakwater_health::EngineLoad {
            kv_usage: Some(0.95),
            taken: Some(now),
            ..Default::default()
        });
        r.publish_health(view(&r, entries.clone()));
        assert_eq!(r.saturated_peers(route, keys(&r, &[1])[0]), keys(&r, &[2]));
        for _ in 0..50 {
            assert!(
                matches!(
                    pos(&r, r.pick(route, &keys(&r, &[]), &mut rng)),
                    Some(0 | 3)
                ),
                "a saturated home keeps nothing"
            );
        }
        // Everything saturated: stay home.
        entries[0].engine = Some(full);
        entries[3].engine = Some(full);
        r.publish_health(view(&r, entries));
        assert!(matches!(
            pos(&r, r.pick(route, &keys(&r, &[]), &mut rng)),
            Some(1 | 2)
        ));
    }

    #[test]
    fn engine_reported_load_and_kv_pressure_raise_the_score_and_stale_readings_do_not() {
        let r = Router::new(&policy());
        let mut rng = SmallRng::seed_from_u64(9);
        let route = r.route("m").unwrap();
        let now = std::time::Instant::now();
        // Below the saturation thresholds (queue 5, KV 0.8), so the region keeps its traffic.
        let busy = breakwater_health::EngineLoad {
            queue_depth: Some(4.0),
            running: Some(10.0),
            taken: Some(now),
            ..Default::default()
        };
        // w2 (200 tok/s) is idle in our ledger but its engine reports 14 requests.
        let mut entries = vec![ShardHealth::healthy(); 4];
        entries[2].engine = Some(busy);
        r.publish_health(view(&r, entries.clone()));
        let h = r.health();
        assert!(r.score(2, &h, Instant::now()) > r.score(1, &h, Instant::now()));
        for _ in 0..20 {
            assert_eq!(pos(&r, r.pick(route, &keys(&r, &[]), &mut rng)), Some(1));
        }
        // KV near full doubles the score at 100 %.
        entries[2].engine = Some(breakwater_health::EngineLoad {
            kv_usage: Some(1.0),
            queue_depth: Some(1.0),
            taken: Some(now),
            ..Default::default()
        });
        r.publish_health(view(&r, entries.clone()));
        let with_kv = r.score(2, &r.health(), Instant::now());
        entries[2].engine = Some(breakwater_health::EngineLoad {
            kv_usage: Some(0.5),
            queue_depth: Some(1.0),
            taken: Some(now),
            ..Default::default()
        });
        r.publish_health(view(&r, entries.clone()));
        assert!((with_kv / r.score(2, &r.health(), Instant::now()) - 2.0).abs() < 1e-9);
        // A reading from long ago counts for nothing.
        let old = now
            .checked_sub(std::time::Duration::from_secs(60))
            .unwrap_or(now);
        entries[2].engine = Some(breakwater_health::EngineLoad {
            taken: Some(old),
            ..busy
        });
        r.publish_health(view(&r, entries));
        assert_eq!(r.score(2, &r.health(), Instant::now()), 0.0);
    }

    #[test]
    fn tiers_put_home_first_then_policy_order() {
        let r = Router::new(&policy());
        let ids = |t: &Vec<usize>| {
            t.iter()
                .map(|i| r.shards()[*i].id.clone())
                .collect::<Vec<_>>()
        };
        let route = r.route("m").unwrap();
        let tiers: Vec<_> = route.tiers.iter().map(ids).collect();
        assert_eq!(tiers, vec![vec!["w1", "w2"], vec!["e1"], vec!["s1"]]);
        assert!(r.route("nope").is_none());
        assert_eq!(r.model_names(), ["m", "only-west"]);
    }

    #[test]
    fn picks_the_less_loaded_per_capacity_and_fails_over_when_home_is_tried_or_out() {
        let r = Router::new(&policy());
        let mut rng = SmallRng::seed_from_u64(7);
        let route = r.route("m").unwrap();
        // w1 (100 tok/s) holds 100 tokens = 1 s of work; w2 (200 tok/s) holds 150 = 0.75 s.
        let _a = r.shards()[1].load.charge(100);
        let _b = r.shards()[2].load.charge(150);
        assert_eq!(pos(&r, r.pick(route, &keys(&r, &[]), &mut rng)), Some(2));
        assert_eq!(pos(&r, r.pick(route, &keys(&r, &[2]), &mut rng)), Some(1));
        assert_eq!(
            pos(&r, r.pick(route, &keys(&r, &[1, 2]), &mut rng)),
            Some(0)
        );
        assert_eq!(
            pos(&r, r.pick(route, &keys(&r, &[0, 1, 2]), &mut rng)),
            Some(3)
        );
        assert_eq!(
            pos(&r, r.pick(route, &keys(&r, &[0, 1, 2, 3]), &mut rng)),
            None
        );
        // Health that takes the home shards out moves traffic to the next region.
        let mut entries = vec![ShardHealth::healthy(); 4];
        entries[1].state = ShardState::Ejected;
        entries[2].state = ShardState::Draining;
        r.publish_health(view(&r, entries.clone()));
        assert_eq!(pos(&r, r.pick(route, &keys(&r, &[]), &mut rng)), Some(0));
        assert!(r.ready());
        // Nothing admitted anywhere: route as if all were healthy, home first.
        for e in &mut entries {
            e.state = ShardState::Ejected;
        }
        r.publish_health(view(&r, entries));
        assert_eq!(pos(&r, r.pick(route, &keys(&r, &[2]), &mut rng)), Some(1));
        assert!(!r.ready());
    }
    #[test]
    fn a_slot_being_tried_is_not_offered_to_a_critical_request() {
        let r = Router::new(&policy());
        let s = &r.shards()[1];
        let health = view(&r, vec![ShardHealth::healthy(); 4]);
        let now = std::time::Instant::now();
        // Seen full at 4, then running all 4 with nobody waiting: a fifth is tried.
        s.slots.observe(now, 4.0, 1.0);
        s.slots
            .observe(now + crate::admission::slots::PROBE_EVERY * 2, 4.0, 0.0);
        assert_eq!(s.max_in_flight(), Some(5));
        let _charges: Vec<_> = (0..4).map(|_| s.load.charge(1)).collect();
        assert!(s.limit_fits(1, Priority::Standard, &health));
        assert!(s.limit_fits(1, Priority::Sheddable, &health));
        assert!(
            !s.limit_fits(1, Priority::Critical, &health),
            "a critical request would be the one to find the engine full"
        );
    }
}
