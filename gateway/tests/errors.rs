//! Every bad input and every failure the gateway answers itself: the status, the OpenAI
//! error body, that nothing reached a shard, and that the gateway keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use llm_sim::FaultMode;
use serde_json::{json, Value};

/// Sends a raw body; returns status, headers and the parsed error object.
async fn send(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client()
        .request(method, gw.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    (status, headers, body)
}

fn assert_openai_error(body: &Value, code: &str) {
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    // The `type` OpenAI clients switch on, for each code the gateway answers.
    let kind = match code {
        "invalid_request"
        | "model_not_found"
        | "request_too_large"
        | "not_found"
        | "method_not_allowed"
        | "context_length_exceeded" => "invalid_request_error",
        "invalid_api_key" => "authentication_error",
        "rate_limit_exceeded" | "server_overloaded" | "overloaded" => "rate_limit_error",
        "no_shard_available" | "upstream_error" | "upstream_timeout" | "gateway_overloaded" => {
            "server_error"
        }
        other => panic!("no expected type for code {other}"),
    };
    assert_eq!(e["type"], kind, "{body}");
    assert!(e.get("param").is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_openai_errors_and_never_reach_a_shard() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    // A second pool in the home region serves a model but has no shards.
    let policy = policy_text(&[&a], "").replace(
        "[[shards]]",
        "[[pools]]\nid = \"nobody-home\"\nregion = \"home\"\nmodels = [\"lonely-model\"]\n\n[[shards]]",
    ) + "\n[limits]\nmax_body_bytes = 65536\n";
    let gw = Gateway::start(&policy).await;
    let post = reqwest::Method::POST;

    let (s, _, b) = send(
        &gw,
        post.clone(),
        "/v1/chat/completions",
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(s, 400);
    assert_openai_error(&b, "invalid_request");

    let (s, _, b) = send(
        &gw,
        post.clone(),
        "/v1/chat/completions",
        br#"{"messages":[]}"#.to_vec(),
    )
    .await;
    assert_eq!(s, 400);
    assert!(b["error"]["message"].as_str().unwrap().contains("model"));

    let unknown = serde_json::to_vec(&json!({"model": "gpt-9", "messages": []})).unwrap();
    let (s, _, b) = send(&gw, post.clone(), "/v1/chat/completions", unknown).await;
    assert_eq!(s, 404);
    assert_openai_error(&b, "model_not_found");

    let big = serde_json::to_vec(
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(70_000)}]}),
    )
    .unwrap();
    let (s, _, b) = send(&gw, post.clone(), "/v1/chat/completions", big).await;
    assert_eq!(s, 413);
    assert_openai_error(&b, "request_too_large");

    let lonely = serde_json::to_vec(&json!({"model": "lonely-model", "messages": []})).unwrap();
    let (s, h, b) = send(&gw, post.clone(), "/v1/chat/completions", lonely).await;
    assert_eq!(s, 503);
    assert_eq!(h["retry-after"], "1");
    assert_openai_error(&b, "no_shard_available");

    let (s, _, b) = send(&gw, post.clone(), "/v1/assistants", b"{}".to_vec()).await;
    assert_eq!(s, 404);
    assert_openai_error(&b, "not_found");
    // An unknown path is told what is served.
    let message = b["error"]["message"].as_str().unwrap();
    assert!(message.contains("POST /v1/chat/completions"), "{message}");
    let (s, _, b) = send(&gw, reqwest::Method::GET, "/v1/models/gpt-9", vec![]).await;
    assert_eq!(s, 404);
    assert_openai_error(&b, "model_not_found");
    let (s, _, b) = send(&gw, reqwest::Method::GET, "/v1/models/%FF%FE", vec![]).await;
    assert_eq!(s, 400);
    assert_openai_error(&b, "invalid_request");
    let (s, _, b) = send(&gw, reqwest::Method::GET, "/v1/chat/completions", vec![]).await;
    assert_eq!(s, 405);
    assert_openai_error(&b, "method_not_allowed");

    // Nothing above was forwarded; every response carried a request id; the gateway
    // still serves.
    assert_eq!(a.stats().requests_total, 0);
    gw.chat_ok().await;
    assert_eq!(a.stats().requests_total, 1);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// Writes `request` on a fresh connection and reads until the gateway closes it.
async fn raw_exchange(gw: &Gateway, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_are_not_http_get_a_400_in_the_openai_format_and_a_close() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    for garbage in [
        &b"HELLO THERE\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nno colon in this field\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
    ] {
        let answer = raw_exchange(&gw, garbage).await;
        let shown = String::from_utf8_lossy(garbage);
        assert!(answer.starts_with("HTTP/1.1 400"), "{shown:?} -> {answer}");
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap())
            .unwrap_or_else(|e| panic!("{shown:?} -> {answer}: {e}"));
        assert_openai_error(&body, "invalid_request");
    }
    // Well-formed requests one after another on one kept-alive connection: each answered,
    // a HEAD without a body, and the connection closed when the client asks.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut seen = String::new();
    for (request, expect_body) in [
        ("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", true),
        ("HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", false),
        (
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            true,
        ),
    ] {
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the head is complete and, where a body is expected, the body too.
        let complete = |a: &[u8]| {
            let text = String::from_utf8_lossy(a);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.parse().unwrap())
                })
                .unwrap();
            !expect_body || body.len() >= len
        };
        while !complete(&answer) {
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n > 0,
                "closed early after {seen}{}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{request:?} -> {answer}"
        );
        assert_eq!(
            answer.ends_with("\r\n\r\n"),
            !expect_body,
            "{request:?} -> {answer}"
        );
        seen.push_str(&answer);
    }
    assert!(seen.ends_with(r#"{"ready":true}"#), "{seen}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?} {rest:?}");
    assert_eq!(a.stats().requests_total, 0);
    gw.chat_ok().await;
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_body_is_answered_413_even_while_the_client_is_still_sending() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw =
        Gateway::start(&(policy_text(&[&a], "") + "\n[limits]\nmax_body_bytes = 65536\n")).await;
    // 4 MiB, far more than the socket buffers hold: the client is still writing when the
    // gateway answers, which is when a plain close would reset the connection.
    let chunked = || {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..512).map(|_| Ok(vec![b' '; 8192])).collect();
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
    };
    for round in 0..5 {
        // Chunked upload: the gateway only learns the size while reading.
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .body(chunked())
            .send()
            .await
            .unwrap_or_else(|e| panic!("chunked round {round}: {e:?}"));
        assert_eq!(resp.status(), 413);
        let body: Value = resp.json().await.unwrap();
        assert_openai_error(&body, "request_too_large");
        // Declared length: refused before reading a byte of the body.
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .body(vec![b' '; 4 << 20])
            .send()
            .await
            .unwrap_or_else(|e| panic!("declared round {round}: {e:?}"));
        assert_eq!(resp.status(), 413);
    }
    assert_eq!(a.stats().requests_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_failures_are_502s_that_list_every_attempt() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    a.fault(FaultMode::Error);
    b.fault(FaultMode::Error);
    let gw = Gateway::start(&policy_text(&[&a, &b], "")).await;
    let (s, h, body) = send(
        &gw,
        reqwest::Method::POST,
        "/v1/chat/completions",
        serde_json::to_vec(&chat(2, false)).unwrap(),
    )
    .await;
    assert_eq!(s, 502);
    assert!(h.contains_key("x-request-id"));
    assert_openai_error(&body, "upstream_error");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("a (home): status 500") && msg.contains("b (home): status 500"),
        "{msg}"
    );
    assert_eq!(a.stats().requests_total + b.stats().requests_total, 2);

    // A refused connection is an upstream failure too.
    a.fault(FaultMode::Down);
    b.fault(FaultMode::Down);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, _, body) = send(
        &gw,
        reqwest::Method::POST,
        "/v1/chat/completions",
        serde_json::to_vec(&chat(2, false)).unwrap(),
    )
    .await;
    assert_eq!(s, 502);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("connection failed"),
        "{body}"
    );
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_shard_times_out_at_the_first_byte_timeout() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    a.fault(FaultMode::Hang);
    let gw = Gateway::start(&policy_text(&[&a], "\n[timeouts]\nfirst_byte_ms = 300\n")).await;
    let started = Instant::now();
    let (s, _, body) = send(
        &gw,
        reqwest::Method::POST,
        "/v1/chat/completions",
        serde_json::to_vec(&chat(2, false)).unwrap(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(s, 502);
    assert_openai_error(&body, "upstream_timeout");
    // One shard, so one attempt: the client waits the timeout, not much more.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_api_needs_its_token() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    let url = format!("http://{}/admin/status", gw.admin);
    assert_eq!(client().get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client()
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let status = gw.status().await;
    let shard = &status["shards"][0];
    for key in [
        "id",
        "region",
        "pool",
        "url",
        "state",
        "inflight_tokens",
        "capacity_tps",
    ] {
        assert!(!shard[key].is_null(), "missing {key}: {status}");
    }
    assert_eq!(shard["state"], "healthy");
    // Outside demo mode there is no fault injection.
    let fault = client()
        .post(format!("http://{}/admin/shards/a/fault", gw.admin))
        .bearer_auth(ADMIN_TOKEN)
        .body(r#"{"mode":"down"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(fault.status(), 404);
    assert_eq!(a.sim.engine().fault().mode, FaultMode::Ok);
    // The token never shows in logs.
    assert!(!gw.log().contains(ADMIN_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_beyond_the_global_buffer_budget_get_503_with_retry_after() {
    let a = start_shard(ShardSpec::new("a", "home").capacity(1e6)).await;
    a.fault(FaultMode::Hang);
    let limits = "\n[limits]\nmax_body_bytes = 1048576\nmax_buffered_bytes = 1572864\n[timeouts]\nfirst_byte_ms = 1500\n";
    let gw = Gateway::start(&policy_text(&[&a], limits)).await;
    let body = |n: usize| {
        serde_json::to_vec(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(n)}], "max_tokens": 1})).unwrap()
    };
    // The first request holds ~1 MiB while the shard hangs.
    let url = gw.url("/v1/chat/completions");
    let first_body = body(1_000_000);
    let first = tokio::spawn(async move {
        client()
            .post(url)
            .header("content-type", "application/json")
            .body(first_body)
            .send()
            .await
            .unwrap()
            .status()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stats().requests_total == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A second one would take the total past 1.5 MiB: refused, not forwarded.
    let (s, h, b) = send(
        &gw,
        reqwest::Method::POST,
        "/v1/chat/completions",
        body(1_000_000),
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(h["retry-after"], "1");
    assert_openai_error(&b, "gateway_overloaded");
    assert_eq!(a.stats().requests_total, 1);
    // A small one still fits.
    a.fault(FaultMode::Ok);
    let (s, _, _) = send(
        &gw,
        reqwest::Method::POST,
        "/v1/chat/completions",
        body(1000),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(first.await.unwrap(), 502);
    // Once the first is answered its bytes are released.
    let (s, _, _) = send(
        &gw,
        reqwest::Method::POST,
        "/v1/chat/completions",
        body(1_000_000),
    )
    .await;
    assert_eq!(s, 200);
}

/// An engine that answers every request with `answer`, whatever it is, then closes.
async fn engine_answering(answer: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut seen = Vec::new();
                // The whole request: the gateway sends head and body together.
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(answer).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_answers_from_an_engine_are_502s_that_say_what_was_wrong() {
    let big: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n{}",
            " ".repeat(4096)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let cases: [(&'static [u8], &str); 5] = [
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n{}",
            "invalid content-length",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}",
            "before the end of the body",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "malformed chunked body",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed response head"),
        (big, "response larger than 1024 bytes"),
    ];
    for (answer, expected) in cases {
        let addr = engine_answering(answer).await;
        let policy = one_shard_policy("broken", &addr, "[limits]\nmax_response_bytes = 1024\n");
        let gw = Gateway::start(&policy).await;
        let (status, headers, body) = send(
            &gw,
            reqwest::Method::POST,
            "/v1/chat/completions",
            serde_json::to_vec(&chat(2, false)).unwrap(),
        )
        .await;
        assert_eq!(status, 502, "{expected}: {body}");
        assert!(headers.contains_key("x-request-id"));
        assert_openai_error(&body, "upstream_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{expected}: {message}");
        assert!(!gw.log().contains("panicked"), "{}", gw.log());
    }
}
