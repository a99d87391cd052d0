//! Live policies: reloads under load drop nothing, invalid sets leave the running one in
//! place and say why, removed shards drain, added ones take traffic, learned health and
//! operator drains survive reloads, and the Git commit in force is shown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{chat, client, policy_text, start_shard, Gateway, Shard, ShardSpec};
use futures_util::StreamExt;
use llm_sim::FaultMode;

/// One streamed chat completion read to its end: status, shard and the whole body.
async fn stream_once(url: &str, max_tokens: u64) -> (u16, String, String) {
    let r = match client()
        .post(url)
        .json(&chat(max_tokens, true))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return (0, String::new(), e.to_string()),
    };
    let status = r.status().as_u16();
    let shard = r
        .headers()
        .get("x-breakwater-shard")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut body = String::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => body.push_str(&String::from_utf8_lossy(&c)),
            Err(e) => {
                body.push_str(&format!("<cut: {e}>"));
                break;
            }
        }
    }
    (status, shard, body)
}

/// `n` streams of `max_tokens` started at once, each read to its end by its own task.
fn open_streams(
    gw: &Gateway,
    n: usize,
    max_tokens: u64,
) -> Vec<tokio::task::JoinHandle<(u16, String, String)>> {
    (0..n)
        .map(|_| {
            let url = gw.url("/v1/chat/completions");
            tokio::spawn(async move { stream_once(&url, max_tokens).await })
        })
        .collect()
}

fn complete(body: &str) -> bool {
    body.contains("data: [DONE]") && !body.contains("\"error\"")
}

/// Waits (bounded) until `check` holds on the admin status.
async fn wait_status(gw: &Gateway, within: Duration, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let st = gw.status().await;
        if check(&st) {
            return;
        }
        assert!(Instant::now() < deadline, "status never matched: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_reloads_a_second_under_load_fail_no_request() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let c = start_shard(ShardSpec::new("c", "home")).await;
    // Two sets: {a, b} and {a (capacity changed), b, c}; every reload adds or removes c.
    let small = policy_text(&[&a, &b], "");
    let big =
        policy_text(&[&a, &b, &c], "").replacen("capacity_tps = 1000", "capacity_tps = 3000", 1);
    let gw = Gateway::start(&small).await;
    let length = Duration::from_secs(10);
    let start = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let url = gw.url("/v1/chat/completions");
        streams.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..1000 {
                if start.elapsed() >= length {
                    break;
                }
                out.push(stream_once(&url, 40).await);
            }
            out
        }));
    }
    let reloads = async {
        let mut applied = 0;
        for i in 0..100 {
            gw.write_policy(if i % 2 == 0 { &big } else { &small });
            // Alternate the triggers: the admin API and SIGHUP (the watcher adds its own).
            if i % 4 == 3 {
                gw.signal("HUP");
            } else {
                let (code, body) = gw.reload().await;
                assert_eq!(code, 200, "{body}");
                applied += usize::from(body["changed"] == true);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        applied
    };
    let (plain, applied) = common::load(&gw, 3, length, 8, reloads).await;
    let mut streamed = Vec::new();
    for s in streams {
        streamed.extend(s.await.unwrap());
    }
    let failed_plain: Vec<_> = plain.iter().filter(|r| r.status != 200).collect();
    assert!(
        failed_plain.is_empty(),
        "plain requests failed: {failed_plain:?}"
    );
    let failed_streams: Vec<_> = streamed
        .iter()
        .filter(|(status, _, body)| *status != 200 || !complete(body))
        .collect();
    assert!(
        failed_streams.is_empty(),
        "streams failed: {failed_streams:?}"
    );
    assert!(
        plain.len() > 100 && streamed.len() > 30,
        "too little load: {} plain, {} streamed",
        plain.len(),
        streamed.len()
    );
    assert!(
        streamed.iter().any(|(_, shard, _)| shard == "c"),
        "the added shard never served a stream"
    );
    // Most admin reloads found the other set (the watcher may have applied some first).
    assert!(applied > 20, "only {applied} reloads applied a change");
    assert_eq!(gw.wait_ledger_zero().await, 0);
    let m = gw.metrics().await;
    let admin_applied = metric(
        &m,
        "breakwater_policy_reloads_total{result=\"applied\",trigger=\"admin\"}",
    );
    assert!(admin_applied >= applied as f64, "{m}");
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// A bad set: its name, the files written (name, bytes), what the error must mention.
type BadCase = (&'static str, Vec<(&'static str, Vec<u8>)>, &'static str);

/// The files of a bad set, each added beside the good `policy.toml`, and what the error
/// must mention.
fn bad_corpus(good: &str, shard: &Shard) -> Vec<BadCase> {
    let half = &good[..good.len() / 2];
    vec![
        ("empty file", vec![("zz.toml", Vec::new())], "empty"),
        ("truncated TOML", vec![("policy.toml", half.as_bytes().to_vec())], "policy.toml"),
        ("unknown key", vec![("zz.toml", b"[limits]\nmax_body_byts = 1\n".to_vec())], "max_body_byts"),
        (
            "duplicate id",
            vec![(
                "zz.toml",
                format!(
                    "[[shards]]\nid = \"{}\"\npool = \"pool-home\"\nurl = \"http://127.0.0.1:1\"\ncapacity_tps = 10\n",
                    shard.id
                )
                .into_bytes(),
            )],
            "duplicate",
        ),
        (
            "a shard URL that is not allowed",
            vec![(
                "zz.toml",
                b"[[shards]]\nid = \"sneaky\"\npool = \"pool-home\"\nurl = \"file:///etc/passwd\"\ncapacity_tps = 10\n".to_vec(),
            )],
            "shards[0].url",
        ),
        ("a 50 MB file", vec![("zz.toml", vec![b'#'; 50 << 20])], "at most"),
        ("not UTF-8", vec![("zz.toml", vec![0xff, 0xfe, b'\n', b'x'])], "zz.toml"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_policy_leaves_the_running_set_in_place_and_says_why() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let good = policy_text(&[&a], "");
    let gw = Gateway::start(&good).await;
    let dir = gw.policy_dir();
    // Left alone, the directory is not read again and again: a reload's own reads (this
    // one's, then any the watcher makes) are not changes, so nothing follows but the
    // periodic look, every 10 s.
    assert_eq!(gw.reload().await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = gw.metrics().await;
    assert!(
        metric(
            &idle,
            "breakwater_policy_reloads_total{result=\"unchanged\",trigger=\"watch\"}"
        ) <= 1.0,
        "{idle}"
    );
    let before = gw.status().await["policy"].clone();
    assert!(
        before["revision"].as_str().unwrap().starts_with("sha256:"),
        "{before}"
    );
    assert_eq!(before["last_error"], serde_json::Value::Null);
    for (name, files, mentions) in bad_corpus(&good, &a) {
        for (file, bytes) in &files {
            std::fs::write(dir.join(file), bytes).unwrap();
        }
        let (code, body) = gw.reload().await;
        assert_eq!(code, 422, "{name}: {body}");
        assert_eq!(body["error"]["code"], "invalid_policy", "{name}: {body}");
        let policy = gw.status().await["policy"].clone();
        assert_eq!(
            policy["revision"], before["revision"],
            "{name}: the running set changed"
        );
        let error = policy["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains(mentions),
            "{name}: {error:?} does not mention {mentions:?}"
        );
        gw.chat_ok().await; // still serving
                            // Put the good set back.
        for (file, _) in &files {
            if *file == "policy.toml" {
                std::fs::write(dir.join(file), &good).unwrap();
            } else {
                std::fs::remove_file(dir.join(file)).unwrap();
            }
        }
        let (code, body) = gw.reload().await;
        assert_eq!(code, 200, "{name}: {body}");
        assert_eq!(
            gw.status().await["policy"]["last_error"],
            serde_json::Value::Null
        );
    }
    // A file that cannot be read at all: a link to nothing.
    std::os::unix::fs::symlink(dir.join("missing.target"), dir.join("zz.toml")).unwrap();
    let (code, body) = gw.reload().await;
    assert_eq!(code, 422, "{body}");
    std::fs::remove_file(dir.join("zz.toml")).unwrap();
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "breakwater_policy_reloads_total{result=\"rejected\",trigger=\"admin\"}"
        ) >= 8.0,
        "{m}"
    );
    assert!(gw.log().contains("policy reload rejected"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_caught_half_written_is_rejected_then_the_finished_one_applies_by_itself() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let good = policy_text(&[&a], "");
    let gw = Gateway::start(&good).await;
    let next = policy_text(&[&a, &b], "");
    let path = gw.policy_dir().join("policy.toml");
    // A writer that stops half-way (no atomic rename), long enough for the watcher to read.
    std::fs::write(&path, &next[..next.len() * 2 / 3]).unwrap();
    wait_status(&gw, Duration::from_secs(5), |st| {
        st["policy"]["last_error"].is_string()
    })
    .await;
    assert_eq!(gw.status().await["shards"].as_array().unwrap().len(), 1);
    gw.chat_ok().await;
    // The writer finishes: the watcher applies it, no reload asked for.
    std::fs::write(&path, &next).unwrap();
    wait_status(&gw, Duration::from_secs(5), |st| {
        st["shards"].as_array().unwrap().len() == 2 && st["policy"]["last_error"].is_null()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_symlink_is_followed_and_a_broken_one_is_refused() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let root = tempfile::tempdir().unwrap();
    let (v1, v2) = (root.path().join("v1"), root.path().join("v2"));
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v1.join("policy.toml"), policy_text(&[&a], "")).unwrap();
    std::fs::write(v2.join("policy.toml"), policy_text(&[&a, &b], "")).unwrap();
    let link = root.path().join("current");
    std::os::unix::fs::symlink(&v1, &link).unwrap();
    let root_path = root.path().to_path_buf();
    let swap = |to: &std::path::Path| {
        let tmp = root_path.join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(to, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap(); // atomic, as git-sync and `ln -sfn` do
    };
    let gw = Gateway::start_in(root, link.clone()).await;
    let first = gw.status().await["policy"]["revision"].clone();
    swap(&v2);
    wait_status(&gw, Duration::from_secs(5), |st| {
        st["shards"].as_array().unwrap().len() == 2
    })
    .await;
    let second = gw.status().await["policy"]["revision"].clone();
    assert_ne!(first, second);
    swap(&root_path.join("nowhere"));
    wait_status(&gw, Duration::from_secs(5), |st| {
        st["policy"]["last_error"].is_string()
    })
    .await;
    let st = gw.status().await;
    assert_eq!(st["policy"]["revision"], second, "{st}");
    assert_eq!(st["shards"].as_array().unwrap().len(), 2);
    gw.chat_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_shard_finishes_its_streams_and_gets_nothing_new_and_an_added_one_takes_traffic()
{
    // Slow tokens: a 60-token stream takes about 1.2 s.
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(20)).await;
    let b = start_shard(ShardSpec::new("b", "home").itl_ms(20)).await;
    let c = start_shard(ShardSpec::new("c", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], "[health]\nslow_start_ms = 0\n")).await;
    let open = open_streams(&gw, 8, 60);
    wait_status(&gw, Duration::from_secs(5), |st| {
        st["shards"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["inflight_requests"].as_u64() > Some(0))
    })
    .await;
    gw.write_policy(&policy_text(&[&a, &c], "[health]\nslow_start_ms = 0\n"));
    let (code, body) = gw.reload().await;
    assert_eq!(code, 200, "{body}");
    // The kept shard's ledger came along: its streams in flight are still counted.
    assert!(gw.shard("a").await["inflight_requests"].as_u64() > Some(0));
    assert_eq!(body["removed"], serde_json::json!(["b"]));
    assert_eq!(body["added"], serde_json::json!(["c"]));
    let served_by_b_before = b.stats().requests_total;
    let mut new_shards = Vec::new();
    for _ in 0..20 {
        let h = gw.chat_ok().await;
        new_shards.push(h["x-breakwater-shard"].to_str().unwrap().to_string());
    }
    for s in open {
        let (status, shard, body) = s.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            complete(&body),
            "a stream on {shard} was cut by the reload: {body}"
        );
    }
    assert!(!new_shards.contains(&"b".to_string()), "{new_shards:?}");
    assert!(new_shards.contains(&"c".to_string()), "{new_shards:?}");
    assert_eq!(b.stats().requests_total, served_by_b_before);
    assert_eq!(gw.wait_ledger_zero().await, 0);
    let m = gw.metrics().await;
    let gauges = [
        "breakwater_shard_state{",
        "breakwater_shard_inflight_tokens{",
        "breakwater_shard_admission_limit_tokens{",
    ];
    let stale: Vec<&str> = m
        .lines()
        .filter(|l| gauges.iter().any(|g| l.starts_with(g)) && l.contains("shard=\"b\""))
        .collect();
    assert!(
        stale.is_empty(),
        "the removed shard lingers in the metrics: {stale:?}"
    );
}

/// The share of tokens dispatched to shard b during 2 s of load.
async fn share_of_b(gw: &Gateway) -> f64 {
    let before = gw.status().await;
    common::load(gw, 6, Duration::from_secs(2), 30, async {}).await;
    let after = gw.status().await;
    let (da, db) = (
        dispatched_since(&before, &after, "a"),
        dispatched_since(&before, &after, "b"),
    );
    db / (da + db)
}

/// Tokens dispatched per shard since `before` (a status).
fn dispatched_since(before: &serde_json::Value, after: &serde_json::Value, id: &str) -> f64 {
    let get = |st: &serde_json::Value| {
        st["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .map_or(0.0, |s| s["dispatched_tokens_total"].as_f64().unwrap())
    };
    get(after) - get(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_capacity_changes_the_split() {
    let a = start_shard(ShardSpec::new("a", "home").itl_ms(5)).await;
    let b = start_shard(ShardSpec::new("b", "home").itl_ms(5)).await;
    // Engine readings are left out: a reading up to a scrape old makes a lone gateway herd
    // onto whichever shard looked idle, which blurs the split this test measures.
    let no_scrape = "[health]\nmetrics_interval_ms = 0\n";
    let gw = Gateway::start(&policy_text(&[&a, &b], no_scrape)).await;
    let even = share_of_b(&gw).await;
    assert!((0.3..0.7).contains(&even), "equal shards: b took {even}");
    let tripled =
        policy_text(&[&a, &b], no_scrape).replacen("capacity_tps = 1000", "capacity_tps = 1001", 1);
    let tripled = {
        // b (the second shard) gets three times a's capacity.
        let at = tripled.rfind("capacity_tps = 1000").unwrap();
        format!(
            "{}capacity_tps = 3000{}",
            &tripled[..at],
            &tripled[at + "capacity_tps = 1000".len()..]
        )
    };
    gw.write_policy(&tripled);
    assert_eq!(gw.reload().await.0, 200);
    assert_eq!(gw.shard("b").await["capacity_tps"], 3000.0);
    let more = share_of_b(&gw).await;
    assert!(
        more > even + 0.1 && more > 0.6,
        "b at 3x capacity took {more} (was {even})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_shard_stays_ejected_across_an_unrelated_reload() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], "")).await;
    b.fault(FaultMode::Down);
    for _ in 0..20 {
        gw.chat_ok().await;
        if gw.shard("b").await["state"] == "ejected" {
            break;
        }
    }
    let ejected = gw.shard("b").await;
    assert_eq!(ejected["state"], "ejected", "{ejected}");
    gw.write_policy(&policy_text(
        &[&a, &b],
        "[limits]\nmax_body_bytes = 65536\n",
    ));
    let (code, body) = gw.reload().await;
    assert_eq!(
        (code, body["changed"].clone()),
        (200, serde_json::json!(true)),
        "{body}"
    );
    let after = gw.shard("b").await;
    assert_eq!(after["state"], "ejected", "{after}");
    assert_eq!(after["ejection_count"], ejected["ejection_count"]);
    assert_eq!(after["last_transition"], ejected["last_transition"]);
    for _ in 0..10 {
        assert_eq!(gw.chat_ok().await["x-breakwater-shard"], "a");
    }
    // And the change itself took effect: the body limit is now 64 KiB.
    let big = serde_json::json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": "x".repeat(100_000)}],
    });
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_drain_lets_streams_finish_survives_a_reload_and_is_undone() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home").itl_ms(20)).await;
    let gw = Gateway::start(&policy_text(&[&a, &b], "")).await;
    // Something in flight on b.
    let open = open_streams(&gw, 6, 50);
    wait_status(&gw, Duration::from_secs(5), |st| {
        st["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == "b" && s["inflight_requests"].as_u64() > Some(0))
    })
    .await;
    let (code, body) = gw.admin_post("/admin/shards/b/drain").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["changed"], true);
    assert_eq!(gw.shard("b").await["state"], "draining");
    for _ in 0..20 {
        assert_eq!(gw.chat_ok().await["x-breakwater-shard"], "a");
    }
    for s in open {
        let (status, shard, body) = s.await.unwrap();
        assert!(
            status == 200 && complete(&body),
            "a stream on {shard} was cut: {body}"
        );
    }
    // Kept across a reload.
    gw.write_policy(&policy_text(
        &[&a, &b],
        "[limits]\nmax_body_bytes = 65536\n",
    ));
    assert_eq!(gw.reload().await.0, 200);
    assert_eq!(gw.shard("b").await["state"], "draining");
    assert!(gw
        .metrics()
        .await
        .contains("breakwater_shard_drained{shard=\"b\"} 1"));
    let (code, _) = gw.admin_post("/admin/shards/b/undrain").await;
    assert_eq!(code, 200);
    assert_eq!(gw.shard("b").await["state"], "healthy");
    // Traffic comes back (once b's last engine reading, taken while it streamed, is
    // replaced by one that shows it idle).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut shards = Vec::new();
    while !shards.iter().any(|s| s == "b") && Instant::now() < deadline {
        let h = gw.chat_ok().await;
        shards.push(h["x-breakwater-shard"].to_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(shards.iter().any(|s| s == "b"), "{shards:?}");
    // Unknown shards and missing tokens.
    assert_eq!(gw.admin_post("/admin/shards/zz/drain").await.0, 404);
    let r = client()
        .post(format!("http://{}/admin/shards/a/drain", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(gw.shard("a").await["drained"], false);
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git is needed for this test");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_a_git_checkout_reaches_the_running_gateway_and_shows_in_status_and_metrics() {
    let a = start_shard(ShardSpec::new("a", "home")).await;
    let b = start_shard(ShardSpec::new("b", "home")).await;
    let root = tempfile::tempdir().unwrap();
    let repo = root.path().join("repo");
    let dir = repo.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("policy.toml"), policy_text(&[&a], "")).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one shard"]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    let gw = Gateway::start_in(root, dir.clone()).await;
    assert_eq!(gw.status().await["policy"]["revision"], first.as_str());
    assert!(gw
        .metrics()
        .await
        .contains(&format!("breakwater_policy_info{{revision=\"{first}\"}} 1")));
    // A change lands as a commit (as a pull with git-sync would), under load.
    let change = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(dir.join("policy.toml"), policy_text(&[&a, &b], "")).unwrap();
        git(&repo, &["commit", "-q", "-am", "add b"]);
        let second = git(&repo, &["rev-parse", "HEAD"]);
        wait_status(&gw, Duration::from_secs(5), |st| {
            st["policy"]["revision"] == second.as_str()
        })
        .await;
        second
    };
    let (records, second) = common::load(&gw, 3, Duration::from_secs(2), 4, change).await;
    assert!(records.iter().all(|r| r.status == 200), "{records:?}");
    assert_eq!(gw.status().await["shards"].as_array().unwrap().len(), 2);
    let m = gw.metrics().await;
    assert!(
        m.contains(&format!(
            "breakwater_policy_info{{revision=\"{second}\"}} 1"
        )),
        "{m}"
    );
    assert!(
        !m.contains(&format!("revision=\"{first}\"")),
        "the old revision lingers: {m}"
    );
}
