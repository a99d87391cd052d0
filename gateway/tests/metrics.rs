//! The live `/metrics` after real traffic passes `promtool check metrics` (Prometheus's own
//! linter: names, types, `_total` only on counters, units) and carries no secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

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

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool (Debian's prometheus package) is needed for this test; .ci/run installs it",
        );
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}
