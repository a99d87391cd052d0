//! Fault injection under bounded concurrent load: what clients saw when a shard went
//! down, hung or returned errors, when everything failed, and when the home region went
//! down. Each scenario prints its figures (`cargo test --test faults -- --nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use llm_sim::FaultMode;

/// Fast health settings so scenarios play out in seconds.
const FAST_HEALTH: &str = "
[health]
check_interval_ms = 200
check_timeout_ms = 150
base_ejection_ms = 2000
max_ejection_ms = 10000
ejection_jitter_ms = 0
";

fn failed(records: &[Record]) -> usize {
    records.iter().filter(|r| r.status != 200).count()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Milliseconds from `since` (Unix ms) to the first transition of `shard` out of healthy.
async fn detection_ms(gw: &Gateway, shard: &str, since: u64) -> Option<u64> {
    let events = gw.events().await;
    events["events"]
        .as_array()?
        .iter()
        .filter(|e| e["shard"] == shard && e["from"] == "healthy")
        .filter_map(|e| e["at_unix_ms"].as_u64())
        .find(|at| *at >= since)
        .map(|at| at - since)
}

/// Upstream attempts per client request over the whole run, from the gateway's metrics.
async fn amplification(gw: &Gateway, records: &[Record]) -> f64 {
    attempts(gw, "").await as f64 / records.len().max(1) as f64
}

/// Upstream attempts the gateway made on `shard` (every shard for ""), from its metrics.
async fn attempts(gw: &Gateway, shard: &str) -> u64 {
    let text = gw.metrics().await;
    text.lines()
        .filter(|l| {
            l.starts_with("breakwater_upstream_attempts_total")
                && (shard.is_empty() || l.contains(&format!("shard=\"{shard}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn state_of(gw: &Gateway, shard: &str) -> String {
    gw.shard(shard).await["state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_that_goes_down_under_load_costs_no_request_and_stops_getting_traffic_within_1s() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], FAST_HEALTH)).await;
    let mut at_1s = 0;
    let mut fault_at = 0;
    let (records, _) = load(&gw, 8, Duration::from_secs(3), 4, async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        fault_at = unix_ms();
        a.fault(FaultMode::Down);
        tokio::time::sleep(Duration::from_secs(1)).await;
        at_1s = attempts(&gw, "a").await;
    })
    .await;
    let at_end = attempts(&gw, "a").await;
    let after: Vec<&Record> = records
        .iter()
        .filter(|r| r.sent_at > Duration::from_secs(1))
        .collect();
    eprintln!(
        "down: {} requests, {} failed; detected in {:?} ms; amplification {:.3}; attempts on the dead shard between 1 s after the fault and the end: {}",
        records.len(),
        failed(&records),
        detection_ms(&gw, "a", fault_at).await,
        amplification(&gw, &records).await,
        at_end - at_1s
    );
    assert_eq!(failed(&records), 0);
    assert!(after.len() > 50);
    assert_eq!(
        at_end, at_1s,
        "the dead shard was still tried more than 1 s after it went down"
    );
    assert_eq!(state_of(&gw, "a").await, "ejected");
    assert_eq!(gw.wait_ledger_zero().await, 0);
    // The same in Prometheus.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("breakwater_shard_state{shard=\"a\",state=\"ejected\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("breakwater_shard_state{shard=\"b\",state=\"healthy\"} 1"));
    let transitions: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("breakwater_health_transitions_total "))
        .unwrap_or_else(|| panic!("no transitions metric: {metrics}"))
        .parse()
        .unwrap();
    assert!(transitions >= 1, "{transitions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_returning_500s_is_ejected_and_clients_see_no_error() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    // Checks off: this scenario is about passive detection alone.
    let health = FAST_HEALTH
        .replace("check_interval_ms = 200", "check_interval_ms = 0")
        .replace("check_timeout_ms = 150\n", "");
    let gw = Gateway::start(&policy_text(&[&a, &b], &health)).await;
    let (mut before, mut fault_at) = (0, 0);
    let (records, _) = load(&gw, 6, Duration::from_secs(2), 4, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        before = a.stats().requests_total;
        fault_at = unix_ms();
        a.fault(FaultMode::Error);
    })
    .await;
    let to_a = a.stats().requests_total - before;
    eprintln!(
        "500s: {} requests, {} failed; detected in {:?} ms; amplification {:.3}; the failing shard got {to_a} before ejection",
        records.len(),
        failed(&records),
        detection_ms(&gw, "a", fault_at).await,
        amplification(&gw, &records).await
    );
    assert_eq!(failed(&records), 0);
    // 5 consecutive failures eject it; requests already in flight at that moment add at
    // most one per client (a few successes before the fault may have been counted too).
    assert!(to_a <= 5 + 6 + 6, "{to_a}");
    assert_eq!(state_of(&gw, "a").await, "ejected");
    let events = gw.events().await;
    let e = &events["events"][0];
    assert_eq!(
        (e["shard"].as_str(), e["from"].as_str(), e["to"].as_str()),
        (Some("a"), Some("healthy"), Some("ejected"))
    );
    assert!(e["reason"].as_str().unwrap().contains("status 500"), "{e}");
    // Without checks, it comes back when its ejection time (2 s) is up.
    a.fault(FaultMode::Ok);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state_of(&gw, "a").await != "healthy" {
        assert!(Instant::now() < deadline, "not re-admitted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_shard_costs_clients_one_first_byte_timeout_at_most_and_is_ejected() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let gw = Gateway::start(&policy_text(
        &[&a, &b],
        &format!("{FAST_HEALTH}\n[timeouts]\nfirst_byte_ms = 500\n"),
    ))
    .await;
    let fault_at = unix_ms();
    a.fault(FaultMode::Hang);
    let (records, _) = load(&gw, 4, Duration::from_secs(2), 4, async {}).await;
    let slowest = records.iter().map(|r| r.took).max().unwrap();
    let slow = records
        .iter()
        .filter(|r| r.took > Duration::from_millis(400))
        .count();
    eprintln!(
        "hang: {} requests, {} failed, {slow} waited out the timeout, slowest {slowest:?}; detected in {:?} ms; amplification {:.3}",
        records.len(),
        failed(&records),
        detection_ms(&gw, "a", fault_at).await,
        amplification(&gw, &records).await
    );
    assert_eq!(failed(&records), 0);
    // The first-byte timeout (500 ms), one backoff (≤ 25 ms) and a normal answer.
    assert!(slowest < Duration::from_millis(900), "{slowest:?}");
    // 3 timeouts eject it (more may be in flight at that moment).
    assert!(slow <= 3 + 4, "{slow}");
    assert_eq!(state_of(&gw, "a").await, "ejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_everything_fails_retries_stay_within_the_budget_and_errors_are_fast() {
    let shards = [
        start_shard(ShardSpec::new("a", "home")).await,
        start_shard(ShardSpec::new("b", "home")).await,
        start_shard(ShardSpec::new("c", "away")).await,
    ];
    for s in &shards {
        s.fault(FaultMode::Error);
    }
    let gw = Gateway::start(&policy_text(
        &shards.iter().collect::<Vec<_>>(),
        FAST_HEALTH,
    ))
    .await;
    let workers = 20;
    let (records, _) = load(&gw, workers, Duration::from_secs(2), 4, async {}).await;
    let upstream: u64 = shards.iter().map(|s| s.stats().requests_total).sum();
    let amplification = upstream as f64 / records.len() as f64;
    let mut took: Vec<Duration> = records.iter().map(|r| r.took).collect();
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    eprintln!("all failing: {} requests, {upstream} upstream attempts, amplification {amplification:.2}, p99 {p99:?}", records.len());
    assert!(
        records.iter().all(|r| r.status == 502 || r.status == 503),
        "{:?}",
        records.iter().find(|r| r.status != 502)
    );
    // Budget: retries in flight ≤ max(3, 20 % of 20 requests) = 4, so at most ~4 in 20
    // requests carry extra attempts (each at most 2 more): amplification ≤ 1 + 2 × 4/20.
    assert!(
        amplification <= 1.4 + 0.05,
        "amplification {amplification:.2}"
    );
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_home_region_goes_down_the_other_serves_everything_within_3s_and_none_fail() {
    let h1 = start_shard(ShardSpec::new("h1", "home")).await;
    let h2 = start_shard(ShardSpec::new("h2", "home")).await;
    let w1 = start_shard(ShardSpec::new("w1", "away")).await;
    let w2 = start_shard(ShardSpec::new("w2", "away")).await;
    let gw = Gateway::start(&policy_text(&[&h1, &h2, &w1, &w2], FAST_HEALTH)).await;
    let mut fault_at = 0;
    let (records, _) = load(&gw, 8, Duration::from_secs(6), 4, async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        fault_at = unix_ms();
        h1.fault(FaultMode::Down);
        h2.fault(FaultMode::Down);
        tokio::time::sleep(Duration::from_secs(3)).await;
        h1.fault(FaultMode::Ok);
        h2.fault(FaultMode::Ok);
    })
    .await;
    let home = |r: &&Record| r.shard.starts_with('h');
    let window = |from: u64, to: u64| {
        records.iter().filter(move |r| {
            r.sent_at >= Duration::from_millis(from) && r.sent_at < Duration::from_millis(to)
        })
    };
    let first_away_only = window(1000, 4000).filter(home).map(|r| r.sent_at).max();
    let back_home = window(4000, 6000).filter(home).count();
    eprintln!(
        "region down: {} requests, {} failed; last home answer after the fault at {:?}; {back_home} home answers after recovery; detected in {:?}/{:?} ms; amplification {:.3}",
        records.len(),
        failed(&records),
        first_away_only,
        detection_ms(&gw, "h1", fault_at).await,
        detection_ms(&gw, "h2", fault_at).await,
        amplification(&gw, &records).await
    );
    for r in records.iter().filter(|r| r.status != 200) {
        eprintln!("  failed: {r:?}");
    }
    assert_eq!(failed(&records), 0);
    // From the fault on, every answer came from the other region (refused connections
    // are retried at once, so no client saw the dead region).
    assert!(first_away_only.is_none());
    assert!(window(1000, 4000).count() > 100);
    // When the home region comes back, traffic returns to it.
    assert!(back_home > 0, "no traffic returned home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_the_gateway_cannot_see_still_moves_traffic_through_engine_metrics() {
    // Shard a is busy with 16 long requests sent straight to it (another gateway replica,
    // or a client that bypasses this one); the gateway learns it from a's own /metrics.
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(20)).await;
    let b = start_shard(ShardSpec::new("b", "home").itl_ms(20)).await;
    let health = format!("{FAST_HEALTH}metrics_interval_ms = 100\n");
    let gw = Gateway::start(&policy_text(&[&a, &b], &health)).await;
    let mut direct = Vec::new();
    for _ in 0..16 {
        let url = format!("{}/v1/chat/completions", a.sim.url());
        direct.push(tokio::spawn(async move {
            let _ = client().post(url).json(&chat(200, false)).send().await;
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = gw.shard("a").await;
        if s["running"].as_f64().unwrap_or(0.0) >= 16.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the engine's load never showed: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut to_a = 0;
    for _ in 0..20 {
        if gw.chat_ok().await["x-breakwater-shard"] == "a" {
            to_a += 1;
        }
    }
    eprintln!("engine metrics: {to_a} of 20 requests went to the shard busy with direct traffic");
    assert_eq!(to_a, 0);
    for d in direct {
        d.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_that_stops_generating_while_its_health_says_ok_is_ejected() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let health = format!("{FAST_HEALTH}metrics_interval_ms = 100\nsilent_death_ms = 1000\n");
    let gw = Gateway::start(&policy_text(
        &[&a, &b],
        &format!("{health}\n[timeouts]\nfirst_byte_ms = 4000\n"),
    ))
    .await;
    // Requests are admitted and then nothing comes out (a stalled engine core); /health
    // still answers 200, and no request has timed out yet when the detector fires.
    a.set_fault(llm_sim::Fault {
        factor: 1000.0,
        ..llm_sim::Fault::new(FaultMode::Slow)
    });
    let started = Instant::now();
    let mut ejected_after = None;
    let (records, _) = load(&gw, 4, Duration::from_secs(3), 4, async {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let events = gw.events().await;
            if let Some(e) = events["events"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["shard"] == "a" && e["to"] == "ejected")
            {
                ejected_after =
                    Some((started.elapsed(), e["reason"].as_str().unwrap().to_string()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    eprintln!("silent death: {ejected_after:?}");
    let (after, reason) = ejected_after.expect("never ejected");
    assert!(
        reason.contains("silent death") && reason.contains("no token generated"),
        "{reason}"
    );
    // Detected within the 1 s limit plus a couple of 100 ms scrapes, before any first-byte
    // timeout (4 s) could have ejected it.
    assert!(after < Duration::from_millis(2500), "{after:?}");
    // Requests already waiting on the stalled engine wait out their first-byte timeout and
    // are retried elsewhere; none fails.
    assert!(records.iter().all(|r| r.status == 200), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flapping_shard_is_ejected_for_longer_each_time_and_gets_a_small_share() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let health = format!("{FAST_HEALTH}slow_start_ms = 1000\n");
    let gw = Gateway::start(&policy_text(&[&a, &b], &health)).await;
    // Down and up every 2 s, four times.
    let flap = async {
        for _ in 0..4 {
            a.fault(FaultMode::Down);
            tokio::time::sleep(Duration::from_secs(1)).await;
            a.fault(FaultMode::Ok);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let (records, ()) = load(&gw, 6, Duration::from_secs(8), 4, flap).await;
    let share = records.iter().filter(|r| r.shard == "a").count() as f64 / records.len() as f64;
    let s = gw.shard("a").await;
    let ejections = s["ejection_count"].as_u64().unwrap();
    let events = gw.events().await;
    let lengths: Vec<String> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .filter(|r| r.starts_with("ejected for"))
        .map(|r| r.split_whitespace().nth(2).unwrap_or("").to_string())
        .collect();
    eprintln!(
        "flapping: {} requests, {} failed; its share {share:.2}; {ejections} ejections, lengths (ms) {lengths:?}; amplification {:.3}",
        records.len(),
        failed(&records),
        amplification(&gw, &records).await
    );
    assert_eq!(failed(&records), 0);
    assert!(ejections >= 2, "{s}");
    // Each ejection lasts longer than the one before (2 s, 4 s, ...).
    let ms: Vec<u64> = lengths.iter().filter_map(|l| l.parse().ok()).collect();
    assert!(ms.windows(2).all(|w| w[1] > w[0]), "{ms:?}");
    // Half the time up, but ejected for growing stretches and ramped in slowly: well under
    // the half it would get if healthy.
    assert!(share < 0.25, "share {share:.2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_half_the_home_region_spills_the_surplus_by_the_overprovisioning_rule() {
    let h1 = start_shard(ShardSpec::new("h1", "home")).await;
    let h2 = start_shard(ShardSpec::new("h2", "home")).await;
    let w1 = start_shard(ShardSpec::new("w1", "away")).await;
    let w2 = start_shard(ShardSpec::new("w2", "away")).await;
    let gw = Gateway::start(&policy_text(&[&h1, &h2, &w1, &w2], FAST_HEALTH)).await;
    let (records, ()) = load(&gw, 8, Duration::from_secs(4), 4, async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        h1.fault(FaultMode::Down);
    })
    .await;
    let share_away = |from: u64, to: u64| {
        let window: Vec<&Record> = records
            .iter()
            .filter(|r| {
                r.sent_at >= Duration::from_millis(from) && r.sent_at < Duration::from_millis(to)
            })
            .collect();
        window.iter().filter(|r| r.shard.starts_with('w')).count() as f64 / window.len() as f64
    };
    let (before, after) = (share_away(0, 1000), share_away(1500, 4000));
    eprintln!(
        "partial region loss: away share {before:.2} before, {after:.2} after (rule: 1 - 0.5 x 1.4 = 0.30); {} failed; amplification {:.3}",
        failed(&records),
        amplification(&gw, &records).await
    );
    assert_eq!(failed(&records), 0);
    assert_eq!(before, 0.0);
    // Half the home capacity healthy × 1.4 keeps 70 % home; 30 % spills, ±0.08.
    assert!((0.22..=0.38).contains(&after), "{after:.2}");
}

/// Fills a one-slot engine: one long request holds the slot, six more queue behind it.
fn saturate(shard: &Shard) -> Vec<tokio::task::JoinHandle<()>> {
    (0..7)
        .map(|_| {
            let url = format!("{}/v1/chat/completions", shard.sim.url());
            tokio::spawn(async move {
                let _ = client().post(url).json(&chat(400, false)).send().await;
            })
        })
        .collect()
}

async fn wait_queue(gw: &Gateway, shard: &str, depth: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = gw.shard(shard).await;
        if s["queue_depth"].as_f64().unwrap_or(0.0) >= depth {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{shard} never showed a queue: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_home_spills_and_a_429_from_a_saturated_pool_is_not_retried_into_it() {
    let spec = |id, region| ShardSpec {
        slots: 1,
        ..ShardSpec::new(id, region).itl_ms(50)
    };
    let h1 = start_shard(spec("h1", "home")).await;
    let h2 = start_shard(spec("h2", "home")).await;
    let w1 = start_shard(ShardSpec::new("w1", "away")).await;
    let health = format!("{FAST_HEALTH}metrics_interval_ms = 100\n");
    let gw = Gateway::start(&policy_text(&[&h1, &h2, &w1], &health)).await;
    let mut held = saturate(&h1);
    held.extend(saturate(&h2));
    wait_queue(&gw, "h1", 5.0).await;
    wait_queue(&gw, "h2", 5.0).await;
    // Spill on saturation: new requests go to the region with headroom.
    let mut away = 0;
    for _ in 0..10 {
        away += usize::from(gw.chat_ok().await["x-breakwater-region"] == "away");
    }
    eprintln!("saturation: {away} of 10 requests spilled to the region with headroom");
    assert_eq!(away, 10);

    // The same pool answering 429, and no other region to go to: the client gets a fast
    // 429 after one attempt; the saturated pool's other shard is not tried. (With
    // admission on, the gateway would not send to a saturated pool at all: admission off
    // lets the shard's own 429 be seen.)
    let no_admission = format!("{health}\n[admission]\nenabled = false\n");
    let gw1 = Gateway::start(&policy_text(&[&h1, &h2], &no_admission)).await;
    wait_queue(&gw1, "h1", 5.0).await;
    wait_queue(&gw1, "h2", 5.0).await;
    h1.set_fault(llm_sim::Fault {
        status: 429,
        ..llm_sim::Fault::new(FaultMode::Error)
    });
    h2.set_fault(llm_sim::Fault {
        status: 429,
        ..llm_sim::Fault::new(FaultMode::Error)
    });
    let before = h1.stats().requests_total + h2.stats().requests_total;
    let started = Instant::now();
    let r = client()
        .post(gw1.url("/v1/chat/completions"))
        .json(&chat(2, false))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let attempts = h1.stats().requests_total + h2.stats().requests_total - before;
    eprintln!("429 from a saturated pool: {attempts} attempt(s), answered in {took:?}");
    assert_eq!(attempts, 1);
    assert!(took < Duration::from_millis(500), "{took:?}");
    for h in held {
        h.abort();
    }
}

/// How a keep-alive engine ends its connections.
#[derive(Clone, Copy, Debug)]
enum Closing {
    /// Right after each answer, without `Connection: close`: the gateway learns of it only
    /// from the socket, while the connection sits in its pool.
    AfterEachAnswer,
    /// When the second request arrives on a connection, unanswered — an idle timeout
    /// (uvicorn's is 5 s) firing just as the gateway reuses the connection.
    OnTheSecondRequest,
    /// Never: only the gateway closes them.
    Never,
}

/// A minimal keep-alive engine: its address, completions answered, and connections that
/// carried completions and are still open.
struct RawEngine {
    addr: String,
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
    open: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// A minimal keep-alive engine that closes connections as `closing` says.
async fn engine_closing_connections(closing: Closing) -> RawEngine {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let open = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let count = served.clone();
    let open_count = open.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let count = count.clone();
            let open = open_count.clone();
            tokio::spawn(async move {
                // Counted as open once it has carried a completion (health checks and
                // metric scrapes come on connections of their own).
                struct Counted(Option<std::sync::Arc<std::sync::atomic::AtomicI64>>);
                impl Drop for Counted {
                    fn drop(&mut self) {
                        if let Some(open) = &self.0 {
                            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
                let mut counted = Counted(None);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for nth in 0.. {
                    // One request: its head, then as many body bytes as it declares.
                    let body_start = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    if nth == 1 && matches!(closing, Closing::OnTheSecondRequest) {
                        return;
                    }
                    let head = String::from_utf8_lossy(&buf[..body_start]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < body_start + length {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..body_start + length);
                    if head.starts_with("post /v1/chat/completions") {
                        count.fetch_add(1, Ordering::SeqCst);
                        if counted.0.is_none() {
                            open.fetch_add(1, Ordering::SeqCst);
                            counted.0 = Some(open.clone());
                        }
                    }
                    let body = r#"{"id":"c","object":"chat.completion","model":"test-model","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if matches!(closing, Closing::AfterEachAnswer) {
                        return;
                    }
                }
            });
        }
    });
    RawEngine { addr, served, open }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_the_engine_closes_cost_no_request_and_no_health() {
    for closing in [Closing::AfterEachAnswer, Closing::OnTheSecondRequest] {
        let RawEngine { addr, served, .. } = engine_closing_connections(closing).await;
        let policy = one_shard_policy("closer", &addr, "");
        let gw = Gateway::start(&policy).await;
        let requests = 40;
        for i in 0..requests {
            // Half right after the previous answer, half after a pause.
            if i % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let resp = client()
                .post(gw.url("/v1/chat/completions"))
                .json(&chat(1, false))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{closing:?}: request {i}");
        }
        // Each request was answered once, on one attempt that counted as a success.
        assert_eq!(
            served.load(std::sync::atomic::Ordering::SeqCst),
            requests,
            "{closing:?}"
        );
        let text = gw.metrics().await;
        let not_ok: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("breakwater_upstream_attempts_total") && !l.contains("outcome=\"ok\"")
            })
            .collect();
        assert!(not_ok.is_empty(), "{closing:?}: {not_ok:?}");
        assert_eq!(attempts(&gw, "closer").await, requests, "{closing:?}");
        assert_eq!(gw.shard("closer").await["ejection_count"], 0, "{closing:?}");
        assert_eq!(state_of(&gw, "closer").await, "healthy", "{closing:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_closes_upstream_connections_left_idle() {
    let engine = engine_closing_connections(Closing::Never).await;
    let policy = one_shard_policy("idle", &engine.addr, "[timeouts]\npool_idle_ms = 1500\n");
    let gw = Gateway::start(&policy).await;
    let sends = (0..8).map(|_| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(1, false))
            .send()
    });
    for resp in futures_util::future::join_all(sends).await {
        assert_eq!(resp.unwrap().status(), 200);
    }
    let open = |e: &RawEngine| e.open.load(std::sync::atomic::Ordering::SeqCst);
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(open(&engine) >= 1, "kept for reuse");
    // Kept for pool_idle_ms (1.5 s) after their last use, swept once a second, with no new
    // request to the shard.
    let deadline = done + Duration::from_secs(5);
    while open(&engine) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed_after = done.elapsed();
    assert_eq!(open(&engine), 0, "idle connections still open after 5 s");
    assert!(
        closed_after >= Duration::from_millis(1400),
        "closed too early: {closed_after:?}"
    );
    eprintln!(
        "idle upstream connections closed {} ms after their last use (pool_idle_ms 1500)",
        closed_after.as_millis()
    );
}
