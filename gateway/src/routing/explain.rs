//! Why a request went where it did: every shard of its route as the pick saw it (about
//! [`LISTED`] of them in a longer route) — its tier, its load score, and, for those passed
//! over, the reason.

use std::sync::Arc;

use serde::Serialize;
use smallvec::SmallVec;

use super::ShardEntry;

/// Why routing passed a shard over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclusion {
    /// An operator drained it.
    Drained,
    /// Health ejected it (failing checks, outliers, a failing GPU).
    Ejected,
    /// Health is draining it.
    Draining,
    /// Its admission limit (scaled by its health weight) has no room for the request.
    Full,
    /// Its engine reports saturation (queue depth or KV-cache use over the thresholds).
    Saturated,
    /// This request already tried it (or a 429 showed its whole pool saturated).
    Tried,
}

/// One shard as a pick saw it: plain numbers, so recording one costs no reference count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The shard: its position in the routing table's shards (see [`Candidates`]).
    pub shard: u32,
    /// Its position in the route's region order (0: home).
    pub tier: u8,
    /// Its load score then (lower is better): seconds of work per unit of capacity.
    pub score: f32,
    /// Why it could not be picked; `None`: it could.
    pub excluded: Option<Exclusion>,
}

/// Candidates kept inline: routes of up to this many shards record without allocating.
pub const INLINE: usize = 8;

/// Routes of up to this many shards are shown whole; longer ones by about this many (as
/// many as are kept inline: recording a decision never allocates, and costs the same for a
/// route of 8 shards and one of 4,096).
pub const LISTED: usize = INLINE;

/// The candidates of one pick, with the table's shards they point into (one shared
/// reference for all of them).
#[derive(Debug, Clone)]
pub struct Candidates {
    /// The routing table's shards, indexed by [`Candidate::shard`].
    pub shards: Arc<[Arc<ShardEntry>]>,
    /// Every shard of the route (about [`LISTED`] of a longer one), in tier order.
    pub list: SmallVec<[Candidate; INLINE]>,
}

impl Candidates {
    /// The shard a candidate names.
    pub fn shard(&self, c: &Candidate) -> Option<&ShardEntry> {
        self.shards.get(c.shard as usize).map(|s| &**s)
    }
}

impl Serialize for Candidates {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        struct One<'a>(&'a ShardEntry, &'a Candidate);
        impl Serialize for One<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let One(shard, c) = self;
                let mut st = s.serialize_struct("Candidate", 5)?;
                st.serialize_field("shard", &shard.id)?;
                st.serialize_field("region", &shard.region)?;
                st.serialize_field("tier", &c.tier)?;
                st.serialize_field("score", &((f64::from(c.score) * 1e4).round() / 1e4))?;
                st.serialize_field("excluded", &c.excluded)?;
                st.end()
            }
        }
        let mut seq = s.serialize_seq(Some(self.list.len()))?;
        for c in &self.list {
            if let Some(shard) = self.shard(c) {
                seq.serialize_element(&One(shard, c))?;
            }
        }
        seq.end()
    }
}
