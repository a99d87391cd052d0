//! Graceful shutdown: on SIGTERM the gateway turns not-ready at once, keeps accepting for
//! the policy's delay, then closes its listeners and lets what is in flight finish within
//! the grace period — ending any stream still running after it with an error event.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{chat, client, policy_text, start_shard, Gateway, ShardSpec};
use futures_util::StreamExt;

async fn stream_body(url: String, max_tokens: u64) -> (u16, String) {
    let r = client()
        .post(url)
        .json(&chat(max_tokens, true))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let mut body = String::new();
    let mut s = r.bytes_stream();
    while let Some(Ok(c)) = s.next().await {
        body.push_str(&String::from_utf8_lossy(&c));
    }
    (status, body)
}

async fn wait_inflight(gw: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.status().await["in_flight"].as_u64() < Some(n) {
        assert!(Instant::now() < deadline, "never {n} in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_twenty_open_streams_lets_all_of_them_finish() {
    // 80 tokens at 20 ms: each stream takes about 1.6 s. The capacity leaves room for all
    // twenty at once (admission would queue some of them on a smaller shard).
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(20).capacity(50_000.0)).await;
    let policy = policy_text(&[&a], "").replacen(
        "home_region = \"home\"",
        "home_region = \"home\"\nshutdown_delay_ms = 500\nshutdown_grace_ms = 20000",
        1,
    );
    let mut gw = Gateway::start(&policy).await;
    let streams: Vec<_> = (0..20)
        .map(|_| tokio::spawn(stream_body(gw.url("/v1/chat/completions"), 80)))
        .collect();
    wait_inflight(&gw, 20).await;
    let signalled = Instant::now();
    gw.signal("TERM");
    // Not ready at once (as soon as the signal is handled: well within 250 ms), while the
    // listener still takes new requests.
    loop {
        let ready = client().get(gw.url("/readyz")).send().await.unwrap();
        if ready.status() == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(250),
            "still ready after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during_delay = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(during_delay.status(), 200);
    assert_eq!(
        during_delay
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap().to_string()),
        Some("close".to_string()),
        "answers during the delay close their connections"
    );
    for s in streams {
        let (status, body) = s.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            body.contains("data: [DONE]") && !body.contains("\"error\""),
            "a stream was cut by the shutdown: {body}"
        );
    }
    // The listener closed after the delay, and the process left once nothing was in
    // flight — long before the 20 s grace.
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("the gateway did not exit");
    assert!(status.success(), "{status:?}: {}", gw.log());
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
    assert!(client().get(gw.url("/healthz")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_still_running_when_the_grace_ends_gets_an_error_event() {
    // 400 tokens at 20 ms: 8 s, far past a 1 s grace.
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(20)).await;
    let policy = policy_text(&[&a], "").replacen(
        "home_region = \"home\"",
        "home_region = \"home\"\nshutdown_delay_ms = 100\nshutdown_grace_ms = 1000",
        1,
    );
    let mut gw = Gateway::start(&policy).await;
    let stream = tokio::spawn(stream_body(gw.url("/v1/chat/completions"), 400));
    wait_inflight(&gw, 1).await;
    let signalled = Instant::now();
    gw.signal("TERM");
    let (status, body) = stream.await.unwrap();
    let ended = signalled.elapsed();
    assert_eq!(status, 200);
    assert!(body.contains("shutting_down"), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    assert!(
        ended >= Duration::from_millis(1000) && ended < Duration::from_secs(4),
        "the stream ended {ended:?} after SIGTERM"
    );
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("the gateway did not exit");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_binary_upgrade_hands_the_listening_sockets_over_without_a_failed_request() {
    let a = start_shard(ShardSpec::new("a", "home").capacity(20_000.0)).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("policy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("policy.toml"), policy_text(&[&a], "")).unwrap();
    let sock = root.path().join("upgrade.sock").display().to_string();
    let mut old = Gateway::start_with(root, dir, &["--upgrade-sock", &sock]).await;
    let old_pid = old.pid();
    // Clients keep sending through the whole hand-over.
    let length = Duration::from_secs(9);
    let start = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let url = old.url("/v1/chat/completions");
            tokio::spawn(async move {
                let c = client();
                let mut statuses = Vec::new();
                while start.elapsed() < length && statuses.len() < 5000 {
                    let status = match c.post(&url).json(&chat(4, false)).send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut new = old.successor(&["--upgrade-sock", &sock, "--upgrade"]);
    // The successor waits on the socket for the old gateway's listeners.
    tokio::time::sleep(Duration::from_millis(700)).await;
    old.signal("QUIT");
    let old_exit = old.wait_exit(Duration::from_secs(8));
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.unwrap());
    }
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", statuses.len());
    assert!(statuses.len() > 200, "only {} requests", statuses.len());
    let old_exit = old_exit.expect("the old gateway did not exit");
    assert!(old_exit.success(), "{old_exit:?}");
    assert!(
        new.wait_exit(Duration::ZERO).is_none(),
        "the new gateway died: {}",
        new.log()
    );
    let st = new.status().await;
    assert_eq!(st["ready"], true, "{st}");
    assert_ne!(new.pid(), old_pid);
}
