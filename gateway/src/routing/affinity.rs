//! Cache-aware routing: send a conversation back to the shard that holds its prefix in KV
//! cache, without ever costing availability or balance.
//!
//! - **Keys** ([`AffinityKey`]): an explicit session key (the body's `prompt_cache_key`
//!   or `user`, or a header the policy names) for `affinity = "session"`; the prompt's
//!   prefix for `"prefix"`, hashed in blocks of `affinity_block_bytes` of the prompt's JSON,
//!   each hash chained to those before it, so a longer conversation's first blocks are
//!   exactly the shorter one's ([`block_hashes`]).
//! - **Where a key goes**: for a prefix, the shard that most recently served the longest of
//!   its prefixes, from an approximate per-model index of block hashes, bounded and aged
//!   out ([`PrefixIndex`]); else (and for sessions) rendezvous hashing over the region's
//!   shards weighted by capacity ([`rendezvous_order`]), so removing a shard moves only
//!   the keys it had.
//! - **Fencing**: only shards routing would pick anyway are candidates — admitted by health
//!   and operators, with room and headroom — read from the same snapshot routing reads, so
//!   an ejected, draining, saturated or GPU-failing shard is never chosen by affinity; its
//!   keys take the next shard in their hash order. A shard in slow start takes back each
//!   key once its health weight passes the key's own fraction ([`key_fraction`]), so its
//!   keys return in proportion to its weight.
//! - **Bounded load**: the preferred shard is used only while its load score stays within
//!   `affinity_max_load` times the region's mean (plus one request): consistent hashing
//!   with bounded loads (Mirrokni, Thorup, Zadimoghaddam), so a hot key cannot pile onto one
//!   shard.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use breakwater_health::ShardId;
use smallvec::SmallVec;

/// How a pool's requests find their shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityMode {
    /// Load alone.
    None,
    /// By an explicit session key.
    Session,
    /// By the prompt's prefix (a session key, when sent, still wins).
    Prefix,
}

impl AffinityMode {
    /// Parses a policy's `affinity`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "session" => Some(Self::Session),
            "prefix" => Some(Self::Prefix),
            _ => None,
        }
    }
}

/// A pool's affinity settings (`[[pools]] affinity*`).
#[derive(Debug, Clone, PartialEq)]
pub struct AffinitySettings {
    /// The mode.
    pub mode: AffinityMode,
    /// Bytes of prompt JSON per hashed block.
    pub block_bytes: usize,
    /// The prefix hashed is at most this long (the system prompt and first messages).
    pub max_prefix_bytes: usize,
    /// A request header that carries a session key, besides `prompt_cache_key` and `user`.
    pub header: Option<http::HeaderName>,
    /// Bounded load: the preferred shard is passed over when its load score exceeds the
    /// region's mean by more than this factor.
    pub max_load: f64,
    /// An index entry older than this is forgotten (the engine has likely evicted it).
    pub ttl: Duration,
}

impl Default for AffinitySettings {
    fn default() -> Self {
        Self {
            mode: AffinityMode::None,
            block_bytes: 256,
            max_prefix_bytes: 32 << 10,
            header: None,
            max_load: 1.25,
            ttl: Duration::from_secs(600),
        }
    }
}

/// What a request is routed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinityKey {
    /// A session key's hash.
    Session(u64),
    /// The chained hashes of the prompt's leading blocks.
    Prefix(SmallVec<[u64; 16]>),
}

impl AffinityKey {
    /// The hash rendezvous orders shards by: the session's, or the first block's (a shared
    /// system prompt lands together until load spreads it).
    pub fn rendezvous_hash(&self) -> Option<u64> {
        match self {
            AffinityKey::Session(h) => Some(*h),
            AffinityKey::Prefix(blocks) => blocks.first().copied(),
        }
    }
}

/// What affinity did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityOutcome {
    /// It chose the shard.
    Chosen,
    /// Its shard was over the load bound; load chose instead.
    OverriddenByLoad,
    /// Its shard could not take the request (ejected, draining, saturated, full); the next
    /// shard in its hash order did.
    Fenced,
}

impl AffinityOutcome {
    /// The label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AffinityOutcome::Chosen => "chosen",
            AffinityOutcome::OverriddenByLoad => "overridden_by_load",
            AffinityOutcome::Fenced => "fenced",
        }
    }
}

/// The hasher for keys and blocks: fixed seeds, so every gateway replica agrees.
fn hasher() -> foldhash::fast::FixedState {
    foldhash::fast::FixedState::with_seed(0x6272_6561_6b77_6174)
}

/// A session key's hash.
pub fn session_hash(key: &str) -> u64 {
    hasher().hash_one(key)
}

/// The chained hashes of `text`'s whole blocks of `block` bytes, up to `max_bytes`.
pub fn block_hashes(text: &[u8], block: usize, max_bytes: usize) -> SmallVec<[u64; 16]> {
    let h = hasher();
    let mut prev = 0u64;
    text[..text.len().min(max_bytes)]
        .chunks_exact(block.max(1))
        .map(|b| {
            prev = h.hash_one((prev, b));
            prev
        })
        .collect()
}

/// The weight of shard `shard` for key `key` in weighted rendezvous hashing: the highest
/// wins; a shard of twice the capacity wins twice as many keys.
fn rendezvous_weight(key: u64, shard: u64, capacity: f64) -> f64 {
    let h = splitmix64(key ^ splitmix64(shard));
    // A uniform draw in (0, 1], then -capacity / ln(u) (Schindelhauer and Schomaker).
    let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    -capacity / u.ln().min(-f64::MIN_POSITIVE)
}

/// SplitMix64's finalizer: every input bit moves every output bit (a fast hash's output on
/// small structured inputs, such as consecutive shard ids, is not uniform enough here).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A fraction in [0, 1) fixed for `key` on `shard`: a shard at health weight `w` (slow
/// start) takes back the keys whose fraction is below `w`.
pub fn key_fraction(key: u64, shard: u64) -> f64 {
    // Another draw than the rendezvous weight's, so the order and the ramp are independent.
    let h = splitmix64(key.rotate_left(17) ^ splitmix64(shard ^ 0x5eed));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// `shards` (stable ids with their capacities) in `key`'s rendezvous order.
pub fn rendezvous_order(key: u64, shards: &[(u64, f64)]) -> SmallVec<[usize; 8]> {
    let mut order: SmallVec<[(usize, f64); 8]> = shards
        .iter()
        .enumerate()
        .map(|(i, (id, cap))| (i, rendezvous_weight(key, *id, *cap)))
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    order.into_iter().map(|(i, _)| i).collect()
}

/// Which shard recently served which prefix block, approximately: two generations of at
/// most `capacity / 2` entries each; when the newer fills it becomes the older and the
/// older is dropped, so memory is bounded and what is not reused ages out (with `ttl` on
/// top). An entry says only "this shard prefilled this prefix lately" — the engine may
/// have evicted it since, as SGLang's approximate tree accepts.
pub struct PrefixIndex {
    capacity: usize,
    #[allow(clippy::type_complexity)]
    generations: Mutex<[HashMap<u64, (ShardId, Instant), foldhash::fast::RandomState>; 2]>,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("blocks", &self.len())
            .finish()
    }
}

impl PrefixIndex {
    /// An index of at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            generations: Mutex::new(Default::default()),
        }
    }

    /// The shard that served the longest of `blocks`' prefixes within `ttl`, if any.
    pub fn deepest(&self, blocks: &[u64], now: Instant, ttl: Duration) -> Option<ShardId> {
        let g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        blocks.iter().rev().find_map(|b| {
            let (shard, at) = g[0].get(b).or_else(|| g[1].get(b))?;
            (now.duration_since(*at) <= ttl).then_some(*shard)
        })
    }

    /// Notes that `shard` is prefilling `blocks`.
    pub fn record(&self, blocks: &[u64], shard: ShardId, now: Instant) {
        let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        for b in blocks {
            if g[0].len() >= self.capacity / 2 {
                g[1] = std::mem::take(&mut g[0]);
            }
            g[0].insert(*b, (shard, now));
        }
    }

    /// Blocks held (for tests and the admin API).
    pub fn len(&self) -> usize {
        let g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        g[0].len() + g[1].len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A model's affinity: its settings and its prefix index (carried across reloads that
/// keep the settings).
#[derive(Debug)]
pub struct RouteAffinity {
    /// The settings.
    pub settings: AffinitySettings,
    /// Where prefixes went.
    pub index: PrefixIndex,
}

/// Blocks a model's prefix index holds at most.
pub const INDEX_BLOCKS: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_conversation_shares_its_first_blocks_with_the_shorter_one() {
        let short = br#"[{"role":"system","content":"You are a careful assistant who answers about harbours, tides and the sea."},{"role":"user","content":"What is a breakwater?"}]"#;
        let long = br#"[{"role":"system","content":"You are a careful assistant who answers about harbours, tides and the sea."},{"role":"user","content":"What is a breakwater?"},{"role":"assistant","content":"A barrier."},{"role":"user","content":"Why?"}]"#;
        let a = block_hashes(short, 32, 1 << 20);
        let b = block_hashes(long, 32, 1 << 20);
        assert_eq!(a.len(), short.len() / 32);
        assert!(b.len() > a.len());
        // Every whole block of the shorter one is in the longer one, in the same place;
        // the last (partial) block is left out, as it differs.
        assert_eq!(&b[..a.len()], &a[..]);
        // A different system prompt shares nothing, even later blocks of equal text.
        let other = [
            &b"[{\"role\":\"system\",\"content\":\"Other.\"}"[..],
            &long[38..],
        ]
        .concat();
        let c = block_hashes(&other, 32, 1 << 20);
        assert!(c.iter().all(|h| !b.contains(h)));
        // Bounded: at most max_bytes are hashed.
        assert_eq!(block_hashes(long, 32, 64).len(), 2);
    }

    #[test]
    fn removing_a_shard_moves_only_its_keys() {
        let shards: Vec<(u64, f64)> = (0..5).map(|i| (100 + i, 1000.0)).collect();
        let fewer: Vec<(u64, f64)> = shards.iter().copied().filter(|s| s.0 != 102).collect();
        let (mut moved, mut on_removed) = (0, 0);
        let mut counts = [0usize; 5];
        for key in 0..5000u64 {
            let k = session_hash(&format!("session-{key}"));
            let before = shards[rendezvous_order(k, &shards)[0]].0;
            let after = fewer[rendezvous_order(k, &fewer)[0]].0;
            counts[(before - 100) as usize] += 1;
            if before == 102 {
                on_removed += 1;
            }
            if before != after {
                moved += 1;
                assert_eq!(before, 102, "a key not on the removed shard moved");
            }
        }
        assert_eq!(moved, on_removed);
        // Spread evenly: each of 5 equal shards gets about a fifth.
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        // Weighted: a shard of 3x the capacity gets about 3x the keys.
        let weighted = [(1, 1000.0), (2, 3000.0)];
        let big = (0..4000u64)
            .filter(|k| rendezvous_order(session_hash(&k.to_string()), &weighted)[0] == 1)
            .count();
        assert!((2700..3300).contains(&big), "{big}");
    }

    #[test]
    fn the_index_finds_the_deepest_prefix_forgets_old_entries_and_stays_bounded() {
        let mut ids = slotmap::SlotMap::<ShardId, ()>::with_key();
        let (a, b) = (ids.insert(()), ids.insert(()));
        let ix = PrefixIndex::new(100);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        ix.record(&[1, 2], a, now);
        ix.record(&[1, 2, 3, 4], b, now);
        assert_eq!(ix.deepest(&[1, 2, 3, 4, 5], now, ttl), Some(b));
        assert_eq!(
            ix.deepest(&[1, 2, 9], now, ttl),
            Some(b),
            "block 2 was b's last"
        );
        assert_eq!(ix.deepest(&[7], now, ttl), None);
        assert_eq!(
            ix.deepest(&[1, 2, 3], now + Duration::from_secs(61), ttl),
            None
        );
        for i in 0..10_000 {
            ix.record(&[1000 + i], a, now);
        }
        assert!(ix.len() <= 100, "{}", ix.len());
        assert_eq!(ix.deepest(&[1, 2, 3, 4], now, ttl), None, "aged out");
    }
}
