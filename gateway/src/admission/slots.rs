//! Each shard's batch slots, learned from the engine's own counts, so nobody has to write
//! an engine's `max_num_seqs` into the policy.
//!
//! An engine that reports requests *waiting* (vLLM's `num_requests_waiting`, SGLang's and
//! TGI's queue) has no free slot: what it reports *running* then is what it can run at
//! once — its batch slots, or fewer when its KV cache is the bound. So:
//!
//! - a reading with someone waiting sets the slots to the running count at once when that
//!   is more than believed (or nothing was learned yet); when it is less, the slots close a
//!   quarter of the gap, and only from the second such reading in a row (one reading taken
//!   between two scheduler steps can catch a freed slot before the waiter is scheduled into
//!   it, and a slot given up on that would idle until the next try; a KV-bound engine
//!   shrinks for real and the readings that follow say so) — except right after one more
//!   slot was tried, where the first reading with a waiter is the answer;
//! - a reading with nobody waiting raises them to the running count; and when the engine
//!   runs all the learned slots with nobody waiting — admission holds it there, so it
//!   cannot show more — one more slot is tried, at most once every [`PROBE_EVERY`]: the
//!   next reading shows a waiter (the slots were right: back to them) or not (it has more,
//!   as after a restart with a larger batch or a KV cache with room again). A try that
//!   was wrong costs one request a wait inside the engine (on FIFO slots, a whole request
//!   more to its first token), so each wrong try doubles the interval to the next, up to
//!   [`PROBE_AT_MOST_EVERY`], and one that found a slot brings it back to [`PROBE_EVERY`];
//! - each reading counts once (by the time it was taken).
//!
//! Admission then keeps at most the learned slots in flight on the shard (counted by the
//! gateway, so current): the engine never builds a queue of its own, where the gateway's
//! priorities and deadlines cannot reach (a critical request queued in an engine behind a
//! sheddable one waits a whole request for a slot), and the slot that frees is filled by
//! the gateway's next waiter the moment the gateway sees the answer end. Until an engine
//! has been seen full there is no bound in requests; the token limit learned from time to
//! first token ([`super::limit`]) still applies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// One shard's learned batch slots.
#[derive(Debug, Default)]
pub struct EngineSlots {
    /// Slots learned; 0 until the engine has been seen full.
    slots: AtomicU64,
    /// When the last reading learned from was taken, nanoseconds since [`epoch`] (+1, so 0
    /// means none).
    seen: AtomicU64,
    /// When one more slot was last tried, nanoseconds since [`epoch`].
    probed: AtomicU64,
    /// Whether the slots stand at one more than learned, being tried.
    trying: AtomicBool,
    /// Whether the last reading showed a waiter with fewer running than the slots.
    short: AtomicBool,
    /// Tries of one more slot that were wrong since one was right (the interval between
    /// tries doubles with each).
    wrong_tries: AtomicU64,
    /// With `[cluster]`: this replica's part of the slots (+1, so 0 means the whole), as
    /// [`allot`] last divided them among the replicas.
    allotted: AtomicU64,
    /// With `[cluster]`: set on every replica but one (per pool), which leave the tries of
    /// one more slot to that one and follow the engine's counts.
    no_tries: AtomicBool,
}

/// Least time between two tries of one more slot than learned.
pub const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Most time between two tries, after wrong ones.
pub const PROBE_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_secs(32);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl EngineSlots {
    /// The slots learned, if the engine has been seen full.
    pub fn learned(&self) -> Option<u64> {
        match self.slots.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// The slots learned less the one being tried, if any: what the engine is known to run
    /// at once. A critical request is kept to these, so it never lands in the engine's own
    /// queue (or, on an engine bound by its KV cache, becomes the youngest request, the
    /// one preempted) because a try of one more slot was wrong.
    pub fn confirmed(&self) -> Option<u64> {
        let trying = u64::from(self.trying.load(Ordering::Relaxed));
        self.learned().map(|n| n.saturating_sub(trying).max(1))
    }

    /// `slots` (declared or learned) as far as this replica may fill them: its allotment
    /// among the gateway replicas, if one is set.
    pub fn allotted(&self, slots: u64) -> u64 {
        match self.allotted.load(Ordering::Relaxed) {
            0 => slots,
            a => slots.min(a - 1),
        }
    }

    /// This replica's allotment of the slots (`None`: all of them).
    pub fn allotment(&self) -> Option<u64> {
        self.allotted.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Sets this replica's allotment (`None`: all of them).
    pub fn set_allotment(&self, allotted: Option<u64>) {
        self.allotted
            .store(allotted.map_or(0, |a| a + 1), Ordering::Relaxed);
    }

    /// Whether this replica tries one more slot when the engine runs all it has learned
    /// (`false`: another gateway replica does, and this one learns the answer from the
    /// engine's counts like any other reading).
    pub fn set_may_try(&self, may: bool) {
        self.no_tries.store(!may, Ordering::Relaxed);
        if !may && self.trying.swap(false, Ordering::Relaxed) {
            // The try is another replica's now: back to what the engine was seen to run.
            let n = self.slots.load(Ordering::Relaxed);
            self.slots
                .store(n.saturating_sub(1).max(1), Ordering::Relaxed);
        }
    }

    /// Whether this replica is trying one more slot now.
    pub fn is_trying(&self) -> bool {
        self.trying.load(Ordering::Relaxed)
    }

    /// Learns from an engine reading taken at `taken`: `running` in the batch, `waiting`
    /// for a slot. A reading already learned from (or an older one) changes nothing.
    pub fn observe(&self, taken: Instant, running: f64, waiting: f64) {
        let at = taken.saturating_duration_since(epoch()).as_nanos() as u64 + 1;
        let seen = self.seen.load(Ordering::Relaxed);
        if at <= seen
            || self
                .seen
                .compare_exchange(seen, at, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return; // known, or another thread is learning from it
        }
        if !(running.is_finite() && waiting.is_finite()) {
            return;
        }
        let running = running.max(0.0).round() as u64;
        let current = self.slots.load(Ordering::Relaxed);
        let short = waiting >= 0.5 && current > running;
        let was_short = self.short.swap(short, Ordering::Relaxed);
        let was_trying = self.trying.load(Ordering::Relaxed);
        let mut trying = false;
        let next = if short {
            if was_trying {
                // The engine had no slot more: wait longer before the next try.
                self.wrong_tries.fetch_add(1, Ordering::Relaxed);
                current - (current - running).div_ceil(4)
            } else if was_short {
                current - (current - running).div_ceil(4)
            } else {
                return; // one reading may be between two steps: the next one decides
            }
        } else if waiting >= 0.5 {
            if was_trying && running >= current {
                self.wrong_tries.store(0, Ordering::Relaxed);
            }
            running
        } else if current > 0 && running >= current {
            if was_trying {
                self.wrong_tries.store(0, Ordering::Relaxed); // the slot tried was there
            }
            let probed = self.probed.load(Ordering::Relaxed);
            if !self.no_tries.load(Ordering::Relaxed)
                && at.saturating_sub(probed) >= self.probe_interval().as_nanos() as u64
            {
                self.probed.store(at, Ordering::Relaxed);
                trying = true;
                running + 1
            } else {
                running
            }
        } else {
            // Not full: the slots (and a try of one more) stand; with none learned yet,
            // it runs at least this many, which bounds nothing.
            return;
        };
        self.trying.store(trying, Ordering::Relaxed);
        self.slots.store(next.max(1), Ordering::Relaxed);
    }

    /// How long after a try of one more slot the next may be.
    fn probe_interval(&self) -> std::time::Duration {
        let wrong = self.wrong_tries.load(Ordering::Relaxed).min(8) as u32;
        (PROBE_EVERY * 2u32.pow(wrong)).min(PROBE_AT_MOST_EVERY)
    }

    /// Forgets what was learned (the engine behind the shard changed).
    pub fn forget(&self) {
        self.wrong_tries.store(0, Ordering::Relaxed);
        self.slots.store(0, Ordering::Relaxed);
        self.trying.store(false, Ordering::Relaxed);
        self.short.store(false, Ordering::Relaxed);
    }
}

/// Divides `slots` among replicas by their `demand` (requests in flight and queued for
/// the shard's pool, one entry per replica in the same order on every replica, so each
/// computes the same division): every replica with any demand gets one slot first (as far
/// as the slots go, in order), the rest go in proportion to the demand beyond that, by
/// largest remainder (ties to the earlier replica), or evenly when nobody wants more than
/// one. The parts add up to `slots`, so the replicas together never fill more than the
/// engine has; under load, a replica with no demand gets none until it reports some.
pub fn allot(slots: u64, demand: &[f64]) -> Vec<u64> {
    let mut parts = vec![0u64; demand.len()];
    let mut left = slots;
    for (i, d) in demand.iter().enumerate() {
        if left > 0 && *d > 0.0 {
            parts[i] = 1;
            left -= 1;
        }
    }
    let beyond: Vec<f64> = demand
        .iter()
        .zip(&parts)
        .map(|(d, p)| (d - *p as f64).max(0.0))
        .collect();
    let total: f64 = beyond.iter().sum();
    if left == 0 {
        return parts;
    }
    // Nobody wants more than one: what is left is shared evenly, so a replica's next
    // request finds a slot without waiting for the next report.
    let (weights, total) = if total > 0.0 {
        (beyond, total)
    } else {
        (vec![1.0; demand.len()], demand.len() as f64)
    };
    let exact: Vec<f64> = weights.iter().map(|b| b / total * left as f64).collect();
    let mut given = 0;
    for (p, e) in parts.iter_mut().zip(&exact) {
        *p += e.floor() as u64;
        given += e.floor() as u64;
    }
    let mut order: Vec<usize> = (0..demand.len()).collect();
    order.sort_by(|a, b| {
        let (ra, rb) = (exact[*a] - exact[*a].floor(), exact[*b] - exact[*b].floor());
        rb.total_cmp(&ra).then(a.cmp(b))
    });
    for i in order.into_iter().take((left - given) as usize) {
        parts[i] += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_divided_by_demand_and_always_add_up() {
        assert_eq!(allot(16, &[10.0, 10.0, 10.0]), vec![6, 5, 5]);
        assert_eq!(allot(6, &[20.0, 8.0, 8.0]).iter().sum::<u64>(), 6);
        // One waiting request is not starved by a busy replica.
        assert_eq!(allot(16, &[40.0, 1.0, 0.0]), vec![15, 1, 0]);
        // Idle replicas share evenly; one asking for more takes what is left.
        assert_eq!(allot(8, &[0.0, 0.0, 0.0]), vec![3, 3, 2]);
        assert_eq!(allot(8, &[1.0, 0.0, 0.0]), vec![4, 2, 2]);
        assert_eq!(allot(8, &[0.0, 2.0, 0.0]), vec![0, 8, 0]);
        // Fewer slots than replicas asking: one each as far as they go.
        assert_eq!(allot(2, &[5.0, 5.0, 5.0]), vec![1, 1, 0]);
        for slots in [1u64, 3, 7, 64] {
            for demand in [[0.5, 3.0, 9.0], [100.0, 0.0, 1.0], [2.0, 2.0, 2.0]] {
                assert_eq!(
                    allot(slots, &demand).iter().sum::<u64>(),
                    slots,
                    "{slots} {demand:?}"
                );
            }
        }
    }

    #[test]
    fn an_allotment_caps_the_slots_this_replica_fills() {
        let s = EngineSlots::default();
        assert_eq!(s.allotted(16), 16);
        s.set_allotment(Some(5));
        assert_eq!((s.allotted(16), s.allotment()), (5, Some(5)));
        assert_eq!(s.allotted(3), 3);
        s.set_allotment(Some(0));
        assert_eq!(s.allotted(16), 0);
        s.set_allotment(None);
        assert_eq!(s.allotted(16), 16);
    }
    use std::time::Duration;

    fn at(ms: u64) -> Instant {
        epoch() + Duration::from_millis(ms)
    }

    #[test]
    fn a_replica_that_leaves_the_tries_to_another_follows_the_engine_s_counts() {
        let s = EngineSlots::default();
        s.observe(at(1), 8.0, 2.0);
        s.set_may_try(false);
        // Full with nobody waiting, long after any try: this replica does not try.
        s.observe(at(10_000), 8.0, 0.0);
        assert_eq!((s.learned(), s.is_trying()), (Some(8), false));
        // Another replica's try found a ninth slot: the engine says so, and this one learns it.
        s.observe(at(10_100), 9.0, 0.0);
        assert_eq!(s.learned(), Some(9));
        // Made the one that tries, it tries; told to stop mid-try, it drops the slot tried.
        s.set_may_try(true);
        s.observe(at(20_000), 9.0, 0.0);
        assert_eq!((s.learned(), s.is_trying()), (Some(10), true));
        s.set_may_try(false);
        assert_eq!((s.learned(), s.is_trying()), (Some(9), false));
    }

    #[test]
    fn nothing_is_learned_until_the_engine_is_seen_full() {
        let s = EngineSlots::default();
        s.observe(at(1), 10.0, 0.0);
        s.observe(at(2), 30.0, 0.0);
        assert_eq!(s.learned(), None);
        s.observe(at(3), 16.0, 4.0);
        assert_eq!(s.learned(), Some(16));
    }

    #[test]
    fn a_full_engine_running_more_raises_the_slots_at_once_and_fewer_closes_a_quarter_of_the_gap() {
        let s = EngineSlots::default();
        s.observe(at(1), 16.0, 1.0);
        s.observe(at(2), 24.0, 0.0);
        assert_eq!(
            s.learned(),
            Some(24),
            "running more with nobody waiting raises it"
        );
        s.observe(at(3), 8.0, 0.0);
        assert_eq!(
            s.learned(),
            Some(24),
            "running fewer with nobody waiting is not full"
        );
        s.observe(at(4), 8.0, 2.0);
        assert_eq!(
            s.learned(),
            Some(24),
            "one reading may fall between two steps"
        );
        s.observe(at(5), 8.0, 2.0);
        assert_eq!(s.learned(), Some(20));
        s.observe(at(6), 8.0, 2.0);
        assert_eq!(s.learned(), Some(17));
        s.observe(at(7), 32.0, 1.0);
        assert_eq!(s.learned(), Some(32));
        for ms in 8..40 {
            s.observe(at(ms), 0.0, 3.0);
        }
        assert_eq!(s.learned(), Some(1), "never below one slot");
    }

    #[test]
    fn an_engine_running_all_its_learned_slots_with_nobody_waiting_is_tried_with_one_more() {
        let s = EngineSlots::default();
        s.observe(at(1), 16.0, 1.0);
        let probe = PROBE_EVERY.as_millis() as u64;
        // Full to the learned slots and nobody waiting: one more is tried ...
        s.observe(at(probe + 10), 16.0, 0.0);
        assert_eq!(s.learned(), Some(17));
        assert_eq!(s.confirmed(), Some(16), "the slot tried is not confirmed");
        // ... the engine shows a waiter: 16 was right.
        s.observe(at(probe + 20), 16.0, 1.0);
        assert_eq!(s.learned(), Some(16));
        assert_eq!(s.confirmed(), Some(16));
        // Not again before the interval has passed.
        s.observe(at(probe + 30), 16.0, 0.0);
        assert_eq!(s.learned(), Some(16));
        // An engine with more slots (restarted larger) is followed one slot a try.
        s.observe(at(2 * probe + 40), 16.0, 0.0);
        s.observe(at(2 * probe + 50), 17.0, 0.0);
        assert_eq!(s.learned(), Some(17));
        s.observe(at(3 * probe + 60), 17.0, 0.0);
        assert_eq!(s.learned(), Some(18));
    }

    #[test]
    fn each_wrong_try_doubles_the_wait_for_the_next_and_a_right_one_resets_it() {
        let s = EngineSlots::default();
        s.observe(at(1), 16.0, 1.0);
        let probe = PROBE_EVERY.as_millis() as u64;
        // A first try, wrong.
        let mut now = probe + 10;
        s.observe(at(now), 16.0, 0.0);
        assert_eq!(s.learned(), Some(17));
        now += 1;
        s.observe(at(now), 16.0, 1.0);
        now -= 1;
        // Three more wrong tries: each one comes twice as long after the last.
        for wait in [2 * probe, 4 * probe, 8 * probe] {
            now += wait - 5;
            s.observe(at(now), 16.0, 0.0);
            assert_eq!(
                s.learned(),
                Some(16),
                "not yet {wait} ms after the last try"
            );
            now += 5;
            s.observe(at(now), 16.0, 0.0);
            assert_eq!(s.learned(), Some(17), "tried {wait} ms after the last");
            s.observe(at(now + 1), 16.0, 1.0);
            assert_eq!(s.learned(), Some(16));
        }
        // A right one (the engine runs 17, nobody waits) brings the interval back.
        now += 16 * probe;
        s.observe(at(now), 16.0, 0.0);
        now += 1;
        s.observe(at(now), 17.0, 0.0);
        assert_eq!(s.learned(), Some(17));
        now += probe;
        s.observe(at(now), 17.0, 0.0);
        assert_eq!(s.learned(), Some(18));
        // The interval never passes its bound.
        for _ in 0..10 {
            now += PROBE_AT_MOST_EVERY.as_millis() as u64;
            s.observe(at(now), 18.0, 0.0);
            assert_eq!(s.learned(), Some(19));
            now += 1;
            s.observe(at(now), 18.0, 1.0);
            assert_eq!(s.learned(), Some(18));
        }
    }

    #[test]
    fn one_reading_between_two_scheduler_steps_does_not_give_up_a_slot() {
        let s = EngineSlots::default();
        s.observe(at(1), 4.0, 1.0);
        // A slot freed and its waiter not yet scheduled into it ...
        s.observe(at(2), 3.0, 1.0);
        assert_eq!(s.learned(), Some(4));
        // ... and the next reading is full again.
        s.observe(at(3), 4.0, 0.0);
        s.observe(at(4), 3.0, 1.0);
        assert_eq!(s.learned(), Some(4), "not two short readings in a row");
        s.observe(at(5), 3.0, 1.0);
        assert_eq!(s.learned(), Some(3), "two in a row: the engine runs fewer");
    }

    #[test]
    fn each_reading_counts_once_and_older_ones_not_at_all() {
        let s = EngineSlots::default();
        s.observe(at(10), 16.0, 1.0);
        s.observe(at(10), 8.0, 1.0);
        s.observe(at(5), 8.0, 1.0);
        assert_eq!(s.learned(), Some(16));
        s.observe(at(11), f64::NAN, 1.0);
        assert_eq!(s.learned(), Some(16));
        s.forget();
        assert_eq!(s.learned(), None);
    }
}
