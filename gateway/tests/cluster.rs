//! `[cluster]`: three gateway replicas in front of one engine share their tenants' limits
//! through a real `redis-server` (Debian's package; `.ci/run` installs it), and keep
//! serving on local shares when the store dies, hangs or comes back empty.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use breakwater::admission::tenant::key_digest_hex;
use common::redis::{wait_port, Redis};
use common::*;
use serde_json::Value;

const RPM_KEY: &str = "sk-cluster-rpm";
const TPM_KEY: &str = "sk-cluster-tpm";

fn policy(shard: &Shard, redis_port: u16, rpm: u64, tpm: u64, replica: &str) -> String {
    policy_text(
        &[shard],
        &format!(
            "[cluster]\nstore = \"redis://127.0.0.1:{redis_port}\"\nreplica_id = \"{replica}\"\n\
             timeout_ms = 100\nsync_ms = 100\nheartbeat_ms = 100\nreplica_ttl_ms = 2000\n\n\
             [[tenants]]\nid = \"by-requests\"\napi_key_sha256 = [\"{}\"]\nrpm = {rpm}\n\n\
             [[tenants]]\nid = \"by-tokens\"\napi_key_sha256 = [\"{}\"]\ntpm = {tpm}\n",
            key_digest_hex(RPM_KEY),
            key_digest_hex(TPM_KEY)
        ),
    )
}

async fn replicas(shard: &Shard, redis_port: u16, rpm: u64, tpm: u64) -> Vec<Gateway> {
    replicas_of(|i| policy(shard, redis_port, rpm, tpm, &format!("r{i}"))).await
}

/// Three replicas of `policy(i)`, once each sees the other two.
async fn replicas_of(policy: impl Fn(usize) -> String) -> Vec<Gateway> {
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(Gateway::start(&policy(i)).await);
    }
    // Every replica has beaten once and sees the other two.
    let deadline = Instant::now() + Duration::from_secs(10);
    for gw in &out {
        loop {
            let s = gw.status().await;
            let seen = s["cluster"]["replicas"].as_array().map_or(0, Vec::len);
            if s["cluster"]["state"] == "up" && seen == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "replicas not seen: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

/// One request's outcome: status, tokens its answer reported, latency.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    status: u16,
    tokens: u64,
    took: Duration,
    retry_after: bool,
}

async fn ask(c: &reqwest::Client, url: &str, key: &str) -> Outcome {
    let sent = Instant::now();
    let r = c
        .post(url)
        .bearer_auth(key)
        .json(&chat(4, false))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            let body: Value = r.json().await.unwrap_or(Value::Null);
            Outcome {
                status,
                tokens: body["usage"]["total_tokens"].as_u64().unwrap_or(0),
                took: sent.elapsed(),
                retry_after,
            }
        }
        Err(_) => Outcome {
            status: 0,
            tokens: 0,
            took: sent.elapsed(),
            retry_after: false,
        },
    }
}

/// Open-loop arrivals for `length`: `per_s` requests a second with `key`, round-robin over
/// the replicas; every outcome, with when it was sent.
async fn offer(
    gws: &[Gateway],
    key: &'static str,
    per_s: f64,
    length: Duration,
) -> Vec<(Duration, Outcome)> {
    let urls: Vec<String> = gws.iter().map(|g| g.url("/v1/chat/completions")).collect();
    let out = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let c = client();
    let n = (per_s * length.as_secs_f64()) as usize;
    for i in 0..n {
        let at = Duration::from_secs_f64(i as f64 / per_s);
        tokio::time::sleep_until((start + at).into()).await;
        let (c, url, out) = (c.clone(), urls[i % urls.len()].clone(), Arc::clone(&out));
        tasks.push(tokio::spawn(async move {
            let o = ask(&c, &url, key).await;
            out.lock().unwrap().push((at, o));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = out.lock().unwrap().clone();
    v
}

/// Spends the minute's allowance each bucket starts with: requests as fast as they go
/// until 30 in a row are refused (at most 30 s).
async fn drain(gws: &[Gateway], key: &'static str) {
    let urls: Vec<String> = gws.iter().map(|g| g.url("/v1/chat/completions")).collect();
    let refused_in_a_row = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for w in 0..12 {
        let (url, row) = (urls[w % urls.len()].clone(), Arc::clone(&refused_in_a_row));
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..20_000 {
                if Instant::now() > deadline || row.load(std::sync::atomic::Ordering::Relaxed) >= 30
                {
                    break;
                }
                let o = ask(&c, &url, key).await;
                if o.status == 429 {
                    row.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    row.store(0, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        refused_in_a_row.load(std::sync::atomic::Ordering::Relaxed) >= 30,
        "the starting allowance was not spent within 30 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hold_a_tenants_rpm_and_tpm_within_5_percent_over_a_minute() {
    let redis = Redis::start();
    let shard = start_shard(ShardSpec::new("s1", "home").capacity(100_000.0)).await;
    // 20 requests/s and 400 tokens/s for the whole fleet of replicas.
    let (rpm, tpm) = (1200u64, 24_000u64);
    let gws = replicas(&shard, redis.port, rpm, tpm).await;
    tokio::join!(drain(&gws, RPM_KEY), drain(&gws, TPM_KEY));

    // A minute at three times each limit (the token tenant's requests are ~22 tokens).
    let minute = Duration::from_secs(60);
    let (by_requests, by_tokens) = tokio::join!(
        offer(&gws, RPM_KEY, 60.0, minute),
        offer(&gws, TPM_KEY, 3.0 * 400.0 / 22.0, minute)
    );
    for (name, outcomes) in [("rpm", &by_requests), ("tpm", &by_tokens)] {
        let bad: Vec<_> = outcomes
            .iter()
            .filter(|(_, o)| !matches!(o.status, 200 | 429))
            .collect();
        assert!(
            bad.is_empty(),
            "{name}: answers other than 200 and 429: {bad:?}"
        );
        assert!(
            outcomes
                .iter()
                .all(|(_, o)| o.status != 429 || o.retry_after),
            "{name}: a refusal without Retry-After"
        );
    }
    let admitted = by_requests.iter().filter(|(_, o)| o.status == 200).count() as f64;
    let tokens: u64 = by_tokens
        .iter()
        .filter(|(_, o)| o.status == 200)
        .map(|(_, o)| o.tokens)
        .sum();
    eprintln!(
        "rpm {rpm}: {admitted} admitted of {}; tpm {tpm}: {tokens} tokens in {} answers of {}",
        by_requests.len(),
        by_tokens.iter().filter(|(_, o)| o.status == 200).count(),
        by_tokens.len()
    );
    assert!(
        (admitted / rpm as f64 - 1.0).abs() <= 0.05,
        "rpm {rpm} across three replicas: {admitted} admitted in a minute"
    );
    assert!(
        (tokens as f64 / tpm as f64 - 1.0).abs() <= 0.05,
        "tpm {tpm} across three replicas: {tokens} tokens answered in a minute"
    );
    // Every replica was on the store throughout: the limits were the store's.
    for gw in &gws {
        assert!(
            gw.metrics().await.contains("breakwater_cluster_store_up 1"),
            "{}",
            gw.log()
        );
    }
}

/// Requests admitted per second over `outcomes` sent within `from..to`.
fn admitted_per_s(outcomes: &[(Duration, Outcome)], from: Duration, to: Duration) -> f64 {
    let n = outcomes
        .iter()
        .filter(|(at, o)| *at >= from && *at < to && o.status == 200)
        .count();
    n as f64 / (to - from).as_secs_f64()
}

async fn wait_state(gws: &[Gateway], state: &str, within: Duration) -> Duration {
    let start = Instant::now();
    for gw in gws {
        loop {
            let s = gw.status().await;
            if s["cluster"]["state"] == state {
                break;
            }
            assert!(
                start.elapsed() < within,
                "not {state} within {within:?}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_killed_hung_and_restarted_empty_fails_no_request() {
    let mut redis = Redis::start();
    let port = redis.port;
    let shard = start_shard(ShardSpec::new("s1", "home").capacity(100_000.0)).await;
    let rpm = 1200u64; // 20/s
    let gws = replicas(&shard, port, rpm, 1_000_000).await;
    drain(&gws, RPM_KEY).await;

    // 24 s at three times the limit: store up (0–4 s), killed (4–9 s), back empty
    // (9–14 s), hung by SIGSTOP (14–19 s), continued (19–24 s).
    let faults = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        redis.kill();
        let down = wait_state(&gws, "down", Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_secs(5) - down).await;
        let restarted = Redis::start_on(port);
        let up = wait_state(&gws, "up", Duration::from_secs(3)).await;
        tokio::time::sleep(Duration::from_secs(5) - up).await;
        restarted.signal("STOP");
        let hung = wait_state(&gws, "down", Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_secs(5) - hung).await;
        restarted.signal("CONT");
        let back = wait_state(&gws, "up", Duration::from_secs(3)).await;
        (down, up, hung, back, restarted)
    };
    let (outcomes, (down, up, hung, back, _restarted)) =
        tokio::join!(offer(&gws, RPM_KEY, 60.0, Duration::from_secs(24)), faults);
    eprintln!("down after {down:?}, up after {up:?}, hung after {hung:?}, back after {back:?}");

    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| !matches!(o.status, 200 | 429))
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed because of the store: {failed:?}"
    );
    // Nobody waited on the store: not while it was killed, nor while it hung.
    let slowest = outcomes.iter().map(|(_, o)| o.took).max().unwrap();
    assert!(
        slowest < Duration::from_millis(900),
        "a request took {slowest:?}"
    );
    let limit = rpm as f64 / 60.0;
    for (from, to, what) in [
        (5, 9, "killed"),
        (10, 14, "restarted empty"),
        (15, 19, "hung"),
        (20, 24, "continued"),
    ] {
        let rate = admitted_per_s(
            &outcomes,
            Duration::from_secs(from),
            Duration::from_secs(to),
        );
        eprintln!("{what}: {rate:.1}/s admitted against a limit of {limit}/s");
        // During an outage within 2x of the limit; after one (4 s windows: 80 requests at
        // the limit), within 10 %.
        let (low, high) = match what {
            "killed" | "hung" => (0.5, 2.0),
            _ => (0.9, 1.1),
        };
        assert!(
            rate <= high * limit && rate >= low * limit,
            "{what}: {rate:.1}/s admitted, limit {limit}/s"
        );
    }
    // One log line per transition, not one per request.
    for gw in &gws {
        let log = gw.log();
        let lost = log.matches("cluster store unreachable").count();
        let back = log.matches("cluster store answers again").count();
        assert_eq!((lost, back), (2, 2), "{log}");
    }
    let m = gws[0].metrics().await;
    assert!(m.contains("breakwater_cluster_replicas 3"), "{m}");
    assert!(m.contains("breakwater_cluster_store_up 1"), "{m}");
}

/// A TCP relay to the store that, while `slow` is set, holds every chunk for 300 ms each
/// way: a store (or a network) slower than the replicas' 100 ms timeout.
async fn slow_relay(to: u16, slow: Arc<std::sync::atomic::AtomicBool>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut r, mut w) in [(cr, sw), (sr, cw)] {
                let slow = Arc::clone(&slow);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if slow.load(std::sync::atomic::Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_store_counts_as_down_and_no_request_waits_on_it() {
    let redis = Redis::start();
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = slow_relay(redis.port, Arc::clone(&slow)).await;
    let shard = start_shard(ShardSpec::new("s1", "home").capacity(100_000.0)).await;
    let rpm = 1200u64; // 20/s
    let gws = replicas(&shard, relay, rpm, 1_000_000).await;
    drain(&gws, RPM_KEY).await;
    // 14 s at three times the limit: slow from 3 s to 8 s.
    let faults = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        slow.store(true, std::sync::atomic::Ordering::Relaxed);
        let down = wait_state(&gws, "down", Duration::from_secs(3)).await;
        tokio::time::sleep(Duration::from_secs(5) - down).await;
        slow.store(false, std::sync::atomic::Ordering::Relaxed);
        let up = wait_state(&gws, "up", Duration::from_secs(3)).await;
        (down, up)
    };
    let (outcomes, (down, up)) =
        tokio::join!(offer(&gws, RPM_KEY, 60.0, Duration::from_secs(14)), faults);
    eprintln!("down after {down:?}, up after {up:?}");
    assert!(outcomes.iter().all(|(_, o)| matches!(o.status, 200 | 429)));
    let slowest = outcomes.iter().map(|(_, o)| o.took).max().unwrap();
    assert!(
        slowest < Duration::from_millis(900),
        "a request took {slowest:?}"
    );
    let limit = rpm as f64 / 60.0;
    for (from, to, what, low, high) in [(4, 8, "slow", 0.5, 2.0), (10, 14, "fast again", 0.9, 1.1)]
    {
        let rate = admitted_per_s(
            &outcomes,
            Duration::from_secs(from),
            Duration::from_secs(to),
        );
        eprintln!("{what}: {rate:.1}/s admitted against a limit of {limit}/s");
        assert!(
            rate >= low * limit && rate <= high * limit,
            "{what}: {rate:.1}/s admitted, limit {limit}/s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_drops_out_and_the_others_take_the_whole_limit() {
    let redis = Redis::start();
    let shard = start_shard(ShardSpec::new("s1", "home").capacity(100_000.0)).await;
    let rpm = 1200u64; // 20/s
    let mut gws = replicas(&shard, redis.port, rpm, 1_000_000).await;
    drain(&gws, RPM_KEY).await;
    let doomed = gws.pop().unwrap();
    // The survivors get 40/s between them throughout, the doomed replica 20/s until it is
    // killed at 3 s.
    let killed = async {
        let _ = offer(
            std::slice::from_ref(&doomed),
            RPM_KEY,
            20.0,
            Duration::from_secs(3),
        )
        .await;
        doomed.signal("KILL");
        let start = Instant::now();
        loop {
            let seen = gws[0].status().await["cluster"]["replicas"]
                .as_array()
                .map_or(0, Vec::len);
            if seen == 2 {
                break start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the killed replica still counts"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (survivors, dropped_out) =
        tokio::join!(offer(&gws, RPM_KEY, 40.0, Duration::from_secs(10)), killed);
    eprintln!("the killed replica dropped out after {dropped_out:?}");
    assert!(survivors.iter().all(|(_, o)| matches!(o.status, 200 | 429)));
    let limit = rpm as f64 / 60.0;
    let rate = admitted_per_s(&survivors, Duration::from_secs(4), Duration::from_secs(10));
    eprintln!("survivors: {rate:.1}/s admitted against a limit of {limit}/s");
    assert!(
        (rate / limit - 1.0).abs() <= 0.1,
        "after one of three replicas died the other two admitted {rate:.1}/s, limit {limit}/s"
    );
    let m = gws[0].metrics().await;
    assert!(m.contains("breakwater_cluster_replicas 2"), "{m}");
}

/// `per_replica[i]` closed-loop clients on replica `i`, each sending `body` until `stop`
/// (at most `most` requests each; after a 429, 20 ms of quiet). Each yields the statuses it
/// saw (0: no answer).
fn closed_loop(
    gws: &[Gateway],
    per_replica: &[usize],
    body: Value,
    stop: Instant,
    most: usize,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    let mut clients = Vec::new();
    for (gw, n) in gws.iter().zip(per_replica) {
        for _ in 0..*n {
            let (url, body) = (gw.url("/v1/chat/completions"), body.clone());
            clients.push(tokio::spawn(async move {
                let (c, mut statuses) = (client(), Vec::new());
                while Instant::now() < stop && statuses.len() < most {
                    let status = match c.post(&url).json(&body).send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    statuses.push(status);
                    if status == 429 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                statuses
            }));
        }
    }
    clients
}

/// Every status the clients of [`closed_loop`] saw.
async fn statuses_of(clients: Vec<tokio::task::JoinHandle<Vec<u16>>>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.unwrap());
    }
    statuses
}

/// Shard `s1`'s `field` in each replica's `/admin/status`, in order.
async fn shard_field(gws: &[Gateway], field: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for gw in gws {
        out.push(gw.shard("s1").await[field].clone());
    }
    out
}

/// How the engine behind `shard` ran from now until `until`, read from its own counts
/// every 10 ms.
struct EngineUse {
    samples: usize,
    /// Samples with a request waiting in the engine's own queue.
    queued: usize,
    /// The most requests waiting in any sample.
    most_waiting: u64,
    /// Requests running, on average.
    mean_running: f64,
}

async fn engine_use(shard: &Shard, until: Instant) -> EngineUse {
    let mut samples = Vec::new();
    while Instant::now() < until {
        let st = shard.stats();
        samples.push((st.running, st.waiting));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    EngineUse {
        samples: samples.len(),
        queued: samples.iter().filter(|(_, w)| *w > 0).count(),
        most_waiting: samples.iter().map(|(_, w)| *w).max().unwrap_or(0),
        mean_running: samples.iter().map(|(r, _)| *r as f64).sum::<f64>()
            / samples.len().max(1) as f64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_together_never_fill_more_than_a_shards_slots() {
    let redis = Redis::start();
    let mut spec = ShardSpec::new("s1", "home");
    spec.behaviour = llm_sim::Behaviour::FifoSlots;
    (spec.slots, spec.ttft_ms, spec.itl_ms) = (6, 20, 5);
    let shard = start_shard(spec).await;
    let gws = replicas_of(|i| {
        policy(&shard, redis.port, 1_000_000, 100_000_000, &format!("r{i}")).replacen(
            "capacity_tps = 1000\n",
            "capacity_tps = 1000\nmax_requests = 6\n",
            1,
        )
    })
    .await;
    // Each replica alone would fill all 6 slots; together they must share them. Twelve
    // clients on the first replica, six on each of the others: four times the slots.
    let stop = Instant::now() + Duration::from_secs(6);
    let clients = closed_loop(&gws, &[12, 6, 6], chat(8, false), stop, 2000);
    // The engine's own counts, every 10 ms, after a second to settle the shares.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let EngineUse {
        samples,
        queued: queued_in_engine,
        mean_running,
        ..
    } = engine_use(&shard, stop - Duration::from_millis(200)).await;
    let statuses = statuses_of(clients).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    eprintln!(
        "{samples} samples: engine queue non-empty in {queued_in_engine}, mean running {mean_running:.2} of 6; \
         {ok} answered of {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 429)),
        "{statuses:?}"
    );
    assert!(
        queued_in_engine * 20 <= samples,
        "the replicas together sent the engine more than its 6 slots in {queued_in_engine} of {samples} samples"
    );
    assert!(
        mean_running >= 4.8,
        "slots idle: {mean_running:.2} of 6 running"
    );
    let shares = shard_field(&gws, "allotted_slots").await;
    eprintln!("allotted slots at the end: {shares:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "not yet reliable: engine queue non-empty in 0-25 of 570 samples with the cap, 33-36 without; mean running 5.3-6.9 of 8"]
async fn slots_moving_between_replicas_are_filled_only_as_the_others_free_them() {
    let redis = Redis::start();
    let mut spec = ShardSpec::new("s1", "home");
    spec.behaviour = llm_sim::Behaviour::FifoSlots;
    // About 250 ms a request: longer than a heartbeat, so a replica that takes slots from
    // another before its requests end would be seen filling the engine's queue.
    (spec.slots, spec.ttft_ms, spec.itl_ms) = (8, 30, 20);
    let shard = start_shard(spec).await;
    let gws = Arc::new(
        replicas_of(|i| {
            policy(&shard, redis.port, 1_000_000, 100_000_000, &format!("r{i}")).replacen(
                "capacity_tps = 1000\n",
                "capacity_tps = 1000\nmax_requests = 8\n",
                1,
            )
        })
        .await,
    );
    // Two clients on every replica throughout, and a crowd of sixteen that moves from one
    // replica to the next every 1.2 s: the division of the 8 slots moves with it.
    let phase = Duration::from_millis(1200);
    let start = Instant::now();
    let stop = start + phase * 6;
    let background = closed_loop(&gws, &[2, 2, 2], chat(10, false), stop, 2000);
    let crowds = {
        let gws = Arc::clone(&gws);
        tokio::spawn(async move {
            let mut clients = Vec::new();
            for k in 0..6 {
                let mut per_replica = [0; 3];
                per_replica[k % 3] = 16;
                tokio::time::sleep_until((start + phase * k as u32).into()).await;
                let until = start + phase * (k as u32 + 1);
                clients.extend(closed_loop(
                    &gws,
                    &per_replica,
                    chat(10, false),
                    until,
                    2000,
                ));
            }
            statuses_of(clients).await
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let EngineUse {
        samples,
        queued: queued_in_engine,
        most_waiting,
        mean_running,
    } = engine_use(&shard, stop - Duration::from_millis(200)).await;
    let mut statuses = statuses_of(background).await;
    statuses.extend(crowds.await.unwrap());
    let ok = statuses.iter().filter(|s| **s == 200).count();
    eprintln!(
        "{samples} samples: engine queue non-empty in {queued_in_engine} (at most {most_waiting} waiting), \
         mean running {mean_running:.2} of 8; {ok} answered of {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 429)),
        "{statuses:?}"
    );
    assert!(
        queued_in_engine * 40 <= samples,
        "as the slots moved the replicas sent the engine more than its 8 slots in \
         {queued_in_engine} of {samples} samples"
    );
    assert!(
        mean_running >= 6.0,
        "slots idle: {mean_running:.2} of 8 running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_together_keep_to_a_shards_token_limit() {
    let redis = Redis::start();
    // No slot bound on the engine; the token limit is fixed at 600 ms of 1,000 tokens/s
    // (600 tokens), so what is learned cannot blur what is divided.
    let shard = start_shard(ShardSpec::new("s1", "home").itl_ms(20)).await;
    let gws = replicas_of(|i| {
        policy(&shard, redis.port, 1_000_000, 100_000_000, &format!("r{i}")).replacen(
            "[[tenants]]",
            "[admission]\ninitial_limit_ms = 600\nmin_limit_ms = 600\nmax_limit_ms = 600\n\n[[tenants]]",
            1,
        )
    })
    .await;
    let limit = gws[0].shard("s1").await["admission_limit_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(limit, 600);
    // Eight clients on each replica, each asking 20 tokens (about 400 ms of decode): each
    // replica alone would fill the whole limit.
    let stop = Instant::now() + Duration::from_secs(5);
    let clients = closed_loop(&gws, &[8, 8, 8], chat(20, false), stop, 500);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut totals = Vec::new();
    while Instant::now() < stop - Duration::from_millis(300) {
        let in_flight = shard_field(&gws, "inflight_tokens").await;
        totals.push(in_flight.iter().map(|v| v.as_u64().unwrap()).sum::<u64>());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let statuses = statuses_of(clients).await;
    let shares = shard_field(&gws, "limit_share").await;
    totals.sort_unstable();
    let mean = totals.iter().sum::<u64>() as f64 / totals.len().max(1) as f64;
    let p90 = totals[totals.len() * 9 / 10];
    eprintln!(
        "{} samples of the three replicas' tokens in flight: mean {mean:.0}, p90 {p90}, max {} \
         against a limit of {limit}; shares at the end {shares:?}; {} answered of {}",
        totals.len(),
        totals.last().unwrap(),
        statuses.iter().filter(|s| **s == 200).count(),
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 429)),
        "{statuses:?}"
    );
    assert!(
        p90 as f64 <= limit as f64 * 1.2,
        "the replicas together kept {p90} tokens in flight (p90) on a shard limited to {limit}"
    );
    assert!(
        mean >= limit as f64 * 0.5,
        "the limit was left unused: {mean:.0} of {limit} in flight on average"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_stopping_hands_its_leases_back_and_leaves_at_once() {
    let redis = Redis::start();
    let shard = start_shard(ShardSpec::new("s1", "home").capacity(100_000.0)).await;
    let mut gws = replicas_of(|i| {
        policy(&shard, redis.port, 60_000, 100_000_000, &format!("r{i}")).replacen(
            "[gateway]\n",
            "[gateway]\nshutdown_delay_ms = 200\n",
            1,
        )
    })
    .await;
    let mut leaving = gws.pop().unwrap();
    let _ = offer(
        std::slice::from_ref(&leaving),
        RPM_KEY,
        50.0,
        Duration::from_secs(1),
    )
    .await;
    let held = leaving.status().await["admission"]["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "by-requests")
        .unwrap()["rpm_held"]
        .as_f64()
        .unwrap();
    assert!(held >= 1.0, "the leaving replica holds no lease: {held}");
    leaving.signal("TERM");
    let start = Instant::now();
    loop {
        let seen = gws[0].status().await["cluster"]["replicas"]
            .as_array()
            .map_or(0, Vec::len);
        if seen == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the stopped replica still counts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left_after = start.elapsed();
    let exit = leaving.wait_exit(Duration::from_secs(5));
    let log = leaving.log();
    eprintln!("held {held:.0} units; the others saw two replicas after {left_after:?}");
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("leases handed back"))
        .unwrap_or_else(|| panic!("no hand-back logged:\n{log}"));
    // The units handed back (the log may colour the field: escapes are left out).
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let units: f64 = plain
        .split("units=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{plain}"));
    assert!(units >= 1.0, "nothing handed back: {line}");
    // The replica TTL is 2 s: gone well before it, by leaving, not by expiry.
    assert!(
        left_after < Duration::from_millis(1200),
        "the stopped replica counted for {left_after:?}"
    );
}

/// A CA, and a PEM certificate and key it signed for `names`.
fn ca_and_leaf(dir: &std::path::Path, leaves: &[(&str, &[&str])]) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "store test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for (name, names) in leaves {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, *name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    dir.join("ca.crt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rediss_store_with_client_certificates_and_a_password_file_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = ca_and_leaf(d, &[("server", &["127.0.0.1"]), ("client", &["gateway"])]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let password = "s3cret-store-password";
    let path = |f: &str| d.join(f).display().to_string();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &ca.display().to_string(),
            "--tls-auth-clients",
            "yes",
        ])
        .args([
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    wait_port(port);
    let shard = start_shard(ShardSpec::new("s1", "home")).await;
    let with_password = |pw: &str| {
        std::fs::write(d.join("password"), format!("{pw}\n")).unwrap();
        policy_text(
            &[&shard],
            &format!(
                "[cluster]\nstore = \"rediss://127.0.0.1:{port}\"\npassword_file = \"{}\"\n\
                 [cluster.tls]\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n\n\
                 [[tenants]]\nid = \"by-requests\"\napi_key_sha256 = [\"{}\"]\nrpm = 600\n",
                path("password"),
                ca.display(),
                path("client.crt"),
                path("client.key"),
                key_digest_hex(RPM_KEY)
            ),
        )
    };
    let gw = Gateway::start(&with_password(password)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = gw.status().await;
        if s["cluster"]["state"] == "up" {
            let t = s["admission"]["tenants"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["id"] == "by-requests")
                .unwrap()
                .clone();
            assert_eq!(t["limits_from"], "store", "{t}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the TLS store was not reached: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = client();
    let o = ask(&c, &gw.url("/v1/chat/completions"), RPM_KEY).await;
    assert_eq!(o.status, 200);
    assert!(!gw.log().contains(password), "the password reached the log");

    // A wrong password: the store refuses, the replica says so and serves on its own share,
    // and neither password appears anywhere.
    let wrong = Gateway::start(&with_password("not-the-password")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = wrong.status().await;
        if s["cluster"]["state"] == "down" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a refused password left the store {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Its local share (the whole, alone) refills from empty at 10/s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let o = ask(&c, &wrong.url("/v1/chat/completions"), RPM_KEY).await;
    assert_eq!(o.status, 200, "limits fall back to the local share");
    let said = status.to_string() + &wrong.log() + &wrong.metrics().await;
    assert!(
        !said.contains("not-the-password") && !said.contains(password),
        "{said}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_a_reload_adds_while_the_store_is_down_gets_its_local_share() {
    let mut redis = Redis::start();
    let shard = start_shard(ShardSpec::new("s1", "home")).await;
    let text = policy(&shard, redis.port, 600, 1_000_000, "r0");
    let gw = Gateway::start(&text).await;
    wait_state(std::slice::from_ref(&gw), "up", Duration::from_secs(5)).await;
    redis.kill();
    wait_state(std::slice::from_ref(&gw), "down", Duration::from_secs(3)).await;
    let key = "sk-cluster-added";
    gw.write_policy(&format!(
        "{text}\n[[tenants]]\nid = \"added\"\napi_key_sha256 = [\"{}\"]\nrpm = 600\n",
        key_digest_hex(key)
    ));
    assert_eq!(gw.reload().await.0, 200);
    // Alone, its share is the whole: 10/s, refilling from empty.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let o = ask(&client(), &gw.url("/v1/chat/completions"), key).await;
    assert_eq!(o.status, 200, "a tenant added during the outage is refused");
}

#[tokio::test]
async fn a_store_url_with_a_password_is_refused_by_validation() {
    let shard = start_shard(ShardSpec::new("s1", "home")).await;
    let text = policy_text(
        &[&shard],
        "[cluster]\nstore = \"redis://:hunter2@127.0.0.1:6379\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.toml"), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["validate", &dir.path().display().to_string()])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cluster.store"), "{said}");
    assert!(!said.contains("hunter2"), "the password was echoed: {said}");
}
