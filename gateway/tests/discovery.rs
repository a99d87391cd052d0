//! Shards discovered from DNS: a real dnsmasq serves a pool's A records; the test changes
//! them under load and stops the server, and checks what the clients saw.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns::Dns;
use common::{chat, client, Gateway, MODEL};
use llm_sim::{SimConfig, SimHandle};

const NAME: &str = "engines.test";

/// Simulated engines on 127.0.0.2, .3, … all on one port, as a headless Service's pods.
struct Engines {
    port: u16,
    sims: Vec<SimHandle>,
}

impl Engines {
    async fn start(count: u8) -> Engines {
        'port: for _ in 0..20 {
            let first = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
            let port = first.local_addr().unwrap().port();
            let mut listeners = vec![first];
            for i in 1..count {
                match tokio::net::TcpListener::bind((format!("127.0.0.{}", 2 + i), port)).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => continue 'port,
                }
            }
            let mut sims = Vec::new();
            for l in listeners {
                let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let config = SimConfig {
                    model: MODEL.into(),
                    capacity_tps: 2000.0,
                    slots: 64,
                    ttft: Duration::from_millis(5),
                    itl: Duration::from_millis(2),
                    kv_capacity_tokens: 1 << 20,
                    behaviour: llm_sim::Behaviour::Continuous,
                };
                sims.push(SimHandle::spawn(config, l, control).unwrap());
            }
            return Engines { port, sims };
        }
        panic!("no port free on every loopback address");
    }

    /// Engine `i` (127.0.0.{2 + i}).
    fn ip(i: usize) -> String {
        format!("127.0.0.{}", 2 + i)
    }

    fn served(&self, i: usize) -> u64 {
        self.sims[i].engine().stats().requests_total
    }

    fn id(&self, i: usize) -> String {
        format!("p@{}:{}", Self::ip(i), self.port)
    }
}

fn policy(dns: &Dns, engines: &Engines) -> String {
    format!(
        "[gateway]\nhome_region = \"home\"\n\n[[regions]]\nid = \"home\"\n\n\
         [discovery]\nnameservers = [\"127.0.0.1:{}\"]\ntimeout_ms = 300\n\n\
         [health]\ncheck_interval_ms = 200\ncheck_timeout_ms = 150\n\n\
         [[pools]]\nid = \"p\"\nregion = \"home\"\nengine = \"vllm\"\nmodels = [\"{MODEL}\"]\n\
         discover = \"dns://{NAME}:{}\"\ncapacity_tps = 2000\ndiscover_min_ms = 200\n",
        dns.port, engines.port
    )
}

/// The ids of the shards the gateway routes to now.
async fn shard_ids(gw: &Gateway) -> Vec<String> {
    let mut ids: Vec<String> = gw.status().await["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

async fn wait_for(what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if ok().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {within:?}");
}

/// What the clients saw: requests answered 200 (streams ending in `[DONE]`), and the rest.
#[derive(Default, Debug)]
struct Seen {
    ok: u64,
    failed: Vec<String>,
}

/// `workers` clients, half streaming, each sending a request every 20 ms or so (about
/// half of what two engines serve, with six) until `stop` (at most 100,000 each).
fn clients(gw: &Gateway, workers: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Seen> {
    let url = gw.url("/v1/chat/completions");
    let start = Instant::now();
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (url, stop) = (url.clone(), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let c = client();
                let stream = w % 2 == 1;
                let mut seen = Seen::default();
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = c.post(&url).json(&chat(8, stream)).send().await;
                    let outcome = match r {
                        Ok(r) => {
                            let status = r.status();
                            match r.text().await {
                                Ok(t) if status == 200 && (!stream || t.contains("[DONE]")) => {
                                    Ok(())
                                }
                                Ok(t) => Err(format!("{status}: {t}")),
                                Err(e) => Err(format!("{status}, body cut: {e}")),
                            }
                        }
                        Err(e) => Err(format!("no answer: {e}")),
                    };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    match outcome {
                        Ok(()) => seen.ok += 1,
                        Err(e) => seen.failed.push(format!("at {:?}: {e}", start.elapsed())),
                    }
                }
                seen
            }));
        }
        let mut all = Seen::default();
        for t in tasks {
            let s = t.await.unwrap();
            all.ok += s.ok;
            all.failed.extend(s.failed);
        }
        all
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engines_that_come_and_go_in_dns_serve_and_drain_and_a_dead_resolver_changes_nothing() {
    let engines = Engines::start(4).await;
    let set = |dns: &Dns, live: &[usize]| {
        let ips: Vec<String> = live.iter().map(|&i| Engines::ip(i)).collect();
        let records: Vec<(&str, &str)> = ips.iter().map(|ip| (ip.as_str(), NAME)).collect();
        dns.set(&records);
    };
    // Engines 0 and 1 listed, TTL 1 s.
    let dns = Dns::start(&[], 1);
    set(&dns, &[0, 1]);
    let gw = Gateway::start(&policy(&dns, &engines)).await;
    let first = vec![engines.id(0), engines.id(1)];
    wait_for("the first lookup", Duration::from_secs(10), async || {
        shard_ids(&gw).await == first
    })
    .await;
    let status = gw.status().await;
    assert_eq!(status["discovery"][0]["pool"], "p", "{status}");
    assert_eq!(status["discovery"][0]["shards"], 2, "{status}");
    assert_eq!(
        status["discovery"][0]["target"],
        format!("dns://{NAME}:{}", engines.port)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = clients(&gw, 6, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(engines.served(0) > 0 && engines.served(1) > 0);

    // All at once: engines 2 and 3 join, engine 0 leaves.
    set(&dns, &[1, 2, 3]);
    let joined = wait_for(
        "the new engines serving",
        Duration::from_secs(10),
        async || engines.served(2) > 0 && engines.served(3) > 0,
    )
    .await;
    eprintln!(
        "new engines served {joined:?} after the records changed (TTL 1 s, checks every 200 ms)"
    );
    // One TTL, a lookup at most discover_min_ms late, a check: well within 3 s.
    assert!(joined < Duration::from_secs(3), "{joined:?}");
    let now = vec![engines.id(1), engines.id(2), engines.id(3)];
    wait_for(
        "engine 0 gone from the table",
        Duration::from_secs(5),
        async || shard_ids(&gw).await == now,
    )
    .await;
    // What it had already been sent finishes; nothing new goes to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left_at = engines.served(0);
    let before_outage = engines.served(1);

    // The resolver hangs for 10 s: every lookup times out; the pool keeps its shards.
    dns.signal("STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = gw.status().await;
    let d = &status["discovery"][0];
    assert!(d["failures"].as_u64().unwrap() >= 1, "{status}");
    assert!(d["error"].is_string(), "{status}");
    assert_eq!(d["shards"], 3, "{status}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"breakwater_discovery_lookups_total{pool="p",result="failed"}"#),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        shard_ids(&gw).await,
        now,
        "the pool changed while the resolver was down"
    );
    assert!(
        engines.served(1) > before_outage,
        "traffic stopped during the outage"
    );
    dns.signal("CONT");
    wait_for(
        "lookups answering again",
        Duration::from_secs(10),
        async || gw.status().await["discovery"][0]["error"].is_null(),
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();
    eprintln!(
        "{} requests answered, {} failed; engine 0 served {} after it left DNS",
        seen.ok,
        seen.failed.len(),
        engines.served(0) - left_at
    );
    assert!(seen.ok > 100, "{seen:?}");
    assert!(
        seen.failed.is_empty(),
        "{:?}\n{}",
        &seen.failed[..seen.failed.len().min(5)],
        gw.log()
    );
    assert_eq!(
        engines.served(0),
        left_at,
        "a shard that left DNS got new requests"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"breakwater_discovery_shards{pool="p"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"breakwater_discovery_lookups_total{pool="p",result="changed"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_each_engine_its_own_port_and_one_failing_its_check_gets_nothing() {
    let a = common::start_shard(common::ShardSpec::new("a", "home")).await;
    let b = common::start_shard(common::ShardSpec::new("b", "home")).await;
    // Listed, but not ready: its /health fails (as a pod still loading its weights would).
    let c = common::start_shard(common::ShardSpec::new("c", "home")).await;
    c.fault(llm_sim::FaultMode::Error);
    let port = |s: &common::Shard| s.sim.url().rsplit(':').next().unwrap().to_string();
    let (pa, pb, pc) = (port(&a), port(&b), port(&c));
    let dns = Dns::start_with(
        &[
            ("127.0.0.1", "a.engines.test"),
            ("127.0.0.1", "b.engines.test"),
            ("127.0.0.1", "c.engines.test"),
        ],
        1,
        &[
            format!("--srv-host=_http._tcp.{NAME},a.engines.test,{pa}"),
            format!("--srv-host=_http._tcp.{NAME},b.engines.test,{pb}"),
            format!("--srv-host=_http._tcp.{NAME},c.engines.test,{pc}"),
        ],
    );
    let policy = format!(
        "[gateway]\nhome_region = \"home\"\n\n[[regions]]\nid = \"home\"\n\n\
         [discovery]\nnameservers = [\"127.0.0.1:{}\"]\n\n\
         [health]\ncheck_interval_ms = 200\ncheck_timeout_ms = 150\n\n\
         [[pools]]\nid = \"p\"\nregion = \"home\"\nmodels = [\"{MODEL}\"]\n\
         discover = \"dns+srv://_http._tcp.{NAME}\"\ncapacity_tps = 1000\n",
        dns.port
    );
    let gw = Gateway::start(&policy).await;
    let mut want = vec![
        format!("p@127.0.0.1:{pa}"),
        format!("p@127.0.0.1:{pb}"),
        format!("p@127.0.0.1:{pc}"),
    ];
    want.sort();
    wait_for("the SRV lookup", Duration::from_secs(10), async || {
        shard_ids(&gw).await == want
    })
    .await;
    let c_id = format!("p@127.0.0.1:{pc}");
    let shard = gw.shard(&c_id).await;
    assert_eq!(shard["state"], "ejected", "{shard}");
    for _ in 0..30 {
        let r = common::post(&gw, "/v1/chat/completions", &chat(4, false)).await;
        assert_eq!(r.status(), 200);
    }
    assert!(a.stats().requests_total > 0 && b.stats().requests_total > 0);
    assert_eq!(
        c.stats().requests_total,
        0,
        "a shard never checked healthy was sent requests"
    );
    // Once its check passes it joins (in slow start).
    c.fault(llm_sim::FaultMode::Ok);
    wait_for("c admitted", Duration::from_secs(10), async || {
        gw.shard(&c_id).await["state"] == "healthy"
    })
    .await;
}
