//! Why a request went where it did: every shard of its route as the pick saw it — its
//! tier, its load score, and, for those passed over, the reason.

use std::sync::Arc;

use serde::Serialize;

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

/// One shard as a pick saw it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The shard.
    pub shard: Arc<ShardEntry>,
    /// Its position in the route's region order (0: home).
    pub tier: u8,
    /// Its load score then (lower is better): seconds of work per unit of capacity.
    pub score: f32,
    /// Why it could not be picked; `None`: it could.
    pub excluded: Option<Exclusion>,
}

impl Serialize for Candidate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Candidate", 5)?;
        st.serialize_field("shard", &self.shard.id)?;
        st.serialize_field("region", &self.shard.region)?;
        st.serialize_field("tier", &self.tier)?;
        st.serialize_field("score", &((f64::from(self.score) * 1e4).round() / 1e4))?;
        st.serialize_field("excluded", &self.excluded)?;
        st.end()
    }
}
