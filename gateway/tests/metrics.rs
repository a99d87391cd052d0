//! The live `/metrics` after real traffic passes `promtool check metrics` (Prometheus's own
//! linter: names, types, `_total` only on counters, units) and carries no secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, policy_text, start_shard, Gateway, ShardSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_metrics_pass_promtool_and_hold_no_key() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let key = "sk-metrics-test-key";
    let digest = breakwater::admission::tenant::key_digest_hex(key);
    let tenants = format!(
        "[[tenants]]\nid = \"acme\"\napi_key_sha256 = [\"{digest}\"]\npriority = \"critical\"\nrpm = 600\n"
    );
    let gw = Gateway::start(&policy_text(&[&a], &tenants)).await;
    // Some of everything: keyed and keyless, plain and streamed, an unknown model, a reload.
    for stream in [false, true] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat(4, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    gw.chat_ok().await;
    let mut missing = chat(2, false);
    missing["model"] = "no-such-model".into();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&missing)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(gw.reload().await.0, 200);
    let text = gw.metrics().await;
    assert!(text.contains("breakwater_requests_total"), "{text}");
    assert!(text.contains("breakwater_policy_info{"), "{text}");
    assert!(
        !text.contains(key) && !text.contains(&digest),
        "a key in the metrics"
    );

    if let Err(said) = common::promtool_check(&text) {
        panic!("promtool: {said}");
    }
    // The series a Prometheus user expects, labelled from the policy.
    for series in [
        "breakwater_requests_total{model=\"test-model\",region=\"home\",shard=\"a\",status=\"200\",tenant=\"acme\"} 2",
        "breakwater_requests_total{model=\"unknown\",region=\"\",shard=\"\",status=\"404\",tenant=\"default\"} 1",
        "breakwater_prompt_tokens_total{model=\"test-model\",tenant=\"acme\"}",
        // The streamed answer reported no usage (no stream_options.include_usage): only
        // the plain one counts.
        "breakwater_completion_tokens_total{model=\"test-model\",tenant=\"acme\"} 4",
        "breakwater_time_per_output_token_seconds_count{model=\"test-model\"} 1",
        "breakwater_gateway_overhead_seconds_count 3",
        "breakwater_build_info{version=",
    ] {
        assert!(text.contains(series), "no {series} in\n{text}");
    }
}
