//! `breakwater demo` as a person runs it: it starts, prints the URLs, token and a curl
//! example, serves, lets a shard be broken through the admin API, and stops on Ctrl-C.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, Demo};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_and_a_shard_can_be_broken_and_mended() {
    let mut demo = Demo::start().await;
    let (listen, admin, token) = (demo.listen, demo.admin, demo.token.clone());
    let text = demo.printed.join("\n");
    assert_eq!(token.len(), 32, "{text}");
    assert!(text.contains(&format!("http://{listen}/v1")), "{text}");
    assert!(text.contains("curl -s http://"), "{text}");
    let child = demo.child();
    let c = client();
    let body = json!({"model": "demo-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4});
    let r = c
        .post(format!("http://{listen}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-breakwater-region"], "us-east");

    // Break both home shards: the second region answers.
    for shard in ["use-big", "use-small"] {
        let r = c
            .post(format!("http://{admin}/admin/shards/{shard}/fault"))
            .bearer_auth(&token)
            .body(r#"{"mode":"error"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let body_more = json!({"model": "demo-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2});
    let r = c
        .post(format!("http://{listen}/v1/chat/completions"))
        .json(&body_more)
        .send()
        .await
        .unwrap();
    // Both home shards fail; the demo allows 3 attempts, so the third goes abroad.
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-breakwater-region"], "eu-west");
    let bad = c
        .post(format!("http://{admin}/admin/shards/use-big/fault"))
        .bearer_auth(&token)
        .body(r#"{"mode":"sideways"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    for shard in ["use-big", "use-small"] {
        c.post(format!("http://{admin}/admin/shards/{shard}/fault"))
            .bearer_auth(&token)
            .body(r#"{"mode":"ok"}"#)
            .send()
            .await
            .unwrap();
    }
    let status: Value = c
        .get(format!("http://{admin}/admin/status"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["shards"].as_array().unwrap().len(), 4);

    // A shard taken down through the admin API is ejected by the health checks, then
    // re-admitted when it comes back; /admin/status shows both, with the reason.
    let state_of = |status: &Value, id: &str| {
        let s = status["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()
            .clone();
        (
            s["state"].as_str().unwrap().to_string(),
            s["reason"].as_str().unwrap().to_string(),
        )
    };
    let wait_for = |want: &'static str| {
        let (c, token) = (c.clone(), token.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let status: Value = c
                    .get(format!("http://{admin}/admin/status"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let (state, reason) = state_of(&status, "use-small");
                if state == want {
                    return (reason, status);
                }
                assert!(
                    Instant::now() < deadline,
                    "use-small never became {want}: {status}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    c.post(format!("http://{admin}/admin/shards/use-small/fault"))
        .bearer_auth(&token)
        .body(r#"{"mode":"down"}"#)
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    let (reason, _) = wait_for("ejected").await;
    eprintln!("ejected after {:?}: {reason}", t.elapsed());
    assert!(reason.contains("health check failing"), "{reason}");
    c.post(format!("http://{admin}/admin/shards/use-small/fault"))
        .bearer_auth(&token)
        .body(r#"{"mode":"ok"}"#)
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    let (_, status) = wait_for("healthy").await;
    eprintln!("healthy again after {:?}", t.elapsed());
    let shard = status["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "use-small")
        .unwrap()
        .clone();
    assert_eq!(shard["last_transition"]["to"], "healthy", "{shard}");
    // A GPU fault through the same API drains the shard; /admin/status shows its GPU.
    let r = c
        .post(format!("http://{admin}/admin/shards/use-big/fault"))
        .bearer_auth(&token)
        .body(r#"{"mode":"gpu_failing"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let big = loop {
        let status: Value = c
            .get(format!("http://{admin}/admin/status"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let big = status["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "use-big")
            .unwrap()
            .clone();
        if big["state"] == "draining" {
            break big;
        }
        assert!(Instant::now() < deadline, "use-big never drained: {big}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(big["gpu"]["verdict"], "failing", "{big}");
    assert!(big["gpu"]["memory_total_bytes"].as_u64().unwrap() > 0);
    // The same in Prometheus, and the demo's whole /metrics passes promtool.
    let metrics = c
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("breakwater_gpu_verdict{shard=\"use-big\",verdict=\"failing\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("breakwater_gpu_memory_total_bytes{shard=\"use-big\"}"));
    if let Err(said) = common::promtool_check(&metrics) {
        panic!("promtool: {said}");
    }
    let bad = c
        .post(format!("http://{admin}/admin/shards/use-big/fault"))
        .bearer_auth(&token)
        .body(r#"{"mode":"gpu_melted"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    c.post(format!("http://{admin}/admin/shards/use-big/fault"))
        .bearer_auth(&token)
        .body(r#"{"mode":"ok"}"#)
        .send()
        .await
        .unwrap();
    let events: Value = c
        .get(format!("http://{admin}/admin/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["shard"] == "use-small" && e["to"] == "ejected"),
        "{events}"
    );

    // Ctrl-C stops it.
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success() || status.code().is_some(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
