//! Streams that go wrong: a shard that dies before its first event (invisible to the
//! client), one that dies mid-stream (an SSE error event, no `[DONE]`), and a client that
//! walks away (the shard stops generating and the ledger returns to zero).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use llm_sim::{Fault, FaultMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_dies_mid_way_ends_with_an_error_event_and_no_done() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    a.set_fault(Fault {
        after_tokens: 3,
        ..Fault::new(FaultMode::Midstream)
    });
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(10, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "{text}");
    assert!(
        events[..3]
            .iter()
            .all(|e| e.starts_with("data: {\"choices\"")),
        "{text}"
    );
    assert!(events[3].starts_with("data: {\"error\":"), "{text}");
    assert!(events[3].contains("upstream_error"));
    assert!(!text.contains("[DONE]"));
    // Output had started: no second attempt.
    assert_eq!(a.stats().requests_total, 1);
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_that_dies_after_its_header_but_before_the_first_event_is_invisible() {
    // Home sends 200 + SSE headers, then dies; the other region answers in full.
    let dying = start_shard(ShardSpec::new("dying", "home")).await;
    let healthy = start_shard(ShardSpec::new("healthy", "away")).await;
    dying.set_fault(Fault {
        after_tokens: 0,
        ..Fault::new(FaultMode::Midstream)
    });
    let gw = Gateway::start(&policy_text(&[&dying, &healthy], "")).await;
    for _ in 0..3 {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(4, true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-breakwater-shard"], "healthy");
        let text = resp.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(!text.contains("error"), "{text}");
    }
    assert_eq!(dying.stats().requests_total, 3);
    assert_eq!(healthy.stats().completed_total, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_cancels_the_upstream_and_releases_the_ledger() {
    // A long answer: 500 tokens at 20 ms each.
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(20)).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(500, true))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert!(gw.inflight_tokens().await > 0);
    assert_eq!(a.stats().running, 1);
    drop(stream);
    // The shard sees its connection close and stops; the ledger goes back to zero.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stats().aborted_total == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = a.stats();
    assert_eq!(s.aborted_total, 1, "{s:?}");
    assert_eq!(s.running, 0);
    assert!(s.generation_tokens_total < 500, "{s:?}");
    assert_eq!(gw.wait_ledger_zero().await, 0);

    // The same while the client is still waiting for the first byte of a whole answer.
    let body = chat(500, false);
    let url = gw.url("/v1/chat/completions");
    let waiting = tokio::spawn(async move { client().post(url).json(&body).send().await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stats().running == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    waiting.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stats().aborted_total < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.stats().aborted_total, 2, "{:?}", a.stats());
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ledger_returns_to_zero_after_successes_failures_and_aborts_under_load() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], "")).await;
    b.fault(FaultMode::Error);
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let url = gw.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let req = client().post(url).json(&chat(5 + i % 7, i % 2 == 0));
            if i % 5 == 0 {
                // Give up early on some requests.
                let _ = tokio::time::timeout(Duration::from_millis(15), req.send()).await;
            } else {
                let resp = req.send().await.unwrap();
                let _ = resp.bytes().await;
            }
        }));
    }
    // While they run, the ledger holds their tokens (a gateway that charged nothing would
    // pass the end check alone).
    let mut peak = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        peak = peak.max(gw.inflight_tokens().await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(peak > 0, "nothing was ever charged");
    let dispatched: u64 = gw.status().await["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["dispatched_requests_total"].as_u64().unwrap())
        .sum();
    // Every request that reached the gateway was charged once per attempt; the ones given
    // up after 15 ms may not have arrived.
    assert!(dispatched >= 32, "{dispatched} charges for 40 requests");
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_goes_silent_ends_at_the_idle_timeout_with_an_error_event() {
    // 10 ms between tokens, slowed 40x once the stream has started: 400 ms of silence
    // against a 150 ms idle timeout.
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(10)).await;
    let gw = Gateway::start(&policy_text(&[&a], "\n[timeouts]\nidle_ms = 150\n")).await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(50, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    a.set_fault(Fault {
        factor: 40.0,
        ..Fault::new(FaultMode::Slow)
    });
    let started = Instant::now();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("data: {\"error\":") && text.contains("upstream_timeout"),
        "{text}"
    );
    assert!(text.contains("idle for more than 150 ms"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_longer_than_the_total_timeout_is_ended_at_the_deadline() {
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(20)).await;
    let gw = Gateway::start(&policy_text(
        &[&a],
        "\n[timeouts]\ntotal_ms = 400\nfirst_byte_ms = 400\nidle_ms = 400\nconnect_ms = 400\n",
    ))
    .await;
    let started = Instant::now();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(200, true))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let took = started.elapsed();
    assert!(text.contains("deadline exceeded"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}
