//! What operators and the policy changed, for the dashboard's timeline beside health's
//! transitions: reloads (applied or rejected) and drains. A bounded ring.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Entries kept.
pub const CAPACITY: usize = 128;

/// One change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
    /// `reload_applied`, `reload_rejected`, `drain`, `undrain`.
    pub kind: &'static str,
    /// What it concerns: a revision, a shard id, the trigger.
    pub subject: String,
    /// A line for people.
    pub detail: String,
}

/// The last [`CAPACITY`] changes.
#[derive(Debug, Default)]
pub struct Journal {
    ring: Mutex<VecDeque<Entry>>,
}

impl Journal {
    /// Notes a change now.
    pub fn note(&self, kind: &'static str, subject: impl Into<String>, detail: impl Into<String>) {
        let at_unix_ms = super::unix_ms();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(Entry {
            at_unix_ms,
            kind,
            subject: subject.into(),
            detail: detail.into(),
        });
    }

    /// Every kept change, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_in_order() {
        let j = Journal::default();
        for i in 0..CAPACITY + 3 {
            j.note("drain", format!("s{i}"), "");
        }
        let e = j.entries();
        assert_eq!(e.len(), CAPACITY);
        assert_eq!(e[0].subject, "s3");
        assert_eq!(e[CAPACITY - 1].subject, format!("s{}", CAPACITY + 2));
    }
}
