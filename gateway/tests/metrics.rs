//! The live `/metrics` after real traffic passes `promtool check metrics` (Prometheus's own
//! linter: names, types, `_total` only on counters, units) and carries no secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, policy_text, start_shard, Gateway, ShardSpec};

/// A tenant allowed one request a minute: its second is refused (429).
const TINY: &str = "[[tenants]]\nid = \"tiny\"\napi_key_sha256 = [\"15eeb0e5f53c219d9fb88fa052bcdb915d65a81995b9d4b1bb027c8b7f3d9d60\"]\npriority = \"sheddable\"\nrpm = 1\n";

/// Sends the `tiny` tenant's allowance and one more; the second is refused.
async fn refuse_one(gw: &Gateway) {
    let key = "sk-tiny";
    let policy_digest = breakwater::admission::tenant::key_digest_hex(key);
    assert!(
        TINY.contains(&policy_digest),
        "TINY's digest must be {policy_digest}"
    );
    for want in [200, 429] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat(2, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_metrics_pass_promtool_and_hold_no_key() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let key = "sk-metrics-test-key";
    let digest = breakwater::admission::tenant::key_digest_hex(key);
    let tenants = format!(
        "[[tenants]]\nid = \"acme\"\napi_key_sha256 = [\"{digest}\"]\npriority = \"critical\"\nrpm = 600\n{TINY}"
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
    refuse_one(&gw).await;
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
        "breakwater_gateway_overhead_seconds_count 4",
        "breakwater_build_info{version=",
    ] {
        assert!(text.contains(series), "no {series} in\n{text}");
    }
}

/// Every series the Grafana dashboard (`deploy/grafana/breakwater.json`) queries is one the
/// gateway exports, so a renamed metric cannot leave a panel silently empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_series_the_gateway_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/breakwater.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        for (i, _) in e.match_indices("breakwater_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            names.insert(name.trim_end_matches("_bucket").to_string());
        }
    }
    // A gateway that has served, refused, reloaded and seen GPUs: every family present.
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let probe = gpu_probe_sim().await;
    let policy = policy_text(&[&a], TINY).replace(
        &format!("url = \"{}\"", a.sim.url()),
        &format!(
            "url = \"{}\"\ngpu_probe = \"http://{probe}\"\ngpu_devices = [0]",
            a.sim.url()
        ),
    );
    let gw = Gateway::start(&policy).await;
    gw.chat_ok().await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(4, true))
        .send()
        .await
        .unwrap();
    r.bytes().await.unwrap();
    refuse_one(&gw).await;
    assert_eq!(gw.reload().await.0, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let text = gw.metrics().await;
        if text.contains("breakwater_gpu_verdict{") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !text.contains(&format!("# TYPE {n} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which the gateway does not export"
    );
}

/// A simulated gpu-probe on loopback (for the GPU series); its address.
async fn gpu_probe_sim() -> std::net::SocketAddr {
    use gpu_probe::classify::Thresholds;
    use gpu_probe::server::{self, Agent};
    use gpu_probe::source::simulated::SimulatedNode;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let node = SimulatedNode::new(1);
    let agent = Agent::new(
        Box::new(node.clone()),
        Thresholds::default(),
        std::time::Duration::from_millis(100),
        Some(node),
    );
    agent.refresh().unwrap();
    agent.spawn_poller();
    tokio::spawn(server::serve(agent, listener));
    addr
}
