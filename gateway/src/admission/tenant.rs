//! Who sent a request: the API key (from `Authorization: Bearer` or Azure's `api-key`)
//! looked up by its SHA-256 digest, so neither the policy nor memory holds a key in the
//! clear, and keys never reach logs, metrics or the admin API — only tenant ids do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::rate::Bucket;
use crate::policy::{AdmissionSettings, Priority, Tenant};

/// The id of the tenant that keyless (or unknown-key) requests belong to when keys are not
/// required. A `[[tenants]]` entry with this id sets its priority and limits.
pub const DEFAULT_TENANT: &str = "default";

/// One tenant at run time.
#[derive(Debug)]
pub struct TenantState {
    /// Tenant id (shared: the decisions log keeps it without copying).
    pub id: Arc<str>,
    /// Priority.
    pub priority: Priority,
    /// Deadline of a request that brings none.
    pub timeout: Option<Duration>,
    /// Requests per minute.
    pub rpm: Option<Arc<Bucket>>,
    /// Tokens per minute.
    pub tpm: Option<Arc<Bucket>>,
}

impl TenantState {
    /// Tenant `t`, keeping the buckets of `old` (the same tenant in the previous table)
    /// whose allowance is unchanged: a reload neither refills nor empties them. With
    /// `shared`, new buckets are leased from the cluster's store.
    fn new(t: &Tenant, old: Option<&TenantState>, shared: bool) -> Self {
        let bucket = |per_minute: Option<u64>, old: Option<&Arc<Bucket>>| {
            per_minute.map(|n| match old {
                Some(b) if b.per_minute() == n => Arc::clone(b),
                _ if shared => Arc::new(Bucket::leased(n)),
                _ => Arc::new(Bucket::new(n)),
            })
        };
        Self {
            id: Arc::from(t.id.as_str()),
            priority: t.priority,
            timeout: t.timeout,
            rpm: bucket(t.rpm, old.and_then(|o| o.rpm.as_ref())),
            tpm: bucket(t.tpm, old.and_then(|o| o.tpm.as_ref())),
        }
    }
}

/// Every tenant, and the key digest → tenant index.
#[derive(Debug)]
pub struct Tenants {
    tenants: Vec<TenantState>,
    by_digest: HashMap<[u8; 32], usize>,
    /// The tenant of requests without a known key, when keys are not required.
    default: usize,
    require_key: bool,
}

/// Why a request has no tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    /// No key was sent.
    Missing,
    /// The key matches no tenant.
    Unknown,
}

impl Tenants {
    /// The tenants of a policy, plus the default one.
    pub fn new(tenants: &[Tenant], settings: &AdmissionSettings) -> Self {
        Self::carried(tenants, settings, None, false)
    }

    /// [`Tenants::new`], keeping the rate buckets `previous` has for tenants of the same
    /// id and allowance; with `shared`, buckets are leased from the cluster's store.
    pub fn carried(
        tenants: &[Tenant],
        settings: &AdmissionSettings,
        previous: Option<&Tenants>,
        shared: bool,
    ) -> Self {
        let old = |id: &str| previous.and_then(|p| p.tenants.iter().find(|t| &*t.id == id));
        let mut states: Vec<TenantState> = tenants
            .iter()
            .map(|t| TenantState::new(t, old(&t.id), shared))
            .collect();
        let mut by_digest = HashMap::new();
        for (i, t) in tenants.iter().enumerate() {
            for d in &t.key_digests {
                by_digest.insert(*d, i);
            }
        }
        let default = match states.iter().position(|t| &*t.id == DEFAULT_TENANT) {
            Some(i) => i,
            None => {
                states.push(TenantState {
                    id: DEFAULT_TENANT.into(),
                    priority: settings.default_priority,
                    timeout: None,
                    rpm: None,
                    tpm: None,
                });
                states.len() - 1
            }
        };
        Self {
            tenants: states,
            by_digest,
            default,
            require_key: settings.require_api_key,
        }
    }

    /// Tenant number `i`.
    pub fn get(&self, i: usize) -> &TenantState {
        &self.tenants[i]
    }

    /// Every tenant, the default one included.
    pub fn all(&self) -> &[TenantState] {
        &self.tenants
    }

    /// The tenant a request's headers name (its index), or why there is none.
    pub fn identify(&self, headers: &HeaderMap) -> Result<usize, KeyProblem> {
        let key = api_key(headers);
        let found = key.and_then(|k| {
            let digest: [u8; 32] = Sha256::digest(k).into();
            self.by_digest.get(&digest).copied()
        });
        match (found, key, self.require_key) {
            (Some(i), _, _) => Ok(i),
            (None, _, false) => Ok(self.default),
            (None, None, true) => Err(KeyProblem::Missing),
            (None, Some(_), true) => Err(KeyProblem::Unknown),
        }
    }
}

/// The API key a request carries: `Authorization: Bearer KEY`, else `api-key: KEY`.
fn api_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            let key = v[7..].trim_ascii();
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    headers
        .get("api-key")
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

/// The lowercase hex SHA-256 of a key, as `api_key_sha256` lists it.
pub fn key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, key: &str, priority: Priority) -> Tenant {
        let mut d = [0u8; 32];
        hex::decode_to_slice(key_digest_hex(key), &mut d).unwrap();
        Tenant {
            id: id.into(),
            key_digests: vec![d],
            priority,
            rpm: None,
            tpm: None,
            timeout: None,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn keys_are_found_by_digest_in_either_header() {
        let list = [
            tenant("a", "key-a", Priority::Critical),
            tenant("b", "key-b", Priority::Sheddable),
        ];
        let t = Tenants::new(&list, &AdmissionSettings::default());
        let a = t
            .identify(&headers(&[("authorization", "Bearer key-a")]))
            .unwrap();
        assert_eq!(&*t.get(a).id, "a");
        let b = t.identify(&headers(&[("api-key", "key-b")])).unwrap();
        assert_eq!(t.get(b).priority, Priority::Sheddable);
        // Not required: everyone else is the default tenant.
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer nope")]),
            headers(&[("authorization", "Basic a2V5LWE=")]),
        ] {
            assert_eq!(&*t.get(t.identify(&h).unwrap()).id, DEFAULT_TENANT);
        }
    }

    #[test]
    fn required_keys_refuse_missing_and_unknown_ones() {
        let settings = AdmissionSettings {
            require_api_key: true,
            default_priority: Priority::Sheddable,
            ..AdmissionSettings::default()
        };
        let t = Tenants::new(&[tenant("a", "key-a", Priority::Standard)], &settings);
        assert_eq!(t.identify(&headers(&[])), Err(KeyProblem::Missing));
        assert_eq!(
            t.identify(&headers(&[("authorization", "Bearer key-b")])),
            Err(KeyProblem::Unknown)
        );
        assert!(t
            .identify(&headers(&[("authorization", "bearer key-a")]))
            .is_ok());
    }

    #[test]
    fn a_tenant_named_default_takes_keyless_requests() {
        let mut d = tenant(DEFAULT_TENANT, "unused", Priority::Sheddable);
        d.key_digests.clear();
        let t = Tenants::new(&[d], &AdmissionSettings::default());
        assert_eq!(t.all().len(), 1);
        let i = t.identify(&headers(&[])).unwrap();
        assert_eq!(t.get(i).priority, Priority::Sheddable);
    }
}
