//! The Responses API (`POST /v1/responses`) end to end: plain and streamed answers, usage
//! counted from `response.completed`, a shard that dies after opening the response retried
//! with no trace of it, and a shard that dies mid-answer ending the stream with an `error`
//! event in the Responses format.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{client, policy_text, post, start_shard, Gateway, ShardSpec, MODEL};
use llm_sim::{Fault, FaultMode};
use serde_json::{json, Value};

fn responses(max_output_tokens: u64, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "instructions": "Answer in one sentence.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "What is a breakwater?"}]}],
        "max_output_tokens": max_output_tokens,
        "stream": stream,
    })
}

/// The (event name, data) pairs of a Responses stream.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|_| panic!("not JSON: {d}"));
                }
            }
            (name, data)
        })
        .collect()
}

/// The model's completion tokens counted from answers' usage, in `/metrics`.
async fn completion_tokens(gw: &Gateway) -> u64 {
    gw.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("breakwater_completion_tokens_total{") && l.contains(MODEL))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn responses_plain_and_streamed_are_routed_and_their_usage_counted() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;

    let resp = post(&gw, "/v1/responses", &responses(12, false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-breakwater-shard"], "a");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert!(v["id"].as_str().unwrap().starts_with("resp_"));
    let text = v["output"][0]["content"][0]["text"].as_str().unwrap();
    assert!(text.len() > 20, "{v}");
    assert_eq!(v["usage"]["output_tokens"], 12);
    assert_eq!(
        completion_tokens(&gw).await,
        12,
        "usage read from the Responses body"
    );

    let resp = post(&gw, "/v1/responses", &responses(10, true)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = resp.text().await.unwrap();
    let evs = events(&body);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"), "{body}");
    assert_eq!(names.last(), Some(&"response.completed"), "{body}");
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "response.output_text.delta")
            .count(),
        10
    );
    // Every event is relayed as sent: its `type` matches its name, sequence numbers count up.
    for (i, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i as u64);
    }
    assert!(!body.contains("[DONE]"));
    assert_eq!(
        completion_tokens(&gw).await,
        22,
        "usage read from response.completed"
    );
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test]
async fn a_shard_that_dies_after_opening_the_response_is_retried_with_no_trace_of_it() {
    let dying = start_shard(ShardSpec::new("dying", "home")).await;
    let healthy = start_shard(ShardSpec::new("healthy", "away")).await;
    // The engine sends response.created, in_progress and the empty message and part, then
    // crashes before its first token: nothing the client could use has been made.
    dying.set_fault(Fault {
        after_tokens: 0,
        ..Fault::new(FaultMode::Midstream)
    });
    let gw = Gateway::start(&policy_text(&[&dying, &healthy], "")).await;
    for _ in 0..3 {
        let resp = post(&gw, "/v1/responses", &responses(4, true)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-breakwater-shard"], "healthy");
        let body = resp.text().await.unwrap();
        let evs = events(&body);
        assert_eq!(
            evs.iter().filter(|(n, _)| n == "response.created").count(),
            1,
            "one response, from the healthy shard only: {body}"
        );
        assert_eq!(evs.last().unwrap().0, "response.completed", "{body}");
        assert!(!body.contains("\"error\""), "{body}");
    }
    assert_eq!(dying.stats().requests_total, 3);
    assert_eq!(healthy.stats().completed_total, 3);
}

#[tokio::test]
async fn a_shard_that_dies_mid_answer_ends_the_stream_with_a_responses_error_event() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    a.set_fault(Fault {
        after_tokens: 3,
        ..Fault::new(FaultMode::Midstream)
    });
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    let resp = post(&gw, "/v1/responses", &responses(10, true)).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let evs = events(&body);
    let deltas = evs
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .count();
    assert_eq!(deltas, 3, "{body}");
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "error", "{body}");
    assert_eq!(data["type"], "error");
    assert_eq!(data["code"], "upstream_error");
    assert!(data["message"]
        .as_str()
        .unwrap()
        .contains("the shard failed mid-stream"));
    // Numbered after the 4 preamble events and 3 deltas.
    assert_eq!(data["sequence_number"], 7);
    assert!(!body.contains("response.completed"));
    // Output had started: no second attempt.
    assert_eq!(a.stats().requests_total, 1);
    assert_eq!(gw.wait_ledger_zero().await, 0);
}

#[tokio::test]
async fn bad_responses_bodies_are_openai_400s() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    for (body, needle) in [
        (json!({"model": MODEL}), "`input` field is required"),
        (
            json!({"model": MODEL, "input": "hi", "max_output_tokens": -3}),
            "max_output_tokens",
        ),
        (json!({"input": "hi"}), "`model` field is required"),
    ] {
        let resp = post(&gw, "/v1/responses", &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
    }
    assert_eq!(a.stats().requests_total, 0, "nothing bad is forwarded");
}

/// Posts an audio form of `model` to `path`.
async fn post_form(gw: &Gateway, path: &str, model: &str, audio: &[u8]) -> reqwest::Response {
    let (ct, body) = audio_form(model, audio);
    client()
        .post(gw.url(path))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The OpenAI error message of a response.
async fn error_message(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A `multipart/form-data` body with `model` (after the file, as some clients send it).
fn audio_form(model: &str, audio: &[u8]) -> (String, Vec<u8>) {
    let boundary = "breakwater-test-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(audio);
    body.extend_from_slice(
        format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n").as_bytes(),
    );
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn audio_forms_are_routed_by_their_model_field_and_pools_serve_only_what_they_list() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a], "")).await;
    for path in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        let resp = post_form(&gw, path, MODEL, &[7u8; 40_000]).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["x-breakwater-shard"], "a");
        let v: Value = resp.json().await.unwrap();
        assert!(v["text"].as_str().unwrap().split(' ').count() >= 9, "{v}");
    }
    // A form without a model, an unknown model, and a body that is not a form.
    let resp = post_form(&gw, "/v1/audio/transcriptions", "", b"RIFF").await;
    assert_eq!(resp.status(), 400);
    let msg = error_message(resp).await;
    assert!(msg.contains("`model` form field"), "{msg}");
    let resp = post_form(&gw, "/v1/audio/transcriptions", "no-such-model", b"RIFF").await;
    assert_eq!(resp.status(), 404);
    let resp = post(&gw, "/v1/audio/transcriptions", &json!({"model": MODEL})).await;
    assert_eq!(resp.status(), 400);
    let msg = error_message(resp).await;
    assert!(msg.contains("multipart/form-data"), "{msg}");
    assert_eq!(
        a.stats().requests_total,
        2,
        "only the two good forms reached the shard"
    );
    drop(gw);

    // A pool that lists its endpoints: anything else is a clear 404, never forwarded.
    let gw = Gateway::start(&policy_text(&[&a], "").replace(
        "models = [\"test-model\"]",
        "models = [\"test-model\"]\nendpoints = [\"chat\", \"responses\"]",
    ))
    .await;
    let resp = post(&gw, "/v1/responses", &responses(3, false)).await;
    assert_eq!(resp.status(), 200);
    let resp = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "endpoint_not_served", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("POST /v1/embeddings")
            && msg.contains("POST /v1/chat/completions, POST /v1/responses"),
        "{msg}"
    );
    assert_eq!(a.stats().requests_total, 3);
}

#[tokio::test]
async fn stored_responses_are_fetched_and_deleted_on_the_shard_that_made_them() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "away")).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], "")).await;
    // Made through the gateway (on the home shard, a), plain and streamed.
    let made: Value = post(&gw, "/v1/responses", &responses(5, false))
        .await
        .json()
        .await
        .unwrap();
    let plain_id = made["id"].as_str().unwrap().to_string();
    let streamed = post(&gw, "/v1/responses", &responses(5, true))
        .await
        .text()
        .await
        .unwrap();
    let stream_id = events(&streamed)[0].1["response"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for id in [&plain_id, &stream_id] {
        let resp = client()
            .get(gw.url(&format!("/v1/responses/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{id}");
        assert_eq!(resp.headers()["x-breakwater-shard"], "a");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["id"], id.as_str());
        assert_eq!(v["status"], "completed");
    }
    // Made on b without the gateway (another replica's work): found by asking each shard.
    let direct: Value = client()
        .post(format!("{}/v1/responses", b.sim.url()))
        .json(&responses(3, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = direct["id"].as_str().unwrap();
    let resp = client()
        .get(gw.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-breakwater-shard"], "b");
    // Deleted there; then every shard says 404, and so does the gateway, in the engine's words.
    let resp = client()
        .delete(gw.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["deleted"], true);
    let resp = client()
        .get(gw.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "response_not_found", "{v}");
    // A response made with `store: false` is not kept.
    let mut unstored = responses(2, false);
    unstored["store"] = json!(false);
    let v: Value = post(&gw, "/v1/responses", &unstored)
        .await
        .json()
        .await
        .unwrap();
    let resp = client()
        .get(gw.url(&format!("/v1/responses/{}", v["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Made through the gateway on b (a drained meanwhile): the gateway remembers, so the
    // lookup goes to b without asking a.
    let (status, _) = gw.admin_post("/admin/shards/a/drain").await;
    assert_eq!(status, 200);
    let on_b: Value = post(&gw, "/v1/responses", &responses(2, false))
        .await
        .json()
        .await
        .unwrap();
    gw.admin_post("/admin/shards/a/undrain").await;
    let asked_a = a.stats().requests_total;
    let resp = client()
        .get(gw.url(&format!("/v1/responses/{}", on_b["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-breakwater-shard"], "b");
    assert_eq!(
        a.stats().requests_total,
        asked_a,
        "straight to the shard that made it"
    );
    // Only GET and DELETE on an id (and GET …/input_items, POST …/cancel) are routes.
    let resp = client()
        .put(gw.url(&format!("/v1/responses/{plain_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn stored_responses_need_the_same_key_as_inference() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let tenants = format!(
        "[admission]\nrequire_api_key = true\n\n[[tenants]]\nid = \"t\"\napi_key_sha256 = [\"{}\"]\n",
        breakwater::admission::tenant::key_digest_hex("sk-test")
    );
    let gw = Gateway::start(&policy_text(&[&a], &tenants)).await;
    let made: Value = client()
        .post(gw.url("/v1/responses"))
        .bearer_auth("sk-test")
        .json(&responses(2, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = gw.url(&format!("/v1/responses/{}", made["id"].as_str().unwrap()));
    let before = a.stats().requests_total;
    for req in [
        client().get(&url),
        client().get(&url).bearer_auth("sk-wrong"),
        client().delete(&url),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    }
    assert_eq!(
        a.stats().requests_total,
        before,
        "nothing reached the shard"
    );
    let resp = client()
        .get(&url)
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
