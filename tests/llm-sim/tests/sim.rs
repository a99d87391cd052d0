//! The simulator as a real server on loopback: API surface, batching and queueing, vLLM
//! metrics, the fault switch, and the command line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use llm_sim::{Behaviour, Fault, FaultMode, SimConfig, SimHandle};
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
    for (bad, named) in [
        (&["--behaviour", "lifo"][..], "--behaviour"),
        (
            &["--behaviour", "prefill-heavy", "--prefill-tps", "0"],
            "--prefill-tps",
        ),
        (
            &["--behaviour", "slowing-decode", "--decode-slowdown=-1"],
            "--decode-slowdown",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-sim"))
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{bad:?}: {err}");
    }
}

/// Sends `n` chat requests at once (each asking `max_tokens`, with a prompt of
/// `prompt_bytes`); how long each took, in the order they finished.
async fn at_once(s: &SimHandle, n: usize, max_tokens: u64, prompt_bytes: usize) -> Vec<Duration> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = format!("{}/v1/chat/completions", s.url());
        // Different prompts: the prefix cache must not skip anyone's prefill.
        let content = format!("{i} {}", "x".repeat(prompt_bytes));
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": content}],
                              "max_tokens": max_tokens});
            let r: Value = client()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(r["usage"]["completion_tokens"], max_tokens);
            started.elapsed()
        }));
    }
    let mut took = Vec::new();
    for t in tasks {
        took.push(t.await.unwrap());
    }
    took.sort();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_slots_decode_at_a_fixed_rate_and_the_request_after_the_last_slot_waits_a_whole_request(
) {
    // Shared, 100 tokens/s would make four 20-token requests take 0.8 s together; fifo
    // slots decode each at 10 ms a token whatever the batch.
    let config = SimConfig {
        slots: 4,
        capacity_tps: 100.0,
        itl: Duration::from_millis(10),
        behaviour: Behaviour::FifoSlots,
        ..SimConfig::new("m")
    };
    let s = sim(config).await;
    let took = at_once(&s, 5, 20, 8).await;
    // The four in the slots take about 20 ms + 200 ms; the fifth waits for one of them.
    assert!(took[3] < Duration::from_millis(450), "{took:?}");
    assert!(took[4] > Duration::from_millis(400), "{took:?}");
    assert!(took[4] > took[0] * 17 / 10, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowing_decode_makes_a_full_batch_slower_per_token() {
    let config = SimConfig {
        slots: 8,
        capacity_tps: 1e6,
        itl: Duration::from_millis(5),
        ttft: Duration::ZERO,
        behaviour: Behaviour::SlowingDecode { slowdown: 3.0 },
        ..SimConfig::new("m")
    };
    let s = sim(config).await;
    let alone = at_once(&s, 1, 40, 8).await[0];
    let full = at_once(&s, 8, 40, 8).await;
    // Alone: 40 x 5 ms; a full batch: up to 40 x 20 ms each.
    assert!(alone < Duration::from_millis(400), "{alone:?}");
    assert!(
        full[0] > alone * 5 / 2,
        "alone {alone:?}, full batch {full:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_heavy_engines_prefill_one_prompt_at_a_time() {
    // About 1,000 tokens each (3.6 bytes a token) at 4,000 prompt tokens/s: 0.25 s apiece,
    // one after another.
    let config = SimConfig {
        slots: 8,
        ttft: Duration::from_millis(5),
        behaviour: Behaviour::PrefillHeavy {
            prefill_tps: 4000.0,
        },
        ..SimConfig::new("m")
    };
    let s = sim(config).await;
    let took = at_once(&s, 4, 1, 3600).await;
    assert!(took[0] < Duration::from_millis(500), "{took:?}");
    assert!(took[3] > Duration::from_millis(900), "{took:?}");
    let st = s.engine().stats();
    assert!(st.prompt_tokens_total >= 4000, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_cache_preempts_the_youngest_and_every_request_still_completes() {
    // Eight requests of ~5 prompt tokens and 40 generated need ~360 tokens of KV cache;
    // the cache holds 150, so fewer run at once and the youngest are preempted.
    let config = SimConfig {
        slots: 8,
        capacity_tps: 1e6,
        itl: Duration::from_millis(5),
        ttft: Duration::from_millis(5),
        kv_capacity_tokens: 150,
        behaviour: Behaviour::KvPreempt,
        ..SimConfig::new("m")
    };
    let s = sim(config).await;
    let engine = s.engine().clone();
    let watch = tokio::spawn(async move {
        // The most seen waiting while fewer than all slots ran: the cache, not the slots,
        // held them back.
        let mut held_back = 0;
        for _ in 0..200 {
            let st = engine.stats();
            if st.running < 8 && st.waiting > 0 {
                held_back = held_back.max(st.waiting);
            }
            assert!(st.kv_tokens <= 150 + 8, "{st:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        held_back
    });
    let took = at_once(&s, 8, 40, 8).await;
    assert_eq!(took.len(), 8);
    let st = s.engine().stats();
    assert!(st.preemptions_total > 0, "{st:?}");
    assert_eq!(st.completed_total, 8);
    assert_eq!((st.running, st.waiting, st.kv_tokens), (0, 0, 0), "{st:?}");
    assert!(watch.await.unwrap() > 0);
    let metrics = client()
        .get(format!("{}/metrics", s.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "vllm:num_preemptions_total{{model_name=\"m\"}} {}",
            st.preemptions_total
        )),
        "{metrics}"
    );
}
