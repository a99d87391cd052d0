//! What a pool's `discover` key names, and the shards a set of addresses becomes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use url::Url;

use crate::policy::Shard;

/// Where a pool's engines are listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoverTarget {
    /// `dns://NAME:PORT`: the A and AAAA records of NAME, each address a shard on PORT.
    Addresses {
        /// The name resolved.
        name: String,
        /// The port every engine listens on.
        port: u16,
    },
    /// `dns+srv://_service._proto.NAME`: the SRV records of the name, each a shard at
    /// its target's addresses and its port.
    Service {
        /// The service name resolved.
        name: String,
    },
}

impl DiscoverTarget {
    /// Parses `dns://NAME:PORT` or `dns+srv://_service._proto.NAME`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(rest) = raw.strip_prefix("dns+srv://") {
            let name = rest.trim_end_matches('.');
            check_name(name)?;
            let labels: Vec<&str> = name.split('.').collect();
            if labels.len() < 3 || !labels[0].starts_with('_') || !labels[1].starts_with('_') {
                return Err(format!(
                    "{raw:?}: an SRV name is _service._proto.NAME (e.g. _http._tcp.vllm.ns.svc)"
                ));
            }
            return Ok(Self::Service { name: name.into() });
        }
        let Some(rest) = raw.strip_prefix("dns://") else {
            return Err(format!(
                "{raw:?}: expected dns://NAME:PORT or dns+srv://_service._proto.NAME"
            ));
        };
        let Some((name, port)) = rest.rsplit_once(':') else {
            return Err(format!("{raw:?}: dns://NAME:PORT needs the engines' port"));
        };
        let name = name.trim_end_matches('.');
        check_name(name)?;
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self::Addresses {
                name: name.into(),
                port,
            }),
            _ => Err(format!("{raw:?}: {port:?} is not a port (1-65535)")),
        }
    }

    /// The DNS name resolved.
    pub fn name(&self) -> &str {
        match self {
            Self::Addresses { name, .. } | Self::Service { name } => name,
        }
    }
}

impl fmt::Display for DiscoverTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addresses { name, port } => write!(f, "dns://{name}:{port}"),
            Self::Service { name } => write!(f, "dns+srv://{name}"),
        }
    }
}

/// A host name of 1-253 characters in labels of letters, digits, '-' and '_'.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a DNS name"))
    }
}

/// How a discovered pool's engines are reached and what each shard declares.
#[derive(Debug, Clone, PartialEq)]
pub struct Discover {
    /// The records listing them.
    pub target: DiscoverTarget,
    /// `http` or `https`.
    pub scheme: String,
    /// Each shard's decode capacity, tokens/s.
    pub capacity_tps: f64,
    /// Each shard's weight.
    pub weight: f64,
    /// Each shard's batch slots, when declared.
    pub max_requests: Option<u64>,
    /// The gpu-probe agent's base URL, `{ip}` standing for the shard's address.
    pub gpu_probe: Option<String>,
    /// Re-resolved no sooner than this after the last answer, whatever its TTL.
    pub min_interval: Duration,
    /// Re-resolved no later than this, whatever its TTL.
    pub max_interval: Duration,
}

impl Discover {
    /// The shard at `addr` of pool `pool` in `region`: its id is the pool's and the
    /// address (`POOL@IP:PORT`), stable for as long as the address stays. (`None` only
    /// for a scheme that makes no URL, which the policy refuses.)
    pub fn shard(&self, pool: &str, region: &str, addr: SocketAddr) -> Option<Shard> {
        // A socket address prints IPv6 in brackets, as a URL and the id want it.
        let url = Url::parse(&format!("{}://{addr}/", self.scheme)).ok()?;
        let host = match addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        Some(Shard {
            id: format!("{pool}@{addr}"),
            region: region.into(),
            pool: pool.into(),
            url,
            capacity_tps: self.capacity_tps,
            weight: self.weight,
            gpu_probe: self.gpu_probe_for(&host),
            gpu_devices: Vec::new(),
            max_requests: self.max_requests,
        })
    }

    /// The gpu-probe URL for a shard at `host`, from the template.
    pub fn gpu_probe_for(&self, host: &str) -> Option<Url> {
        let template = self.gpu_probe.as_ref()?;
        Url::parse(&template.replace("{ip}", host)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back_and_bad_ones_say_why() {
        let a = DiscoverTarget::parse("dns://vllm.inference.svc.cluster.local:8000").unwrap();
        assert_eq!(
            a,
            DiscoverTarget::Addresses {
                name: "vllm.inference.svc.cluster.local".into(),
                port: 8000
            }
        );
        assert_eq!(a.to_string(), "dns://vllm.inference.svc.cluster.local:8000");
        let s = DiscoverTarget::parse("dns+srv://_http._tcp.vllm.svc.").unwrap();
        assert_eq!(s.to_string(), "dns+srv://_http._tcp.vllm.svc");
        assert_eq!(s.name(), "_http._tcp.vllm.svc");
        for bad in [
            "vllm:8000",
            "dns://vllm",
            "dns://vllm:0",
            "dns://vllm:99999",
            "dns://:8000",
            "dns://a..b:80",
            "dns://a b:80",
            "dns+srv://vllm.svc",
            "dns+srv://_http.vllm",
            "http://vllm:8000",
        ] {
            assert!(DiscoverTarget::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_discovered_shard_is_named_by_its_pool_and_address() {
        let d = Discover {
            target: DiscoverTarget::parse("dns://e:8000").unwrap(),
            scheme: "http".into(),
            capacity_tps: 900.0,
            weight: 2.0,
            max_requests: Some(16),
            gpu_probe: Some("http://{ip}:9400".into()),
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
        };
        let s = d
            .shard("p", "eu", "10.1.2.3:8000".parse().unwrap())
            .unwrap();
        assert_eq!(s.id, "p@10.1.2.3:8000");
        assert_eq!(s.url.as_str(), "http://10.1.2.3:8000/");
        assert_eq!(s.gpu_probe.unwrap().as_str(), "http://10.1.2.3:9400/");
        assert_eq!(
            (s.capacity_tps, s.weight, s.max_requests),
            (900.0, 2.0, Some(16))
        );
        let v6 = d
            .shard("p", "eu", "[fd00::7]:8000".parse().unwrap())
            .unwrap();
        assert_eq!(v6.id, "p@[fd00::7]:8000");
        assert_eq!(v6.url.as_str(), "http://[fd00::7]:8000/");
        assert_eq!(v6.gpu_probe.unwrap().as_str(), "http://[fd00::7]:9400/");
    }
}
