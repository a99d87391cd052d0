//! The decisions log: the last requests and how each was routed — the candidates a pick
//! saw (scores, exclusions), the attempts and their outcomes, queue wait, the answer.
//! Bounded: a ring of [`CAPACITY`] entries. Recording runs on every request, so it
//! allocates nothing of its own (candidates and attempts are kept inline, the ring's
//! entries in place) and takes one short lock.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::proxy::trace::TraceId;
use smallvec::SmallVec;

use crate::routing::explain::Candidates;
use crate::routing::ShardEntry;

/// Requests kept.
pub const CAPACITY: usize = 256;

/// One attempt of a request.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The shard tried.
    pub shard: Arc<ShardEntry>,
    /// How it ended (`breakwater_upstream_attempts_total`'s outcome label); `None`
    /// while it runs.
    pub outcome: Option<Cow<'static, str>>,
    /// How long it took.
    pub took: Duration,
    /// When it started, from the request's start.
    pub started: Duration,
    /// Its span id: the one its `traceparent` named to the shard.
    pub span_id: u64,
    /// For a retry, the candidates its pick saw (the first attempt's are the request's).
    pub candidates: Option<Box<Candidates>>,
}

impl Serialize for AttemptRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Attempt", 5)?;
        st.serialize_field("shard", &self.shard.id)?;
        st.serialize_field("region", &self.shard.region)?;
        st.serialize_field("outcome", &self.outcome)?;
        st.serialize_field("ms", &millis(self.took))?;
        if let Some(c) = &self.candidates {
            st.serialize_field("candidates", c)?;
        }
        st.end()
    }
}

/// Attempts kept inline: a request with a retry records without allocating.
pub type Attempts = SmallVec<[AttemptRecord; 2]>;

/// What a request gathers about its routing while it runs.
#[derive(Debug, Default)]
pub struct Draft {
    /// The candidates of the first pick.
    pub candidates: Option<Candidates>,
    /// Candidates seen for the next attempt (a retry), taken by it.
    pub next_candidates: Option<Candidates>,
    /// The attempts so far.
    pub attempts: Attempts,
}

impl Draft {
    /// An attempt on `shard` starts, `started` after the request did, as span `span_id`.
    pub fn attempt_started(&mut self, shard: &Arc<ShardEntry>, started: Duration, span_id: u64) {
        let candidates = self.next_candidates.take().map(Box::new);
        self.attempts.push(AttemptRecord {
            shard: Arc::clone(shard),
            outcome: None,
            took: Duration::ZERO,
            started,
            span_id,
            candidates,
        });
    }

    /// The span id of the attempt running (0 before any).
    pub fn current_span(&self) -> u64 {
        self.attempts.last().map_or(0, |a| a.span_id)
    }

    /// The running attempt ended.
    pub fn attempt_ended(&mut self, outcome: Cow<'static, str>, took: Duration) {
        if let Some(a) = self.attempts.last_mut() {
            a.outcome = Some(outcome);
            a.took = took;
        }
    }
}

/// A shard's region, serialised as its id.
#[derive(Debug, Clone)]
pub struct RegionOf(pub Arc<ShardEntry>);

impl Serialize for RegionOf {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.region)
    }
}

/// One request, as the decisions log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// `x-request-id`.
    pub id: String,
    /// The W3C trace id (32 hex digits).
    pub trace_id: TraceId,
    /// When it ended, Unix milliseconds.
    pub at_unix_ms: u64,
    /// The tenant, once known.
    pub tenant: Option<Arc<str>>,
    /// Its priority.
    pub priority: &'static str,
    /// The model asked for.
    pub model: Option<String>,
    /// The estimated token cost.
    pub estimated_tokens: u64,
    /// Time in the gateway's queue, if it queued, milliseconds.
    pub queue_wait_ms: Option<f64>,
    /// The status sent to the client.
    pub status: u16,
    /// Why the gateway refused it without a shard, if it did.
    pub refusal: Option<&'static str>,
    /// What cache affinity did for the first attempt (`chosen`, `overridden_by_load`,
    /// `fenced`), when it had a say.
    pub affinity: Option<&'static str>,
    /// The region of the first attempt's shard, if any.
    pub region: Option<RegionOf>,
    /// What the first pick saw (none: the request never reached a pick).
    #[serde(serialize_with = "candidates_or_none")]
    pub candidates: Option<Candidates>,
    /// Every attempt.
    pub attempts: Attempts,
    /// The whole request, milliseconds.
    pub total_ms: f64,
}

fn candidates_or_none<S: serde::Serializer>(
    c: &Option<Candidates>,
    s: S,
) -> Result<S::Ok, S::Error> {
    OrEmpty(c).serialize(s)
}

/// A pick's candidates, serialised as an empty list when no pick was made.
pub struct OrEmpty<'a>(pub &'a Option<Candidates>);

impl Serialize for OrEmpty<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(c) => c.serialize(s),
            None => s.collect_seq(std::iter::empty::<()>()),
        }
    }
}

/// The last [`CAPACITY`] decisions.
#[derive(Debug)]
pub struct Decisions {
    ring: Mutex<VecDeque<Decision>>,
}

impl Default for Decisions {
    fn default() -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(CAPACITY)),
        }
    }
}

impl Decisions {
    /// Keeps `d`, dropping the oldest when full.
    pub fn record(&self, d: Decision) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let evicted = if ring.len() == CAPACITY {
            ring.pop_front()
        } else {
            None
        };
        ring.push_back(d);
        drop(ring);
        // The oldest entry's strings are freed outside the lock.
        drop(evicted);
    }

    /// The last `n` (at most [`CAPACITY`]), newest first: copies, for the admin API.
    pub fn last(&self, n: usize) -> Vec<Decision> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().take(n).cloned().collect()
    }

    /// The decision of request `id`, if it is still kept.
    pub fn find(&self, id: &str) -> Option<Decision> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().find(|d| d.id == id).cloned()
    }
}

/// A duration in milliseconds, rounded to the microsecond.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(id: &str) -> Decision {
        Decision {
            id: id.into(),
            trace_id: TraceId(0),
            at_unix_ms: 0,
            tenant: None,
            priority: "standard",
            model: None,
            estimated_tokens: 0,
            queue_wait_ms: None,
            status: 200,
            refusal: None,
            affinity: None,
            region: None,
            candidates: None,
            attempts: Attempts::new(),
            total_ms: 0.0,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_finds_by_id() {
        let d = Decisions::default();
        for i in 0..CAPACITY + 10 {
            d.record(decision(&i.to_string()));
        }
        let last = d.last(usize::MAX);
        assert_eq!(last.len(), CAPACITY);
        assert_eq!(last[0].id, (CAPACITY + 9).to_string());
        assert_eq!(last[CAPACITY - 1].id, "10");
        assert!(d.find("9").is_none());
        assert_eq!(d.find("42").unwrap().id, "42");
        assert_eq!(d.last(3).len(), 3);
    }
}
