//! DNS lookups for discovered pools, through the nameservers `[discovery]` names or the
//! system's resolver configuration.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use super::target::DiscoverTarget;

/// Why a lookup gave no addresses.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The resolver could not be set up (an unreadable system configuration).
    #[error("resolver: {0}")]
    Setup(String),
    /// The lookup failed: no answer, a timeout, NXDOMAIN, no records.
    #[error("{name}: {message}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// What one lookup found: the addresses, and until when the answer may be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The engines' addresses, sorted, without duplicates.
    pub addrs: Vec<SocketAddr>,
    /// When the records' TTL runs out.
    pub valid_until: Instant,
}

/// A resolver for every discovered pool.
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// A resolver asking `nameservers` (UDP, then TCP), or the system's when empty. Answers
    /// are not cached here: every lookup asks, and the caller keeps them for their TTL.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Self, ResolveError> {
        let builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| ResolveError::Setup(e.to_string()))?
        } else {
            let servers = nameservers
                .iter()
                .map(|a| {
                    let mut s = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut s.connections {
                        c.port = a.port();
                    }
                    s
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.cache_size = 0;
        let inner = builder
            .with_options(opts)
            .build()
            .map_err(|e| ResolveError::Setup(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Looks `target` up: its addresses on its port, or each SRV target's addresses on
    /// that record's port.
    pub async fn resolve(&self, target: &DiscoverTarget) -> Result<Found, ResolveError> {
        let failed = |name: &str, e: &dyn std::fmt::Display| ResolveError::Lookup {
            name: name.into(),
            message: e.to_string(),
        };
        let mut addrs = Vec::new();
        let valid_until = match target {
            DiscoverTarget::Addresses { name, port } => {
                let fqdn = format!("{name}.");
                let ips = self
                    .inner
                    .lookup_ip(fqdn.as_str())
                    .await
                    .map_err(|e| failed(name, &e))?;
                addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, *port)));
                ips.valid_until()
            }
            DiscoverTarget::Service { name } => {
                let fqdn = format!("{name}.");
                let srv = self
                    .inner
                    .srv_lookup(fqdn.as_str())
                    .await
                    .map_err(|e| failed(name, &e))?;
                let mut until = srv.valid_until();
                for record in srv.answers() {
                    let RData::SRV(s) = &record.data else {
                        continue;
                    };
                    let host = s.target.to_string();
                    let ips = self
                        .inner
                        .lookup_ip(host.as_str())
                        .await
                        .map_err(|e| failed(&host, &e))?;
                    until = until.min(ips.valid_until());
                    addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, s.port)));
                }
                until
            }
        };
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(failed(target.name(), &"no records"));
        }
        Ok(Found { addrs, valid_until })
    }
}
