//! What the admin API tells about requests just served: the decisions log (candidates,
//! exclusions, attempts), `x-breakwater-explain` for a holder of the admin token (and for
//! nobody else, and never forwarded to a shard), the per-second history and each shard's
//! last minute.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

async fn post(gw: &Gateway, id: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", id)
        .json(&chat(8, false));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

/// `GET /admin/decisions?id=ID`, waiting (bounded) for it: a request's decision is kept
/// as its access log line is written, just after its answer has gone out.
async fn decision(gw: &Gateway, id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = client()
            .get(format!("http://{}/admin/decisions?id={id}", gw.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            return r.json().await.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no decision for {id}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn find<'a>(list: &'a Value, shard: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["shard"] == shard)
        .unwrap_or_else(|| panic!("no {shard} in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_decisions_log_shows_the_candidates_exclusions_and_attempts_of_a_request_just_sent() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let c = start_shard(ShardSpec::new("c", "away")).await;
    let gw = Gateway::start(&policy_text(&[&a, &b, &c], "")).await;
    assert_eq!(gw.admin_post("/admin/shards/b/drain").await.0, 200);
    let r = post(&gw, "obs-1", &[]).await;
    assert_eq!(r.status(), 200);
    // With half the home region drained, some traffic spills to "away": either may answer.
    let served = r.headers()["x-breakwater-shard"]
        .to_str()
        .unwrap()
        .to_string();
    let region = r.headers()["x-breakwater-region"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(served, "b");
    // An ordinary caller gets no explanation.
    assert!(r.headers().get("x-breakwater-explain").is_none());

    let d = decision(&gw, "obs-1").await;
    let d = &d["decisions"][0];
    assert_eq!(d["id"], "obs-1", "{d}");
    assert_eq!(d["model"], MODEL);
    assert_eq!(d["tenant"], "default");
    assert_eq!(d["status"], 200);
    assert_eq!(d["region"], region.as_str());
    assert!(d["estimated_tokens"].as_u64().unwrap() > 0);
    let cands = &d["candidates"];
    assert_eq!(cands.as_array().unwrap().len(), 3, "{d}");
    assert_eq!(find(cands, "a")["excluded"], Value::Null);
    assert_eq!(find(cands, "a")["tier"], 0);
    assert_eq!(find(cands, "b")["excluded"], "drained");
    assert_eq!(find(cands, "c")["tier"], 1);
    assert_eq!(find(cands, "c")["region"], "away");
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{d}");
    assert_eq!(attempts[0]["shard"], served.as_str());
    assert_eq!(attempts[0]["outcome"], "ok");
    assert!(attempts[0]["ms"].as_f64().unwrap() > 0.0);

    // A failed attempt and its retry: the retry's pick saw the first shard as tried. Most
    // first picks land on "a" (failing now); look for one.
    a.fault(llm_sim::FaultMode::Error);
    let mut retried = None;
    for i in 0..20 {
        let id = format!("obs-2-{i}");
        assert_eq!(post(&gw, &id, &[]).await.status(), 200);
        let d = decision(&gw, &id).await;
        let attempts = d["decisions"][0]["attempts"].as_array().unwrap().clone();
        if attempts.len() > 1 {
            retried = Some((id, attempts));
            break;
        }
    }
    let (retried, attempts) = retried.expect("no request met the failing shard in 20");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["shard"], "a");
    assert_eq!(attempts[0]["outcome"], "status_500", "{attempts:?}");
    assert_eq!(attempts[1]["shard"], "c");
    assert_eq!(find(&attempts[1]["candidates"], "a")["excluded"], "tried");

    // Newest first; an unknown id is a 404 in the OpenAI format; no token, no log.
    let list = gw.admin_json("/admin/decisions?limit=2").await;
    assert_eq!(list["decisions"][0]["id"], retried.as_str());
    assert_eq!(list["decisions"].as_array().unwrap().len(), 2);
    let r = client()
        .get(format!("http://{}/admin/decisions?id=nope", gw.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let r = client()
        .get(format!("http://{}/admin/decisions", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// An engine that records each request head it reads and answers a small chat completion.
async fn engine_recording(seen: Arc<Mutex<Vec<String>>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = Vec::new();
                loop {
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&got).to_string();
                    seen.lock().unwrap().push(text);
                    got.clear();
                    let body = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_holder_of_the_admin_token_gets_the_explanation_and_the_shard_sees_neither_header() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = engine_recording(Arc::clone(&seen)).await;
    let gw = Gateway::start(&one_shard_policy("solo", &addr, "")).await;

    let r = post(
        &gw,
        "exp-1",
        &[
            ("x-breakwater-explain", "1"),
            ("x-breakwater-admin-token", ADMIN_TOKEN),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    let explained: Value =
        serde_json::from_str(r.headers()["x-breakwater-explain"].to_str().unwrap()).unwrap();
    assert_eq!(explained["candidates"][0]["shard"], "solo", "{explained}");
    assert_eq!(explained["candidates"][0]["excluded"], Value::Null);
    assert_eq!(explained["attempts"][0]["shard"], "solo");
    assert!(explained["estimated_tokens"].as_u64().unwrap() > 0);

    for (id, headers) in [
        (
            "exp-2",
            vec![
                ("x-breakwater-explain", "1"),
                ("x-breakwater-admin-token", "guess"),
            ],
        ),
        ("exp-3", vec![("x-breakwater-explain", "1")]),
        (
            "exp-4",
            vec![
                ("x-breakwater-explain", "0"),
                ("x-breakwater-admin-token", ADMIN_TOKEN),
            ],
        ),
    ] {
        let r = post(&gw, id, &headers).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("x-breakwater-explain").is_none(), "{id}");
    }
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 4, "{heads:?}");
    for head in &heads {
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("x-breakwater-admin-token"), "{head}");
        assert!(!lower.contains("x-breakwater-explain"), "{head}");
        assert!(!head.contains(ADMIN_TOKEN), "{head}");
    }
    // The token is not in the gateway's log either.
    assert!(!gw.log().contains(ADMIN_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_history_and_the_shards_last_minute_count_what_was_served_and_refused() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let key = "sk-obs";
    let tenants = format!(
        "[[tenants]]\nid = \"t\"\napi_key_sha256 = [\"{}\"]\npriority = \"standard\"\nrpm = 3\n",
        breakwater::admission::tenant::key_digest_hex(key)
    );
    let gw = Gateway::start(&policy_text(&[&a], &tenants)).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = post(
            &gw,
            &format!("h-{i}"),
            &[("authorization", &format!("Bearer {key}"))],
        )
        .await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    // The ticker closes a second once a second: wait for the points to be written.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let h = gw.admin_json("/admin/history").await;
    let sum = |k: &str| -> f64 {
        h[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0))
            .sum()
    };
    assert_eq!(h["interval_s"], 1);
    assert!((sum("requests_per_s") - 6.0).abs() < 0.2, "{h}");
    assert!((sum("refused_per_s") - 3.0).abs() < 0.1, "{h}");
    assert!((sum("goodput_per_s") - 3.0).abs() < 0.1, "{h}");
    assert!(
        h["ttft_p99_ms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_f64().is_some_and(|ms| ms > 0.0)),
        "{h}"
    );
    let points = gw.admin_json("/admin/history?points=1").await;
    assert_eq!(points["requests_per_s"].as_array().unwrap().len(), 1);

    let shard = gw.shard("a").await;
    let minute = &shard["last_minute"];
    assert_eq!(minute["ttft_samples"], 3, "{shard}");
    assert!(minute["requests_per_s"].as_f64().unwrap() > 0.0, "{shard}");
    let (p50, p99) = (
        minute["ttft_p50_ms"].as_f64().unwrap(),
        minute["ttft_p99_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{shard}");
    assert_eq!(
        shard["effective_limit_tokens"].as_f64(),
        shard["admission_limit_tokens"].as_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_trace_context_reaches_the_shard_and_the_json_access_log_carries_its_id() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = engine_recording(Arc::clone(&seen)).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("policy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("policy.toml"), one_shard_policy("solo", &addr, "")).unwrap();
    let gw = Gateway::start_with(root, dir, &["--log-format", "json"]).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = format!("00-{trace}-00f067aa0ba902b7-01");
    assert_eq!(
        post(&gw, "tr-1", &[("traceparent", &caller)])
            .await
            .status(),
        200
    );
    // Malformed: a new trace, not the caller's garbage.
    let bad = "00-zzzz-00f067aa0ba902b7-01";
    assert_eq!(
        post(&gw, "tr-2", &[("traceparent", bad)]).await.status(),
        200
    );
    assert_eq!(post(&gw, "tr-3", &[]).await.status(), 200);

    // The requests' heads only: an active health check (`GET /health`) may land in between.
    let heads: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.starts_with("POST "))
        .cloned()
        .collect();
    let parents: Vec<String> = heads
        .iter()
        .map(|h| {
            let lines: Vec<&str> = h
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("traceparent:"))
                .collect();
            assert_eq!(lines.len(), 1, "one traceparent per request: {h}");
            lines[0]["traceparent:".len()..].trim().to_string()
        })
        .collect();
    assert_eq!(parents.len(), 3);
    let parsed: Vec<_> = parents
        .iter()
        .map(|p| breakwater::proxy::trace::parse(p.as_bytes()).unwrap_or_else(|| panic!("{p}")))
        .collect();
    // Same trace as the caller's, but the attempt is a new span of it.
    assert_eq!(format!("{:032x}", parsed[0].trace_id), trace);
    assert_ne!(parsed[0].parent_id, Some(0x00f0_67aa_0ba9_02b7));
    assert_ne!(format!("{:032x}", parsed[1].trace_id), trace);
    assert_ne!(parsed[1].trace_id, parsed[2].trace_id);

    // The access log: one JSON object per line, with the trace id of each request.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let access: Vec<Value> = loop {
        let lines: Vec<Value> = gw
            .log()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(|v| v["target"] == "access")
            .collect();
        if lines.len() >= 3 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(access.len(), 3, "{access:?}");
    // A line is written once its answer is out, so the next request may log first.
    let mut access = access;
    access.sort_by_key(|l| l["request_id"].as_str().unwrap_or_default().to_string());
    for (line, p) in access.iter().zip(&parsed) {
        assert_eq!(line["trace_id"], format!("{:032x}", p.trace_id), "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["shard"], "solo");
        assert_eq!(line["model"], MODEL);
        assert!(line["total_ms"].as_f64().unwrap() > 0.0, "{line}");
        assert!(
            line["timestamp"].is_string() && line["level"] == "INFO",
            "{line}"
        );
    }
    assert_eq!(access[0]["request_id"], "tr-1");
    let d = decision(&gw, "tr-1").await;
    assert_eq!(d["decisions"][0]["trace_id"], trace);
}

/// A stand-in OTLP/HTTP collector: keeps the JSON body of every `POST /v1/traces`.
async fn collector(got: Arc<Mutex<Vec<Value>>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let got = Arc::clone(&got);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut seen: Vec<u8> = Vec::new();
                loop {
                    let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                    assert!(head.starts_with("post /v1/traces "), "{head}");
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap();
                    while seen.len() < end + 4 + len {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body: Value =
                        serde_json::from_slice(&seen[end + 4..end + 4 + len]).unwrap();
                    got.lock().unwrap().push(body);
                    seen.drain(..end + 4 + len);
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                        .await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_otlp_endpoint_each_request_is_a_server_span_with_a_client_span_per_attempt() {
    let exported = Arc::new(Mutex::new(Vec::new()));
    let endpoint = collector(Arc::clone(&exported)).await;
    // Two shards, the first failing, so one request makes two attempts.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let good = engine_recording(Arc::clone(&seen)).await;
    let bad = start_shard(ShardSpec::new("bad", "home")).await;
    bad.fault(llm_sim::FaultMode::Error);
    let policy = format!(
        "{}\n[[shards]]\nid = \"bad\"\npool = \"p\"\nurl = \"{}\"\ncapacity_tps = 1000000\n",
        one_shard_policy("good", &good, ""),
        bad.sim.url()
    );
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("policy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let gw = Gateway::start_with(root, dir, &["--otlp-endpoint", &endpoint]).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    // An unsampled trace is not exported (sent first: its spans, were they exported,
    // would be in the batch the later requests' are in, or an earlier one).
    let unsampled = format!("00-{trace}-{caller_span}-00");
    assert_eq!(
        post(&gw, "otlp-unsampled", &[("traceparent", &unsampled)])
            .await
            .status(),
        200
    );
    let mut retried = None;
    for i in 0..20 {
        let id = format!("otlp-{i}");
        let tp = format!("00-{trace}-{caller_span}-01");
        assert_eq!(post(&gw, &id, &[("traceparent", &tp)]).await.status(), 200);
        let d = decision(&gw, &id).await;
        if d["decisions"][0]["attempts"].as_array().unwrap().len() == 2 {
            retried = Some(id);
            break;
        }
    }
    let retried = retried.expect("no request tried the failing shard first in 20");
    // Spans are batched for up to a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let spans: Vec<Value> = loop {
        let spans: Vec<Value> = exported
            .lock()
            .unwrap()
            .iter()
            .flat_map(|body| {
                assert_eq!(
                    body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
                    "breakwater"
                );
                body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let has = spans.iter().any(|s| {
            s["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["value"]["stringValue"] == retried.as_str())
        });
        if has || std::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let named = |s: &Value, id: &str| {
        s["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["value"]["stringValue"] == id)
    };
    assert!(
        !spans.iter().any(|s| named(s, "otlp-unsampled")),
        "{spans:?}"
    );
    let server = spans
        .iter()
        .find(|s| {
            s["kind"] == 2
                && s["attributes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a["value"]["stringValue"] == retried.as_str())
        })
        .unwrap_or_else(|| panic!("no server span for {retried} in {spans:?}"));
    assert_eq!(server["traceId"], trace);
    assert_eq!(server["parentSpanId"], caller_span);
    assert_eq!(server["name"], "POST /v1/chat/completions");
    assert_eq!(server["status"]["code"], 1, "{server}");
    let children: Vec<&Value> = spans
        .iter()
        .filter(|s| s["kind"] == 3 && s["parentSpanId"] == server["spanId"])
        .collect();
    assert_eq!(children.len(), 2, "{children:?}");
    let attr = |s: &Value, k: &str| -> Value {
        s["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == k)
            .map(|a| a["value"]["stringValue"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(attr(children[0], "breakwater.shard"), "bad");
    assert_eq!(attr(children[0], "breakwater.outcome"), "status_500");
    assert_eq!(children[0]["status"]["code"], 2);
    assert_eq!(attr(children[1], "breakwater.shard"), "good");
    assert_eq!(children[1]["status"]["code"], 1);
    let start = |s: &Value| {
        s["startTimeUnixNano"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let end = |s: &Value| {
        s["endTimeUnixNano"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(start(server) <= start(children[0]) && end(children[1]) <= end(server) + 1_000_000);
    // The span the good shard was told is its parent is that attempt's span.
    let told = seen
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|h| {
            h.lines()
                .find_map(|l| l.strip_prefix("traceparent: "))
                .map(str::to_string)
        })
        .unwrap();
    assert_eq!(
        told.trim(),
        format!("00-{trace}-{}-01", children[1]["spanId"].as_str().unwrap())
    );
}
