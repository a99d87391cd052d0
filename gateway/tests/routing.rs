//! Token-weighted routing under real concurrent load: shards receive work in proportion to
//! their capacity, and a shard busy with long requests gets fewer new ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// The tests here measure how load splits; each takes this in turn so that one's load
/// (clients, simulated engines, a gateway, all on the same cores) does not skew the other's
/// measurement. Seen once with both at once on 2 cores: a 3.58 ratio where 2.0 is measured
/// alone.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_with_twice_the_capacity_gets_about_twice_the_tokens() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let big = start_shard(ShardSpec::new("big", "home").capacity(2000.0)).await;
    let small = start_shard(ShardSpec::new("small", "home").capacity(1000.0)).await;
    let gw = Gateway::start(&policy_text(&[&big, &small], "")).await;
    // 24 clients, each sending 20-token requests back to back for 4 s (at most 300 each):
    // enough to keep both engines' batches busy.
    let stop = Instant::now() + Duration::from_secs(4);
    let mut clients = Vec::new();
    for _ in 0..24 {
        let url = gw.url("/v1/chat/completions");
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut ok = 0u32;
            for _ in 0..300 {
                if Instant::now() >= stop {
                    break;
                }
                let r = c.post(&url).json(&chat(20, false)).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                ok += 1;
            }
            ok
        }));
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    let (b, s) = (
        big.stats().generation_tokens_total,
        small.stats().generation_tokens_total,
    );
    let ratio = b as f64 / s.max(1) as f64;
    eprintln!("big {b} tokens, small {s} tokens, ratio {ratio:.2}, {total} requests");
    // Tolerance: ±25 % around the capacity ratio of 2. (On failure, the shards' state
    // transitions say whether one was ejected and slow-starting meanwhile.)
    if !(1.5..=2.5).contains(&ratio) {
        panic!(
            "big {b}, small {s}, ratio {ratio:.2} over {total} requests; events {}",
            gw.events().await
        );
    }
    assert!(total > 100, "{total}");
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_busy_with_a_long_request_gets_the_short_ones() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(20)).await;
    let b = start_shard(ShardSpec::new("b", "home").itl_ms(20)).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], "")).await;
    // One long generation (2,000 tokens charged) occupies one shard.
    let long = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(2000, true))
        .send()
        .await
        .unwrap();
    let busy = long.headers()["x-breakwater-shard"]
        .to_str()
        .unwrap()
        .to_string();
    let mut long_stream = long.bytes_stream();
    long_stream.next().await.unwrap().unwrap();
    // Twenty short requests while it runs: every one goes to the other shard, because
    // the busy one carries far more in-flight tokens per unit of capacity.
    let mut to_busy = 0;
    for _ in 0..20 {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(3, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if r.headers()["x-breakwater-shard"] == busy.as_str() {
            to_busy += 1;
        }
        r.bytes().await.unwrap();
    }
    assert_eq!(
        to_busy, 0,
        "the busy shard {busy} got {to_busy} of 20 short requests"
    );
    drop(long_stream);
    assert_eq!(gw.wait_ledger_zero().await, 0);
}
