//! Admission end to end: API keys and tenants, rate limits, priorities under saturation,
//! queue deadlines and departures, context windows, heavy prompts — against the real
//! gateway and simulated engines on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The lowercase hex SHA-256 of a key, as a policy lists it.
fn digest(key: &str) -> String {
    breakwater::admission::tenant::key_digest_hex(key)
}

fn tenant(id: &str, key: &str, priority: &str, extra: &str) -> String {
    format!(
        "[[tenants]]\nid = \"{id}\"\napi_key_sha256 = [\"{}\"]\npriority = \"{priority}\"\n{extra}\n",
        digest(key)
    )
}

/// A fixed admission limit of about `requests` small requests per shard of 1,000 tokens/s:
/// each small chat costs about 26 tokens (7 of prompt, up to 20 of completion).
fn fixed_limit(tokens_ms: u64) -> String {
    format!(
        "[admission]\ninitial_limit_ms = {tokens_ms}\nmin_limit_ms = {tokens_ms}\nmax_limit_ms = {tokens_ms}\n"
    )
}

async fn post(gw: &Gateway, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut r = client().post(gw.url("/v1/chat/completions")).json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn required_keys_refuse_missing_and_unknown_ones_and_never_show_a_key() {
    let s = start_shard(ShardSpec::new("s1", "home")).await;
    let extra = format!(
        "[admission]\nrequire_api_key = true\n{}",
        tenant("acme", "sk-acme-secret", "critical", "")
    );
    let gw = Gateway::start(&policy_text(&[&s], &extra)).await;
    let body = chat(2, false);
    for key in [None, Some("sk-wrong")] {
        let started = Instant::now();
        let r = post(&gw, key, &body).await;
        assert_eq!(r.status(), 401, "{key:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    assert_eq!(
        s.stats().requests_total,
        0,
        "a refused request reached the shard"
    );
    let r = post(&gw, Some("sk-acme-secret"), &body).await;
    assert_eq!(r.status(), 200);
    // Azure's header works too.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("api-key", "sk-acme-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The tenant id shows; the key shows nowhere.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"breakwater_admitted_total{priority="critical",tenant="acme"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"reason="invalid_api_key""#), "{metrics}");
    let status = gw.status().await.to_string();
    assert!(status.contains("\"acme\""), "{status}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (what, text) in [("metrics", metrics), ("status", status), ("log", gw.log())] {
        assert!(!text.contains("sk-acme-secret"), "the key is in the {what}");
        assert!(!text.contains("sk-wrong"), "a key is in the {what}");
    }
}

#[tokio::test]
async fn requests_per_minute_give_429_with_openai_headers_and_recover() {
    let s = start_shard(ShardSpec::new("s1", "home")).await;
    let extra = tenant("small", "sk-small", "standard", "rpm = 60");
    let gw = Gateway::start(&policy_text(&[&s], &extra)).await;
    let body = chat(1, false);
    for i in 0..60 {
        assert_eq!(
            post(&gw, Some("sk-small"), &body).await.status(),
            200,
            "#{i}"
        );
    }
    let before = s.stats().requests_total;
    let r = post(&gw, Some("sk-small"), &body).await;
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    assert_eq!(error_code(r).await, "rate_limit_exceeded");
    assert!(h.contains_key("retry-after"), "{h:?}");
    assert_eq!(h["x-ratelimit-limit-requests"], "60");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let reset = h["x-ratelimit-reset-requests"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(reset.ends_with("ms") || reset.ends_with('s'), "{reset}");
    assert_eq!(
        s.stats().requests_total,
        before,
        "a refused request reached the shard"
    );
    // Another tenant (the default one) is not affected.
    assert_eq!(post(&gw, None, &body).await.status(), 200);
    // One request a second comes back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&gw, Some("sk-small"), &body).await.status(), 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"breakwater_refused_total{priority="standard",reason="rate_limit_requests",tenant="small"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn tokens_per_minute_give_429_with_openai_headers_and_recover() {
    let s = start_shard(ShardSpec::new("s1", "home")).await;
    // 3,000 tokens a minute, 50 a second; the estimate matches the engine's own count.
    let extra = format!(
        "[routing]\nbytes_per_token = 3.6\n{}",
        tenant("tok", "sk-tok", "standard", "tpm = 3000")
    );
    let gw = Gateway::start(&policy_text(&[&s], &extra)).await;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "w".repeat(360)}],
        "max_tokens": 1,
    });
    let mut passed = 0;
    let refused = loop {
        let r = post(&gw, Some("sk-tok"), &body).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        passed += 1;
        assert!(passed < 100, "never refused");
    };
    // About 100 tokens each: close to 30 pass.
    assert!((20..=32).contains(&passed), "{passed} passed");
    let h = refused.headers().clone();
    assert_eq!(error_code(refused).await, "rate_limit_exceeded");
    assert_eq!(h["x-ratelimit-limit-tokens"], "3000");
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&wait), "Retry-After {wait}");
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(200)).await;
    assert_eq!(post(&gw, Some("sk-tok"), &body).await.status(), 200);
}

/// One outcome of a client loop: status, time to the answer's header, error code.
type Outcome = (u16, Duration, String, bool);

async fn client_loop(gw: &Gateway, key: &'static str, length: Duration) -> Vec<Outcome> {
    let url = gw.url("/v1/chat/completions");
    let c = client();
    let start = Instant::now();
    let mut out = Vec::new();
    for _ in 0..500 {
        if start.elapsed() >= length {
            break;
        }
        let sent = Instant::now();
        let r = c
            .post(&url)
            .bearer_auth(key)
            .json(&chat(20, true))
            .send()
            .await
            .unwrap();
        let took = sent.elapsed();
        let status = r.status().as_u16();
        let overloaded = r.headers().contains_key("x-breakwater-overloaded")
            && r.headers().contains_key("retry-after");
        let text = r.text().await.unwrap();
        let code = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(String::from))
            .unwrap_or_default();
        if status == 200 {
            assert!(text.contains("[DONE]"), "a cut stream: {text}");
        } else {
            // A refused client comes back a little later, as Retry-After asks (shortened).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out.push((status, took, code, overloaded));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_saturation_critical_traffic_is_served_and_sheddable_is_refused_fast() {
    // Two batch slots, 20 ms a token: a 20-token stream holds a slot for about 0.4 s.
    let s = start_shard(ShardSpec {
        slots: 2,
        ..ShardSpec::new("s1", "home").itl_ms(20)
    })
    .await;
    // About two requests' worth of tokens in flight.
    let extra = format!(
        "{}{}{}",
        fixed_limit(60),
        tenant("gold", "sk-gold", "critical", ""),
        tenant("bulk", "sk-bulk", "sheddable", "")
    );
    let gw = Gateway::start(&policy_text(&[&s], &extra)).await;
    // The sheddable clients come once critical traffic has saturated the shard for a
    // second. (Before the fleet's rate is measured, the gateway takes the shard's declared
    // 1,000 tokens/s at its word — ten times what two slots serve — and a sheddable
    // request arriving with the first ones may join and wait out its timeout.)
    let saturated = Duration::from_secs(1);
    let length = Duration::from_secs(3);
    let gw = &gw;
    let late_loop = |key| async move {
        tokio::time::sleep(saturated).await;
        client_loop(gw, key, length).await
    };
    let (gold_a, gold_b, bulk_a, bulk_b, bulk_c) = tokio::join!(
        client_loop(gw, "sk-gold", saturated + length),
        client_loop(gw, "sk-gold", saturated + length),
        late_loop("sk-bulk"),
        late_loop("sk-bulk"),
        late_loop("sk-bulk"),
    );
    let gold: Vec<_> = gold_a.into_iter().chain(gold_b).collect();
    let bulk: Vec<_> = bulk_a.into_iter().chain(bulk_b).chain(bulk_c).collect();
    let ok = |v: &[Outcome]| v.iter().filter(|o| o.0 == 200).count();
    let refused: Vec<_> = bulk.iter().filter(|o| o.0 == 429).collect();
    eprintln!(
        "critical: {} of {} served; sheddable: {} of {} served, {} refused (slowest refusal {:?})",
        ok(&gold),
        gold.len(),
        ok(&bulk),
        bulk.len(),
        refused.len(),
        refused.iter().map(|o| o.1).max()
    );
    assert!(gold.len() >= 8, "{gold:?}");
    assert_eq!(ok(&gold), gold.len(), "critical refused: {gold:?}");
    assert!(refused.len() >= 10, "{bulk:?}");
    assert_eq!(refused.len() + ok(&bulk), bulk.len(), "{bulk:?}");
    for o in &refused {
        assert_eq!(o.2, "server_overloaded");
        assert!(
            o.3,
            "a refusal without Retry-After or x-breakwater-overloaded"
        );
        assert!(
            o.1 < Duration::from_millis(100),
            "a slow refusal: {:?}",
            o.1
        );
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"breakwater_refused_total{priority="sheddable",reason="overloaded",tenant="bulk"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("breakwater_shard_admission_limit_tokens{pool=\"pool-home\",region=\"home\",shard=\"s1\"} 60"), "{metrics}");
    // Refused requests never reached the engine; every admitted one completed there.
    let served = (ok(&gold) + ok(&bulk)) as u64;
    assert_eq!(s.stats().requests_total, served);
    assert_eq!(s.stats().completed_total, served);
}

/// Starts a stream that holds the shard's only slot of admission room for about `hold`.
fn hold_slot(gw: &Gateway, tokens: u64) -> tokio::task::JoinHandle<u16> {
    let url = gw.url("/v1/chat/completions");
    tokio::spawn(async move {
        let r = client()
            .post(url)
            .json(&chat(tokens, true))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let _ = r.text().await;
        status
    })
}

/// Waits until one request of `band` (`critical`, `standard`, `sheddable`) is queued.
async fn wait_queued(gw: &Gateway, band: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while gw.status().await["admission"]["queue_depth"][band] != 1 {
        assert!(Instant::now() < deadline, "the {band} request never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_inflight(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.inflight_tokens().await == 0 {
        assert!(Instant::now() < deadline, "the holder never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_whose_deadline_passes_never_reaches_a_shard() {
    let s = start_shard(ShardSpec::new("s1", "home").itl_ms(20)).await;
    // Room for one request (about 26 tokens) at a time.
    let gw = Gateway::start(&policy_text(&[&s], &fixed_limit(30))).await;
    let holder = hold_slot(&gw, 60); // about 1.2 s
    wait_inflight(&gw).await;
    let started = Instant::now();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-breakwater-timeout-ms", "300")
        .json(&chat(20, true))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, "server_overloaded");
    eprintln!("queued with a 300 ms deadline: refused after {took:?}");
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(800),
        "{took:?}"
    );
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(
        s.stats().requests_total,
        1,
        "the expired request reached the shard"
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"reason="queue_timeout""#), "{metrics}");
    assert!(
        metrics.contains("breakwater_queue_wait_seconds_count{priority=\"standard\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_queued_leaves_the_queue() {
    let s = start_shard(ShardSpec::new("s1", "home").itl_ms(20)).await;
    let gw = Gateway::start(&policy_text(&[&s], &fixed_limit(30))).await;
    let holder = hold_slot(&gw, 50); // about 1 s
    wait_inflight(&gw).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let queued = impatient
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(20, true))
        .send();
    let depth = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.status().await["admission"]["queue_depth"]["standard"].clone()
    };
    let (gone, depth_while_waiting) = tokio::join!(queued, depth);
    assert!(gone.is_err(), "the impatient client got an answer");
    assert_eq!(depth_while_waiting, 1, "it never queued");
    // It leaves the queue at once, not when its deadline would have passed.
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let d = gw.status().await["admission"]["queue_depth"]["standard"].clone();
        if d == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still queued: {d}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(holder.await.unwrap(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        s.stats().requests_total,
        1,
        "the departed request reached the shard"
    );
}

#[tokio::test]
async fn a_prompt_over_the_context_window_gets_400_at_once() {
    let s = start_shard(ShardSpec::new("s1", "home")).await;
    let text = policy_text(&[&s], "").replace(
        "models = [\"test-model\"]\n",
        "models = [\"test-model\"]\ncontext_window = 1000\n",
    );
    let gw = Gateway::start(&text).await;
    for body in [
        chat(2000, false), // the completion alone is too long
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(8000)}], "max_tokens": 10}),
    ] {
        let started = Instant::now();
        let r = post(&gw, None, &body).await;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert!(v["error"]["message"].as_str().unwrap().contains("1000"));
        assert!(started.elapsed() < Duration::from_millis(300));
    }
    assert_eq!(s.stats().requests_total, 0);
    assert_eq!(post(&gw, None, &chat(500, false)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_on_a_slow_prefill_shard_completes_without_a_retry() {
    // 100 tokens/s: the simulator prefills at 1,000 tokens/s, so an 8,000-byte prompt
    // (about 2,200 tokens by its count) takes about 2.2 s before its first token — more
    // than the 1 s first-byte timeout. The gateway's estimate (2,000 tokens at 10 × 100)
    // extends the deadline by 2 s.
    let slow = start_shard(ShardSpec::new("slow", "home").capacity(100.0)).await;
    let spare = start_shard(ShardSpec::new("spare", "away")).await;
    let timeouts = "[timeouts]\nfirst_byte_ms = 1000\n";
    let gw = Gateway::start(&policy_text(&[&slow, &spare], timeouts)).await;
    let long = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "p".repeat(8000)}],
        "max_tokens": 2,
        "stream": true,
    });
    let r = post(&gw, None, &long).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-breakwater-shard"], "slow");
    assert!(r.text().await.unwrap().contains("[DONE]"));
    assert_eq!(slow.stats().requests_total, 1);
    assert_eq!(spare.stats().requests_total, 0, "it was retried");

    // Without the extension (prefill assumed 1000 × faster) it times out, and a prompt
    // above max_retry_prompt_tokens is not retried: one attempt, a 502.
    let no_extension =
        format!("{timeouts}\n[routing]\nprefill_speedup = 1000\nmax_retry_prompt_tokens = 1000\n");
    let gw = Gateway::start(&policy_text(&[&slow, &spare], &no_extension)).await;
    let (before_slow, before_spare) = (slow.stats().requests_total, spare.stats().requests_total);
    // Another prompt of the same size: the engine's prefix cache holds the first one, whose
    // prefill it would skip.
    let mut other = long.clone();
    other["messages"][0]["content"] = json!("q".repeat(8000));
    let r = post(&gw, None, &other).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");
    let attempts =
        slow.stats().requests_total - before_slow + spare.stats().requests_total - before_spare;
    assert_eq!(
        attempts, 1,
        "a heavy prompt was retried after a first-byte timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_admission_off_everything_is_forwarded_as_before() {
    let s = start_shard(ShardSpec {
        slots: 1,
        ..ShardSpec::new("s1", "home").itl_ms(10)
    })
    .await;
    let extra = format!(
        "{}\n{}",
        fixed_limit(30).replace("[admission]\n", "[admission]\nenabled = false\n"),
        tenant("bulk", "sk-bulk", "sheddable", "")
    );
    let gw = Gateway::start(&policy_text(&[&s], &extra)).await;
    let length = Duration::from_secs(1);
    let (a, b, c) = tokio::join!(
        client_loop(&gw, "sk-bulk", length),
        client_loop(&gw, "sk-bulk", length),
        client_loop(&gw, "sk-bulk", length),
    );
    let all: Vec<_> = a.into_iter().chain(b).chain(c).collect();
    assert!(all.iter().all(|o| o.0 == 200), "{all:?}");
    assert_eq!(s.stats().requests_total, all.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_never_runs_more_requests_than_its_declared_slots() {
    // 20 tokens at 20 ms each: every request holds its slot about 0.4 s.
    let s = start_shard(ShardSpec::new("s1", "home").itl_ms(20)).await;
    let text = policy_text(&[&s], "").replace(
        "capacity_tps = 1000\n",
        "capacity_tps = 1000\nmax_requests = 2\n",
    );
    assert!(text.contains("max_requests = 2"), "{text}");
    let gw = Gateway::start(&text).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 20, "stream": true});
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (url, body) = (gw.url("/v1/chat/completions"), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = client().post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    // Sampled while they run: the engine never has more than 2 at once.
    let mut most = 0;
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < deadline {
        most = most.max(s.stats().running + s.stats().waiting);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut served = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        if status == 200 {
            assert!(text.contains("[DONE]"));
            served += 1;
        }
    }
    assert!(most <= 2, "{most} requests on a shard of 2 slots");
    assert!(most >= 2, "the slots were used");
    assert!(
        served >= 3,
        "queued requests were served as slots freed: {served} of 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_queue_it_may_not_join_a_request_is_refused_before_its_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start_shard(ShardSpec::new("s1", "home").itl_ms(20)).await;
    // Sheddable requests may not queue at all: any queue is one they may not join.
    let extra = format!(
        "{}sheddable_queue_timeout_ms = 0\n{}",
        fixed_limit(30),
        tenant("bulk", "sk-bulk", "sheddable", "")
    );
    let gw = Gateway::start(&policy_text(&[&s], &extra)).await;
    let holder = hold_slot(&gw, 35); // about 0.7 s, within the queued one's 1 s
    wait_inflight(&gw).await;
    let queued = hold_slot(&gw, 5); // standard: waits in the queue behind the holder
    wait_queued(&gw, "standard").await;
    // A sheddable request may not queue at all: its header alone decides, so it is
    // answered although its body never comes.
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-bulk\r\n\
          Content-Type: application/json\r\nContent-Length: 200\r\n\r\n",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
            .await
            .expect("no answer without the body")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    eprintln!("refused before the body in {:?}", started.elapsed());
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(head.contains("x-breakwater-overloaded: true"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    // The body follows late; it is read and dropped, and the connection serves on.
    conn.write_all(&[b' '; 200]).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    while !rest.contains("HTTP/1.1 200") {
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
            .await
            .expect("the connection did not serve its next request")
            .unwrap();
        assert!(n > 0, "the connection was closed after the refusal: {rest}");
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(queued.await.unwrap(), 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"breakwater_refused_total{priority="sheddable",reason="overloaded",tenant="bulk"} 1"#
        ),
        "{metrics}"
    );
    assert_eq!(
        s.stats().requests_total,
        2,
        "the refused request reached the shard"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_sheddable_request_goes_before_standard_ones_that_came_a_target_later() {
    let s = start_shard(ShardSpec::new("s1", "home").itl_ms(20)).await;
    // One request's room (27 tokens each of 30); sheddable waiters count as arriving 500 ms late.
    let extra = format!(
        "{}queue_timeout_ms = 5000\nsheddable_queue_timeout_ms = 3000\nqueue_target_ms = 500\n{}",
        fixed_limit(30),
        tenant("bulk", "sk-bulk", "sheddable", "")
    );
    let gw = std::sync::Arc::new(Gateway::start(&policy_text(&[&s], &extra)).await);
    let holder = hold_slot(&gw, 100); // about 2 s
    wait_inflight(&gw).await;
    let started = Instant::now();
    let g = gw.clone();
    let sheddable = tokio::spawn(async move {
        let r = post(&g, Some("sk-bulk"), &chat(20, false)).await;
        (r.status().as_u16(), started.elapsed())
    });
    wait_queued(&gw, "sheddable").await;
    // A standard request that comes more than the target later ...
    tokio::time::sleep(Duration::from_millis(700)).await;
    let g = gw.clone();
    let standard = tokio::spawn(async move {
        let r = post(&g, None, &chat(20, false)).await;
        (r.status().as_u16(), started.elapsed())
    });
    wait_queued(&gw, "standard").await;
    assert_eq!(
        gw.status().await["admission"]["queue_depth"]["sheddable"],
        1,
        "the standard arrival evicted the sheddable waiter"
    );
    assert_eq!(holder.await.unwrap(), 200);
    let (shed_status, shed_done) = sheddable.await.unwrap();
    let (std_status, std_done) = standard.await.unwrap();
    assert_eq!((shed_status, std_status), (200, 200));
    // ... goes after it: one request at a time, so the first granted ends first.
    assert!(
        shed_done < std_done,
        "the sheddable request was starved: {shed_done:?} against {std_done:?}"
    );
    assert_eq!(s.stats().requests_total, 3);
}

/// `breakwater_queue_wait_seconds` for `priority`: the waits counted, and those within `le`
/// seconds (a bucket bound of the histogram).
fn queue_waits(metrics: &str, priority: &str, le: &str) -> (u64, u64) {
    let value = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
    };
    (
        value(&format!(
            "breakwater_queue_wait_seconds_count{{priority=\"{priority}\"}}"
        )),
        value(&format!(
            "breakwater_queue_wait_seconds_bucket{{priority=\"{priority}\",le=\"{le}\"}}"
        )),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_twice_capacity_standard_requests_join_only_the_queue_target_though_the_queue_empties() {
    // Two slots, 10 tokens at 20 ms: about 9 requests/s. Offered: 20/s, open loop, 3 s.
    let s = start_shard(ShardSpec::new("s1", "home").itl_ms(20)).await;
    let text = policy_text(
        &[&s],
        "[admission]\nqueue_target_ms = 40\nqueue_timeout_ms = 3000\n",
    )
    .replace(
        "capacity_tps = 1000\n",
        "capacity_tps = 1000\nmax_requests = 2\n",
    );
    assert!(text.contains("max_requests = 2"), "{text}");
    let gw = Gateway::start(&text).await;
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let url = gw.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let r = client()
                .post(url)
                .json(&chat(10, true))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let _ = r.text().await;
            status
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(served + refused, statuses.len(), "{statuses:?}");
    assert!(refused >= 10, "twice capacity was offered: {statuses:?}");
    // The queue empties now and then (a slot that frees is granted at once): each time,
    // a standard request allowed its whole timeout would join behind a second of others.
    let (waits, within) = queue_waits(&gw.metrics().await, "standard", "0.2");
    eprintln!("{served} served, {refused} refused; {within} of {waits} queue waits within 200 ms");
    // (At most a few in the first second, before the rates that say "overloaded" are
    // measured.)
    assert!(
        waits - within <= 3,
        "{} of {waits} queue waits over 200 ms with a 40 ms target",
        waits - within
    );
    assert!(
        served >= 20,
        "the slots were kept busy: {served} served in 3 s"
    );
}
