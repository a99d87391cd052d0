//! Admission on engines it is not told about: batch slots learned from the engines' own
//! running and waiting counts, so no slot idles while a request waits in the gateway, on
//! a FIFO-slot engine (vLLM's `max_num_seqs`) and on one whose KV cache bounds the batch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use llm_sim::Behaviour;

/// Nothing about slots in the policy; every request critical (so none is refused for a
/// standing queue and the queue holds everyone the engine cannot start); engines scraped
/// every 100 ms.
const POLICY: &str = "[health]\nmetrics_interval_ms = 100\n\n\
                      [admission]\ndefault_priority = \"critical\"\nqueue_timeout_ms = 5000\n";

/// `clients` closed loops of streamed requests of `tokens` for `length`; the statuses.
async fn closed_loops(gw: &Gateway, clients: usize, tokens: u64, length: Duration) -> Vec<u16> {
    let until = Instant::now() + length;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = gw.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut got = Vec::new();
            while Instant::now() < until {
                let r = c.post(&url).json(&chat(tokens, true)).send().await.unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert!(status != 200 || body.contains("[DONE]"), "{body}");
                got.push(status);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Every 20 ms until `stop`: (requests waiting in the gateway's queue, the engine's
/// running, the engine's waiting).
async fn sample(gw: &Gateway, shard: &Shard, stop: &AtomicBool) -> Vec<(u64, u64, u64)> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let queued: u64 = gw.status().await["admission"]["queue_depth"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        let st = shard.stats();
        samples.push((queued, st.running, st.waiting));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples
}

/// An engine of four FIFO slots (a waiting queue behind them), `ttft_ms` to the first
/// token and 10 ms a token whatever the batch.
async fn four_fifo_slots(ttft_ms: u64) -> Shard {
    start_shard(ShardSpec {
        slots: 4,
        ttft_ms,
        behaviour: Behaviour::FifoSlots,
        ..ShardSpec::new("s1", "home").itl_ms(10)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_fifo_slot_engine_no_slot_idles_while_the_gateway_queues() {
    // Four slots, each request 20 ms + 10 tokens at 10 ms whatever the batch: about 33
    // requests/s; twelve clients keep eight more than it can run.
    let s = four_fifo_slots(20).await;
    let gw = Arc::new(Gateway::start(&policy_text(&[&s], POLICY)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (statuses, samples) = tokio::join!(
        async {
            let got = closed_loops(&gw, 12, 10, Duration::from_secs(4)).await;
            stop.store(true, Ordering::Relaxed);
            got
        },
        sample(&gw, &s, &stop)
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.len() > 60, "{}", statuses.len());
    // After the first second (the engine must be seen full once to be learned).
    let settled = &samples[samples.len() / 4..];
    let queued: Vec<_> = settled.iter().filter(|s| s.0 > 0).collect();
    let busy = queued.iter().map(|s| s.1).sum::<u64>() as f64 / (queued.len() as f64 * 4.0);
    let engine_waiting = settled.iter().map(|s| s.2).sum::<u64>() as f64 / settled.len() as f64;
    eprintln!(
        "{} samples, {} with the gateway queueing: slots busy {:.1} %, engine waiting {engine_waiting:.2} on average",
        settled.len(),
        queued.len(),
        100.0 * busy
    );
    assert!(
        queued.len() * 2 > settled.len(),
        "the gateway hardly queued: {settled:?}"
    );
    assert!(
        busy >= 0.95,
        "a slot idled while requests waited: {queued:?}"
    );
    // The gateway holds the queue, where priorities and deadlines apply, not the engine.
    assert!(engine_waiting < 0.5, "the engine queued: {settled:?}");
    // Four, or five while one more is being tried (at most every 2 s).
    let shard = gw.shard("s1").await;
    let learned = shard["learned_slots"].as_u64().unwrap();
    assert!((4..=5).contains(&learned), "{shard}");
    let metrics = gw.metrics().await;
    let series = format!(
        "breakwater_shard_slots{{pool=\"pool-home\",region=\"home\",shard=\"s1\"}} {learned}"
    );
    assert!(metrics.contains(&series), "{metrics}");
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_an_engine_whose_kv_cache_bounds_the_batch_the_slots_follow_the_cache() {
    // 32 slots, but a KV cache of 300 tokens: about six requests of ~13 prompt and 30
    // generated tokens fit; the rest would be preempted and recomputed.
    let s = start_shard(ShardSpec {
        slots: 32,
        ttft_ms: 10,
        behaviour: Behaviour::KvPreempt,
        kv_capacity_tokens: 300,
        ..ShardSpec::new("s1", "home").itl_ms(5)
    })
    .await;
    let gw = Arc::new(Gateway::start(&policy_text(&[&s], POLICY)).await);
    let statuses = closed_loops(&gw, 16, 30, Duration::from_secs(4)).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let shard = gw.shard("s1").await;
    let learned = shard["learned_slots"].as_u64().unwrap();
    let st = s.stats();
    eprintln!("learned {learned} slots of 32; engine: {st:?}");
    assert!((3..=10).contains(&learned), "{shard}");
    assert_eq!(st.completed_total as usize, statuses.len());
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_target_is_sized_from_the_fleet_unless_the_policy_sets_it() {
    // Four FIFO slots, each request 200 ms to its first token and 5 tokens at 10 ms:
    // about 16 requests/s. With four in flight the buffer that keeps them busy is √4
    // requests at 16/s, 125 ms — twice that near capacity, as closed loops are (each
    // arrival follows a finish): 250 ms; first tokens at their base (the gateway holds
    // the queue) leave 1.5 × 200 ms there, so the buffer decides.
    let s = four_fifo_slots(200).await;
    for (extra, from, range) in [
        ("", "fleet", 170.0..340.0),
        ("queue_target_ms = 30\n", "policy", 30.0..30.001),
    ] {
        let gw = Arc::new(Gateway::start(&policy_text(&[&s], &format!("{POLICY}{extra}"))).await);
        let (statuses, admission) =
            tokio::join!(closed_loops(&gw, 8, 5, Duration::from_secs(3)), async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                gw.status().await["admission"].clone()
            });
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        eprintln!("{from}: {admission}");
        assert_eq!(admission["queue_target_from"], from, "{admission}");
        let target = admission["queue_target_ms"].as_f64().unwrap();
        assert!(range.contains(&target), "{target} ms: {admission}");
        let ratio = admission["arrivals_per_finish"].as_f64().unwrap();
        assert!((0.8..1.2).contains(&ratio), "closed loops: {admission}");
        let base = admission["base_ttft_ms"].as_f64().unwrap();
        assert!((190.0..300.0).contains(&base), "{base} ms: {admission}");
        assert_eq!(gw.wait_ledger_zero().await, 0);
    }
}
