//! The data path end to end: non-streamed and streamed completions through a real gateway
//! process to simulated shards on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_streamed_completion_carries_routing_headers_and_usage() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "req-123")
        .json(&chat(7, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-breakwater-shard"], "a");
    assert_eq!(resp.headers()["x-breakwater-region"], "home");
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["completion_tokens"], 7);

    // The other endpoints, and a generated request id when the client sends none.
    let resp = client()
        .post(gw.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "Once", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"].len(), 32);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["object"],
        "text_completion"
    );
    let resp = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": MODEL, "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The model list comes from the policy, in the OpenAI list format.
    let models: Value = client()
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    // One model by id, as `client.models.retrieve(...)` asks for it.
    let model: Value = client()
        .get(gw.url(&format!("/v1/models/{MODEL}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(model, models["data"][0]);
    assert_eq!(
        client()
            .get(gw.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(a.stats().requests_total, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_engines_own_endpoints_are_routed_by_model_and_relayed() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "away")).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], "")).await;
    let post = |path: &str, body: Value| {
        let req = client().post(gw.url(path)).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let shard = resp
                .headers()
                .get("x-breakwater-shard")
                .map(|v| v.to_str().unwrap().to_string());
            (status, shard, resp.json::<Value>().await.unwrap())
        }
    };
    let docs = json!(["a breakwater", "a harbour", "a wave"]);
    for path in ["/v1/rerank", "/rerank"] {
        let (s, shard, body) = post(
            path,
            json!({"model": MODEL, "query": "what stops waves?", "documents": docs}),
        )
        .await;
        assert_eq!(s, 200, "{path}: {body}");
        assert_eq!(shard.as_deref(), Some("a"), "home region first");
        assert_eq!(body["results"].as_array().unwrap().len(), 3, "{body}");
    }
    for path in ["/v1/score", "/score"] {
        let (s, _, body) = post(
            path,
            json!({"model": MODEL, "text_1": "breakwater", "text_2": "jetty"}),
        )
        .await;
        assert_eq!(s, 200, "{path}: {body}");
        assert_eq!(body["data"][0]["object"], "score");
    }
    let (s, _, body) = post(
        "/tokenize",
        json!({"model": MODEL, "prompt": "x".repeat(360)}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body["count"], 100,
        "the engine's own tokenizer: 3.6 bytes a token"
    );
    let (s, _, body) = post("/detokenize", json!({"model": MODEL, "tokens": [0, 1, 2]})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["prompt"], "breakwater keeps the ");
    assert_eq!(a.stats().requests_total, 6);

    // The gateway reads `model` as for the rest: missing is a 400, unknown a 404, neither
    // forwarded.
    let (s, _, body) = post("/tokenize", json!({"prompt": "x"})).await;
    assert_eq!(s, 400);
    assert_eq!(body["error"]["code"], "invalid_request");
    let (s, _, body) = post(
        "/v1/rerank",
        json!({"model": "gpt-9", "query": "q", "documents": []}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(a.stats().requests_total + b.stats().requests_total, 6);
}

/// Reads a streamed body to the end and splits it into SSE events.
async fn events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_completion_relays_every_event_and_the_usage_chunk() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    let mut body = chat(5, true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-breakwater-shard"], "a");
    let ev = events(resp).await;
    assert_eq!(ev.len(), 7, "{ev:?}"); // 5 tokens, usage, [DONE]
    assert!(ev[0].contains("\"role\":\"assistant\""));
    assert!(ev[5].contains("\"usage\""));
    assert_eq!(ev[6], "data: [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_event_reaches_the_client_while_the_shard_is_still_generating() {
    // 40 tokens at 50 ms each: the shard needs about 2 s for the whole answer.
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(50)).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    let started = Instant::now();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(40, true))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    // At the moment the client holds the first event, the shard has not finished.
    let s = a.stats();
    assert_eq!(
        s.completed_total, 0,
        "the shard finished before the client saw a byte"
    );
    assert_eq!(s.running, 1);
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let total = started.elapsed();
    // The rest of the stream arrived after the first event: more token events, the end.
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.matches("data: {").count() >= 1, "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(
        first_at * 4 < total,
        "first event at {first_at:?} of {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_mib_prompt_reaches_the_shard_intact_and_is_replayed_whole_on_retry() {
    // The home region's only shard fails every request; the retry goes to the other region.
    // Fast engines: the simulator's prefill of 290k tokens would take 29 s at 1,000 tok/s.
    let failing = start_shard(ShardSpec::new("failing", "home").capacity(1e6)).await;
    let healthy = start_shard(ShardSpec::new("healthy", "away").capacity(1e6)).await;
    failing.fault(llm_sim::FaultMode::Error);
    let gw = Gateway::start(&policy_text(&[&failing, &healthy], "")).await;
    let prompt = "x".repeat(1 << 20);
    let body = serde_json::to_vec(&json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 2,
    }))
    .unwrap();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-breakwater-shard"], "healthy");
    assert_eq!(failing.stats().requests_total, 1);
    assert_eq!(failing.stats().max_body_bytes, body.len() as u64);
    assert_eq!(healthy.stats().max_body_bytes, body.len() as u64);
    // The shard counted the prompt it received: about 1 MiB / 3.6 bytes per token.
    assert!(
        healthy.stats().prompt_tokens_total > 290_000,
        "{:?}",
        healthy.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expect_100_continue_is_answered_and_the_body_forwarded() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    // A raw HTTP/1.1 client that waits for the interim 100 before sending the body.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_vec(&chat(2, false)).unwrap();
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(&body).await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&out).contains("\"usage\"") && Instant::now() < deadline {
        let mut chunk = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("200 OK"), "{text}");
    assert_eq!(a.stats().completed_total, 1);
}
