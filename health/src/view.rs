//! The published side of the health model: shard states and the snapshot routing reads.

use serde::Serialize;

/// What a shard may do with new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    /// Takes its full share.
    #[default]
    Healthy,
    /// Takes a reduced share.
    Degraded,
    /// Takes nothing until its ejection time has passed and a check passes.
    Ejected,
    /// Takes no new requests; in-flight ones finish.
    Draining,
}

impl ShardState {
    /// Whether routing may send a new request to a shard in this state.
    pub fn takes_new_requests(self) -> bool {
        matches!(self, ShardState::Healthy | ShardState::Degraded)
    }

    /// The state's name as it appears in the admin API, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Healthy => "healthy",
            ShardState::Degraded => "degraded",
            ShardState::Ejected => "ejected",
            ShardState::Draining => "draining",
        }
    }
}

/// One shard's state and why it is in it.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct ShardHealth {
    /// The state.
    pub state: ShardState,
    /// Why, in a few words (empty when healthy).
    pub reason: String,
    /// Share of traffic this shard takes relative to a healthy one, 0..=1.
    pub weight_factor: f64,
    /// Times the shard has been ejected (decays after a long healthy stretch).
    pub ejection_count: u32,
    /// The shard's most recent transition.
    pub last_transition: Option<crate::Transition>,
    /// The last reading of the shard's GPUs, when it has a gpu-probe.
    pub gpu: Option<GpuSummary>,
    /// The engine's own load signals from its last scrape.
    pub engine: Option<crate::EngineLoad>,
}

/// What the shard's gpu-probe said last, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct GpuSummary {
    /// The worst verdict over the shard's devices; `None` when the probe could not be
    /// read or its reading was stale ("unknown" — which never takes a shard out).
    pub verdict: Option<gpu_probe::Verdict>,
    /// Why the verdict is not healthy, or why it is unknown.
    pub reasons: Vec<String>,
    /// Free memory over the shard's devices, bytes.
    pub memory_free_bytes: u64,
    /// Total memory over the shard's devices, bytes.
    pub memory_total_bytes: u64,
    /// Highest utilisation among the devices, percent.
    pub utilization_gpu_pct: Option<u32>,
    /// Highest temperature among the devices, °C.
    pub temperature_c: Option<u32>,
    /// Age of the reading when it was taken by the gateway, milliseconds.
    pub age_ms: u64,
}

impl ShardHealth {
    /// A healthy shard at full weight.
    pub fn healthy() -> Self {
        Self {
            state: ShardState::Healthy,
            reason: String::new(),
            weight_factor: 1.0,
            ejection_count: 0,
            last_transition: None,
            gpu: None,
            engine: None,
        }
    }
}

slotmap::new_key_type! {
    /// A shard's identity for as long as it is in the policy with the same URL: the key
    /// every per-shard record (health, load, probes, admission limits) is filed under. A
    /// shard removed, or whose URL changes, gets a new id; an id is never mistaken for a
    /// later one (slot map keys carry a version).
    pub struct ShardId;
}

/// A snapshot of every shard's health, keyed by [`ShardId`]. Built whole and swapped
/// whole; readers never see half an update.
#[derive(Debug, Clone, Default)]
pub struct HealthView {
    shards: slotmap::SecondaryMap<ShardId, ShardHealth>,
}

impl HealthView {
    /// A view from explicit entries.
    pub fn from_entries(shards: impl IntoIterator<Item = (ShardId, ShardHealth)>) -> Self {
        Self {
            shards: shards.into_iter().collect(),
        }
    }

    /// The health of shard `id`; a shard the view does not know is treated as healthy,
    /// so a view one generation behind a policy reload never takes a new shard out.
    pub fn get(&self, id: ShardId) -> ShardHealth {
        self.shards
            .get(id)
            .cloned()
            .unwrap_or_else(ShardHealth::healthy)
    }

    /// The share of traffic shard `id` takes relative to a healthy one (1.0 when the
    /// view does not know it). Read on every routing decision: no copy.
    pub fn weight_factor(&self, id: ShardId) -> f64 {
        self.shards.get(id).map_or(1.0, |h| h.weight_factor)
    }

    /// Shard `id`'s last engine reading, if any.
    pub fn engine(&self, id: ShardId) -> Option<&crate::EngineLoad> {
        self.shards.get(id).and_then(|h| h.engine.as_ref())
    }

    /// Whether shard `id` may take new requests.
    pub fn takes_new_requests(&self, id: ShardId) -> bool {
        self.shards
            .get(id)
            .is_none_or(|h| h.state.takes_new_requests())
    }

    /// The shards the view knows.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether the view knows no shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_healthy_and_degraded_take_new_requests() {
        assert!(ShardState::Healthy.takes_new_requests());
        assert!(ShardState::Degraded.takes_new_requests());
        assert!(!ShardState::Ejected.takes_new_requests());
        assert!(!ShardState::Draining.takes_new_requests());
    }

    #[test]
    fn unknown_shards_read_as_healthy() {
        let mut ids = slotmap::SlotMap::<ShardId, ()>::with_key();
        let (known, other) = (ids.insert(()), ids.insert(()));
        let view = HealthView::from_entries([(
            known,
            ShardHealth {
                state: ShardState::Draining,
                reason: "gpu failing".into(),
                weight_factor: 0.0,
                ..ShardHealth::healthy()
            },
        )]);
        assert!(!view.takes_new_requests(known));
        assert!(view.takes_new_requests(other));
        assert_eq!(view.get(other).state, ShardState::Healthy);
        // A removed shard's slot, reused, is another shard.
        ids.remove(known);
        let reused = ids.insert(());
        assert!(view.takes_new_requests(reused));
    }
}
