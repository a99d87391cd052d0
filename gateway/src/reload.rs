//! Policy reloads: read the policy directory, validate the whole set, and — only when it
//! is valid — install it as the new routing table, retune what was copied out of the old
//! one (body budget, retry budget, admission), and hand the health thread its new probes.
//! An invalid set leaves the running one in place; the rejection is logged, counted and
//! shown in `/admin/status` (`policy.last_error`).
//!
//! Triggers: the file watcher ([`crate::policy::watch`]), `SIGHUP`, `POST /admin/reload`.
//! Reloads are serialized; one that finds the same contents and commit changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use breakwater_health::{HealthConfig, ShardProbes};
use serde::Serialize;

use crate::admission::Admission;
use crate::discovery::{with_discovered, Discovered};
use crate::metrics::Metrics;
use crate::policy::revision::Revision;
use crate::policy::{self, Policy, PolicyError};
use crate::proxy::budget::BodyBudget;
use crate::proxy::retry::RetryBudget;
use crate::stats::{unix_ms, Journal};
use crate::table::{Table, Tables};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A change in the policy directory.
    Watch,
    /// `SIGHUP`.
    Signal,
    /// `POST /admin/reload`.
    Admin,
    /// A discovered pool's records changed ([`crate::discovery`]).
    Discovery,
}

impl Trigger {
    /// The trigger's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
            Trigger::Discovery => "discovery",
        }
    }
}

/// Why a reload did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway runs a built-in policy (the demo): there is no directory to read.
    #[error("this gateway was not started from a policy directory")]
    NoDirectory,
    /// The directory or a file could not be read, or the set is invalid.
    #[error("{0}")]
    Policy(String),
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// The revision in force afterwards.
    pub revision: String,
    /// Whether it differs from the one before (`false`: nothing changed).
    pub changed: bool,
    /// Shards added, by id.
    pub added: Vec<String>,
    /// Shards removed, by id (their requests in flight finish).
    pub removed: Vec<String>,
    /// Settings the running process cannot change without a restart, which the new set
    /// changes anyway (they keep their old values).
    pub needs_restart: Vec<&'static str>,
}

/// What `/admin/status` shows of the policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatus {
    /// The revision in force: the Git commit, else `sha256:` and a content hash prefix.
    pub revision: String,
    /// The Git commit, when the directory is a checkout.
    pub commit: Option<String>,
    /// The content hash of the set in force.
    pub content_sha256: String,
    /// When the set in force was loaded, ms since the Unix epoch.
    pub loaded_at_unix_ms: u64,
    /// The files of the set in force.
    pub files: Vec<String>,
    /// The directory it is read from (`None`: a built-in policy).
    pub directory: Option<String>,
    /// Why the last reload was rejected, if the last one was.
    pub last_error: Option<String>,
    /// When that was, ms since the Unix epoch.
    pub last_error_at_unix_ms: Option<u64>,
    /// Reloads applied since start.
    pub reloads_applied: u64,
    /// Reloads rejected since start.
    pub reloads_rejected: u64,
}

/// Where the health thread takes its new probes.
pub type HealthUpdates = tokio::sync::mpsc::UnboundedSender<(Vec<ShardProbes>, HealthConfig)>;

/// Everything a reload touches.
pub struct Reloader {
    dir: Option<PathBuf>,
    tables: Arc<Tables>,
    admission: Arc<Admission>,
    body_budget: Arc<BodyBudget>,
    retry_budget: Arc<RetryBudget>,
    metrics: Arc<Metrics>,
    health: HealthUpdates,
    journal: Arc<Journal>,
    status: Mutex<PolicyStatus>,
    /// The content hash in force.
    content: Mutex<Revision>,
    /// The policy the files declare, before discovered shards are added.
    declared: Mutex<Arc<Policy>>,
    /// The addresses discovery found, by pool.
    discovered: Mutex<Discovered>,
    /// Held for a whole reload.
    one_at_a_time: Mutex<()>,
}

fn describe(e: &PolicyError) -> String {
    match e {
        PolicyError::Invalid(issues) => issues
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// The pieces a [`Reloader`] retunes besides the table.
pub struct Retuned {
    /// The admission (queue and drain rate).
    pub admission: Arc<Admission>,
    /// The body budget.
    pub body_budget: Arc<BodyBudget>,
    /// The retry budget.
    pub retry_budget: Arc<RetryBudget>,
    /// The metrics (reloads by result, the revision in force).
    pub metrics: Arc<Metrics>,
    /// The health thread's inbox.
    pub health: HealthUpdates,
    /// Where reloads are noted for the dashboard's timeline.
    pub journal: Arc<Journal>,
}

impl Reloader {
    /// A reloader for the tables in force, which were loaded from `dir` at `revision`.
    pub fn new(
        dir: Option<PathBuf>,
        tables: Arc<Tables>,
        revision: Revision,
        parts: Retuned,
    ) -> Arc<Self> {
        let table = tables.load();
        let status = PolicyStatus {
            revision: revision.label(),
            commit: revision.commit.clone(),
            content_sha256: revision.content.clone(),
            loaded_at_unix_ms: unix_ms(),
            files: table.policy.files.clone(),
            directory: dir.as_ref().map(|d| d.display().to_string()),
            last_error: None,
            last_error_at_unix_ms: None,
            reloads_applied: 0,
            reloads_rejected: 0,
        };
        parts.metrics.policy_revision(&status.revision, None);
        Arc::new(Self {
            dir,
            tables,
            admission: parts.admission,
            body_budget: parts.body_budget,
            retry_budget: parts.retry_budget,
            metrics: parts.metrics,
            health: parts.health,
            journal: parts.journal,
            status: Mutex::new(status),
            content: Mutex::new(revision),
            declared: Mutex::new(Arc::new(table.policy.clone())),
            discovered: Mutex::new(Discovered::new()),
            one_at_a_time: Mutex::new(()),
        })
    }

    /// The policy's status for the admin API.
    pub fn status(&self) -> PolicyStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The policy the files declare (before discovered shards are added).
    pub fn declared(&self) -> Arc<Policy> {
        Arc::clone(&self.declared.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Discovery found `addrs` for `pool`: installs the declared policy with them when
    /// that changes the one in force, and then says how many shards the pool has from
    /// DNS.
    pub fn set_discovered(&self, pool: &str, addrs: Vec<SocketAddr>) -> Option<usize> {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        let declared = self.declared();
        let policy = {
            let mut found = self.discovered.lock().unwrap_or_else(|p| p.into_inner());
            // The same answer again (most lookups): nothing to rebuild.
            if found.get(pool) == Some(&addrs) {
                return None;
            }
            found.insert(pool.to_string(), addrs);
            with_discovered(&declared, &found)
        };
        if self.tables.peek().policy == policy {
            return None;
        }
        let from_dns = policy.shards[declared.shards.len()..]
            .iter()
            .filter(|s| s.pool == pool)
            .count();
        let revision = self
            .content
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.apply(Trigger::Discovery, policy, revision);
        Some(from_dns)
    }

    /// Reads the directory again and applies the set when it is valid and new.
    pub fn reload(&self, trigger: Trigger) -> Result<Applied, ReloadError> {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.dir.as_deref().ok_or(ReloadError::NoDirectory)?;
        let loaded = policy::read_sources(dir).and_then(|sources| {
            let policy = policy::from_sources(&sources)?;
            Ok((policy, Revision::of(Some(dir), &sources)))
        });
        let (declared, revision) = match loaded {
            Ok(ok) => ok,
            Err(e) => return Err(self.rejected(trigger, describe(&e))),
        };
        let policy = {
            let mut found = self.discovered.lock().unwrap_or_else(|p| p.into_inner());
            // A pool that no longer discovers, or discovers elsewhere, starts afresh.
            let old = self.declared();
            found.retain(|pool, _| {
                let target = |p: &Policy| {
                    p.pools
                        .iter()
                        .find(|x| x.id == *pool)
                        .and_then(|x| x.discover.as_ref().map(|d| d.target.clone()))
                };
                target(&declared).is_some() && target(&declared) == target(&old)
            });
            with_discovered(&declared, &found)
        };
        *self.declared.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(declared);
        // The same files can still compile to a new policy when what they point to changed
        // (a pool's CA bundle).
        let same = *self.content.lock().unwrap_or_else(|p| p.into_inner()) == revision
            && self.tables.peek().policy == policy;
        if same {
            self.metrics.reload(trigger.as_str(), "unchanged");
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.last_error = None;
            return Ok(Applied {
                revision: revision.label(),
                changed: false,
                added: Vec::new(),
                removed: Vec::new(),
                needs_restart: Vec::new(),
            });
        }
        Ok(self.apply(trigger, policy, revision))
    }

    fn rejected(&self, trigger: Trigger, error: String) -> ReloadError {
        tracing::warn!(
            target: "policy",
            trigger = trigger.as_str(),
            error = %error,
            "policy reload rejected; the running policy stays"
        );
        self.metrics.reload(trigger.as_str(), "rejected");
        self.journal
            .note("reload_rejected", trigger.as_str(), error.clone());
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.last_error = Some(error.clone());
        st.last_error_at_unix_ms = Some(unix_ms());
        st.reloads_rejected += 1;
        ReloadError::Policy(error)
    }

    fn apply(&self, trigger: Trigger, policy: Policy, revision: Revision) -> Applied {
        let label = revision.label();
        let (new, old) = self.tables.install(policy, label.clone());
        let applied = Applied {
            revision: label.clone(),
            changed: true,
            added: shard_ids_missing_from(&new, &old),
            removed: shard_ids_missing_from(&old, &new),
            needs_restart: needs_restart(&old.policy, &new.policy),
        };
        let p = &new.policy;
        self.body_budget.set_limit(p.limits.max_buffered_bytes);
        self.retry_budget.reconfigure(p.retries.clone());
        self.admission.retune(&new);
        let _ = self.health.send((new.probes(), p.health.clone()));
        self.metrics.reload(trigger.as_str(), "applied");
        self.metrics.policy_revision(&label, Some(&old.revision));
        self.journal.note(
            "reload_applied",
            label.clone(),
            format!(
                "{} (from {}; added {:?}, removed {:?})",
                trigger.as_str(),
                old.revision,
                applied.added,
                applied.removed
            ),
        );
        tracing::info!(
            target: "policy",
            trigger = trigger.as_str(),
            revision = %label,
            previous = %old.revision,
            added = ?applied.added,
            removed = ?applied.removed,
            needs_restart = ?applied.needs_restart,
            "policy reloaded: {}",
            p.summary()
        );
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.revision = label;
        st.commit = revision.commit.clone();
        st.content_sha256 = revision.content.clone();
        st.loaded_at_unix_ms = unix_ms();
        st.files = p.files.clone();
        st.last_error = None;
        st.reloads_applied += 1;
        *self.content.lock().unwrap_or_else(|p| p.into_inner()) = revision;
        applied
    }
}

/// Ids of `a`'s shards that `b` does not have (with the same URL).
fn shard_ids_missing_from(a: &Table, b: &Table) -> Vec<String> {
    let in_b: std::collections::HashSet<_> = b.router.shards().iter().map(|o| o.key).collect();
    a.router
        .shards()
        .iter()
        .filter(|s| !in_b.contains(&s.key))
        .map(|s| s.id.clone())
        .collect()
}

/// The settings fixed at start that `new` changes.
fn needs_restart(old: &Policy, new: &Policy) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.listen != new.listen {
        out.push("gateway.listen");
    }
    if old.admin_listen != new.admin_listen {
        out.push("gateway.admin_listen");
    }
    // The listeners' certificate *files* are followed as they change; which files, and
    // the protocols offered, are fixed when the listeners open.
    if old.tls != new.tls {
        out.push("gateway.tls");
    }
    if old.admin_tls != new.admin_tls {
        out.push("gateway.admin_tls");
    }
    if old.h2c != new.h2c {
        out.push("gateway.h2c");
    }
    out
}
