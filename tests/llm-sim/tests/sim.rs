//! The simulator as a real server on loopback: API surface, batching and queueing, vLLM
//! metrics, the fault switch, and the command line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use llm_sim::{Fault, FaultMode, SimConfig, SimHandle};
use serde_json::{json, Value};

async fn sim(config: SimConfig) -> SimHandle {
    let serve = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimHandle::spawn(config, serve, control).unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn chat(max_tokens: u64) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_models_health_metrics_and_completions() {
    let s = sim(SimConfig::new("m")).await;
    let c = client();
    let models: Value = c
        .get(format!("{}/v1/models", s.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "m");
    assert_eq!(
        c.get(format!("{}/health", s.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r: Value = c
        .post(format!("{}/v1/chat/completions", s.url()))
        .json(&chat(4))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 4);
    let metrics = c
        .get(format!("{}/metrics", s.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:num_preemptions_total",
    ] {
        assert!(
            metrics.contains(&format!("{name}{{model_name=\"m\"}}")),
            "{name} missing:\n{metrics}"
        );
    }
    assert!(metrics.contains("vllm:generation_tokens_total{model_name=\"m\"} 4"));
    let wrong = c
        .post(format!("{}/v1/chat/completions", s.url()))
        .json(&json!({"model": "other", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 404);
    let bad = c
        .post(format!("{}/v1/chat/completions", s.url()))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_slots_queue_and_time_to_first_token_grows() {
    let config = SimConfig {
        slots: 1,
        itl: Duration::from_millis(10),
        ..SimConfig::new("m")
    };
    let s = sim(config).await;
    let url = format!("{}/v1/chat/completions", s.url());
    let started = Instant::now();
    let first = tokio::spawn({
        let url = url.clone();
        async move {
            client()
                .post(url)
                .json(&chat(30))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn(async move {
        let t = Instant::now();
        client()
            .post(url)
            .json(&chat(1))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        t.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let st = s.engine().stats();
    assert_eq!((st.running, st.waiting), (1, 1), "{st:?}");
    first.await.unwrap();
    let second_took = second.await.unwrap();
    // The one-token request waited for the 30-token one to leave the only slot.
    assert!(
        second_took > Duration::from_millis(150),
        "{second_took:?} after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_shares_the_engine_capacity() {
    // 200 tok/s shared: 8 requests of 25 tokens need about 1 s together.
    let config = SimConfig {
        capacity_tps: 200.0,
        itl: Duration::from_millis(1),
        ttft: Duration::ZERO,
        ..SimConfig::new("m")
    };
    let s = sim(config).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = format!("{}/v1/chat/completions", s.url());
        tasks.push(tokio::spawn(async move {
            client()
                .post(url)
                .json(&chat(25))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(800) && took < Duration::from_millis(3000),
        "{took:?}"
    );
    assert_eq!(s.engine().stats().generation_tokens_total, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_switch_refuses_errors_and_recovers() {
    let s = sim(SimConfig::new("m")).await;
    let c = client();
    let control = format!("http://{}/fault", s.control_addr());
    let set = |mode: &'static str| {
        let c = c.clone();
        let control = control.clone();
        async move {
            c.post(control)
                .body(format!("{{\"mode\":\"{mode}\"}}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(set("down").await, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = c
        .post(format!("{}/v1/chat/completions", s.url()))
        .json(&chat(1))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(set("error").await, 200);
    let r = c
        .post(format!("{}/v1/chat/completions", s.url()))
        .json(&chat(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        c.get(format!("{}/health", s.url()))
            .send()
            .await
            .unwrap()
            .status(),
        500
    );
    assert_eq!(set("ok").await, 200);
    let r = c
        .post(format!("{}/v1/chat/completions", s.url()))
        .json(&chat(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Typos and nonsense are rejected, and the fault in force stays.
    let bad = c
        .post(&control)
        .body(r#"{"mode":"sideways"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad = c
        .post(&control)
        .body(r#"{"mode":"slow","factor":0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(s.engine().fault(), Fault::new(FaultMode::Ok));
    let stats: Value = c
        .get(format!("http://{}/stats", s.control_addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["completed_total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_starts_a_server_and_rejects_bad_flags() {
    let port = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, control) = (port(0), port(1));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llm-sim"))
        .args([
            "--listen",
            &listen.to_string(),
            "--control-listen",
            &control.to_string(),
        ])
        .args([
            "--model",
            "cli-model",
            "--capacity-tps",
            "500",
            "--slots",
            "4",
            "--ttft-ms",
            "1",
            "--itl-ms",
            "1",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut served = None;
    while Instant::now() < deadline && served.is_none() {
        if let Ok(r) = client()
            .get(format!("http://{listen}/v1/models"))
            .send()
            .await
        {
            served = Some(r.json::<Value>().await.unwrap());
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(served.unwrap()["data"][0]["id"], "cli-model");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-sim"))
        .args(["--slots", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--slots"));
}
