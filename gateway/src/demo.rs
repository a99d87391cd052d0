//! `breakwater demo`: the gateway in front of an embedded simulated fleet — two regions,
//! two shards each with different capacities — all on 127.0.0.1.
//!
//! The fleet is `policies/demo/`, compiled into the binary so the demo runs from any
//! directory. One `llm-sim` engine is started at every shard URL, with its control
//! listener 1000 ports above, and a simulated gpu-probe at every `gpu_probe` URL; the admin
//! API's fault endpoint reaches both.

use std::net::SocketAddr;
use std::time::Duration;

use llm_sim::{SimConfig, SimHandle};

pub use crate::admin::FaultControls;
use crate::policy::{self, Policy, PolicyError};

/// The demo policy files, as (name, contents).
pub fn policy_sources() -> Vec<(String, String)> {
    [
        (
            "eu-west.toml",
            include_str!("../../policies/demo/eu-west.toml"),
        ),
        (
            "gateway.toml",
            include_str!("../../policies/demo/gateway.toml"),
        ),
        (
            "tenants.toml",
            include_str!("../../policies/demo/tenants.toml"),
        ),
        (
            "us-east.toml",
            include_str!("../../policies/demo/us-east.toml"),
        ),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t.to_string()))
    .collect()
}

/// The demo tenants' keys, as (tenant, priority, key): public, printed by the demo, and
/// listed in `policies/demo/tenants.toml` only as digests.
pub const DEMO_KEYS: [(&str, &str, &str); 3] = [
    ("demo-critical", "critical", "sk-demo-critical"),
    ("demo-standard", "standard", "sk-demo-standard"),
    ("demo-sheddable", "sheddable", "sk-demo-sheddable"),
];

/// The compiled demo policy.
pub fn policy() -> Result<Policy, PolicyError> {
    policy::from_sources(&policy_sources())
}

/// Errors starting the simulated fleet.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A shard URL is not a loopback `IP:PORT`.
    #[error("demo shard {shard}: {url} is not a 127.0.0.1 address")]
    NotLoopback {
        /// The shard.
        shard: String,
        /// Its URL.
        url: String,
    },
    /// A port is taken.
    #[error("demo shard {shard}: cannot listen on {addr} or its control port: {source}")]
    Bind {
        /// The shard.
        shard: String,
        /// The serving address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The simulators' runtime could not start.
    #[error("starting the simulators' runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

fn loopback(url: &url::Url) -> Option<SocketAddr> {
    let host: std::net::IpAddr = url.host_str()?.parse().ok()?;
    host.is_loopback()
        .then_some(SocketAddr::new(host, url.port()?))
}

/// Starts one simulated engine per shard of `policy` on a background thread with its own
/// runtime, and returns their control addresses once every listener is bound. The engines
/// live until the process exits.
pub fn start_fleet(policy: &Policy) -> Result<FaultControls, DemoError> {
    let mut plan = Vec::new();
    for (i, shard) in policy.shards.iter().enumerate() {
        let not_loopback = || DemoError::NotLoopback {
            shard: shard.id.clone(),
            url: shard.url.to_string(),
        };
        let host: std::net::IpAddr = shard
            .url
            .host_str()
            .and_then(|h| h.parse().ok())
            .ok_or_else(not_loopback)?;
        let port = shard.url.port().ok_or_else(not_loopback)?;
        if !host.is_loopback() {
            return Err(not_loopback());
        }
        let addr = SocketAddr::new(host, port);
        let control = SocketAddr::new(host, port.saturating_add(1000));
        let model = policy
            .pools
            .iter()
            .find(|p| p.id == shard.pool)
            .and_then(|p| p.models.first().cloned())
            .unwrap_or_default();
        let config = SimConfig {
            model,
            capacity_tps: shard.capacity_tps,
            slots: 16,
            // Engines differ a little, as real ones do.
            ttft: Duration::from_millis(60 + 20 * i as u64),
            itl: Duration::from_millis(12),
            kv_capacity_tokens: 131_072,
            behaviour: llm_sim::Behaviour::Continuous,
        };
        let probe = match &shard.gpu_probe {
            Some(url) => Some(loopback(url).ok_or_else(|| DemoError::NotLoopback {
                shard: shard.id.clone(),
                url: url.to_string(),
            })?),
            None => None,
        };
        plan.push((shard.id.clone(), addr, control, probe, config));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("llm-sim")
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("demo-fleet".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut sims = Vec::new();
                let mut controls = FaultControls::default();
                for (id, addr, control, probe, config) in plan {
                    match SimHandle::bind(config, addr, control, None).await {
                        Ok(sim) => {
                            controls.engines.insert(id.clone(), sim.control_addr());
                            sims.push(sim);
                        }
                        Err(source) => {
                            let _ = tx.send(Err(DemoError::Bind {
                                shard: id,
                                addr,
                                source,
                            }));
                            return;
                        }
                    }
                    if let Some(probe) = probe {
                        if let Err(source) = start_probe(probe).await {
                            let _ = tx.send(Err(DemoError::Bind {
                                shard: id,
                                addr: probe,
                                source,
                            }));
                            return;
                        }
                        controls.probes.insert(id, probe);
                    }
                }
                let _ = tx.send(Ok(controls));
                // Keep the engines alive for the life of the process.
                std::future::pending::<()>().await;
                drop(sims);
            })
        })
        .map_err(DemoError::Runtime)?;
    rx.recv().unwrap_or_else(|_| {
        Err(DemoError::Runtime(std::io::Error::other(
            "the fleet thread exited",
        )))
    })
}

/// A simulated gpu-probe (one healthy device) serving on `addr`, reading every 500 ms.
async fn start_probe(addr: SocketAddr) -> std::io::Result<()> {
    use gpu_probe::classify::Thresholds;
    use gpu_probe::server::{self, Agent};
    use gpu_probe::source::simulated::SimulatedNode;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let node = SimulatedNode::new(1);
    let agent = Agent::new(
        Box::new(node.clone()),
        Thresholds::default(),
        Duration::from_millis(500),
        Some(node),
    );
    let _ = agent.refresh();
    agent.spawn_poller();
    tokio::spawn(server::serve(agent, listener));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_policy_compiles_and_has_two_regions_of_two_shards() {
        let p = super::policy().unwrap();
        assert_eq!(p.regions.len(), 2);
        for r in &p.regions {
            let n = p.shards.iter().filter(|s| s.region == r.id).count();
            assert!(n >= 2, "{} has {n} shards", r.id);
        }
        let caps: std::collections::HashSet<u64> =
            p.shards.iter().map(|s| s.capacity_tps as u64).collect();
        assert_eq!(caps.len(), p.shards.len(), "capacities differ");
        // Every printed key belongs to the tenant it is printed for.
        let tenants = crate::admission::tenant::Tenants::new(&p.tenants, &p.admission);
        for (id, priority, key) in super::DEMO_KEYS {
            let mut h = http::HeaderMap::new();
            h.insert("authorization", format!("Bearer {key}").parse().unwrap());
            let t = tenants.get(tenants.identify(&h).unwrap());
            assert_eq!((&*t.id, t.priority.as_str()), (id, priority));
        }
    }
}
