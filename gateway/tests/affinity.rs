//! Cache affinity end to end on a four-shard pool: a session sticks to its shard; a
//! drained or dead shard is never chosen by affinity and its sessions move to the next in
//! hash order; bounded load moves a hot key; removing a shard moves only its sessions; and
//! a conversation's next turn finds the shard that holds its prefix, whose engine then
//! skips that part of the prefill.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use common::{client, policy_text, post, start_shard, Gateway, Shard, ShardSpec, MODEL};
use llm_sim::FaultMode;
use serde_json::{json, Value};

async fn four() -> Vec<Shard> {
    let mut shards = Vec::new();
    for id in ["s1", "s2", "s3", "s4"] {
        shards.push(start_shard(ShardSpec::new(id, "home")).await);
    }
    shards
}

/// The policy for `shards` with `affinity` set on their pool (and checks off, so only the
/// test decides health).
fn policy(shards: &[&Shard], affinity: &str) -> String {
    policy_text(shards, "[health]\ncheck_interval_ms = 0\n").replace(
        "models = [\"test-model\"]",
        &format!("models = [\"test-model\"]\n{affinity}"),
    )
}

/// Sends one chat request with session `key`; the shard that answered.
async fn ask(gw: &Gateway, key: &str) -> String {
    let resp = post(
        gw,
        "/v1/chat/completions",
        &json!({
            "model": MODEL,
            "prompt_cache_key": key,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2,
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    resp.headers()["x-breakwater-shard"]
        .to_str()
        .unwrap()
        .to_string()
}

/// `breakwater_affinity_total` by outcome.
async fn outcomes(gw: &Gateway) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in gw.metrics().await.lines() {
        if let Some(rest) = line.strip_prefix("breakwater_affinity_total{") {
            let outcome = rest
                .split("outcome=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let n: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            *out.entry(outcome.to_string()).or_default() += n as u64;
        }
    }
    out
}

/// The count of `outcome`, once it reaches `want` (a request's metrics are recorded just
/// after its answer goes out: wait for them, bounded); what it is after a second otherwise.
async fn outcome_reaching(gw: &Gateway, outcome: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let n = outcomes(gw).await.get(outcome).copied().unwrap_or(0);
        if n >= want || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_session_sticks_to_its_shard_and_sessions_spread() {
    let shards = four().await;
    let refs: Vec<&Shard> = shards.iter().collect();
    let gw = Gateway::start(&policy(&refs, "affinity = \"session\"")).await;
    let mut home: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for s in 0..24 {
            let key = format!("conversation-{s}");
            let shard = ask(&gw, &key).await;
            if round == 0 {
                home.insert(key, shard);
            } else {
                assert_eq!(home[&key], shard, "{key} moved");
            }
        }
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert!(
        used.len() >= 3,
        "24 sessions on {} shards: {home:?}",
        used.len()
    );
    assert_eq!(outcome_reaching(&gw, "chosen", 72).await, 72);
    // The decisions log says so too (a decision is kept just after its answer: wait a little).
    let mut said = Value::Null;
    for _ in 0..50 {
        said = gw.admin_json("/admin/decisions?limit=1").await["decisions"][0]["affinity"].clone();
        if said == "chosen" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(said, "chosen");
    // Without a key the request is balanced by load, and affinity says nothing.
    let resp = post(&gw, "/v1/chat/completions", &common::chat(2, false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(outcomes(&gw).await.values().sum::<u64>(), 72);
}

#[tokio::test]
async fn a_drained_or_dead_shard_is_never_chosen_and_its_sessions_move_to_the_next() {
    let shards = four().await;
    let refs: Vec<&Shard> = shards.iter().collect();
    let gw = Gateway::start(&policy(&refs, "affinity = \"session\"")).await;
    let mut home: HashMap<String, String> = HashMap::new();
    for s in 0..24 {
        let key = format!("c{s}");
        home.insert(key.clone(), ask(&gw, &key).await);
    }
    // Drain the shard with the most sessions: at once, none of them goes there.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for v in home.values() {
        *counts.entry(v).or_default() += 1;
    }
    let (victim, _) = counts.iter().max_by_key(|(_, n)| **n).unwrap();
    let victim = victim.to_string();
    let (status, _) = gw
        .admin_post(&format!("/admin/shards/{victim}/drain"))
        .await;
    assert_eq!(status, 200);
    let mut moved_to: HashMap<String, String> = HashMap::new();
    for (key, was) in &home {
        let now = ask(&gw, key).await;
        assert_ne!(now, victim, "a drained shard was chosen");
        if *was == victim {
            moved_to.insert(key.clone(), now);
        } else {
            assert_eq!(&now, was, "{key} was not on the drained shard and moved");
        }
    }
    let fenced = outcome_reaching(&gw, "fenced", moved_to.len() as u64).await;
    assert_eq!(
        fenced as usize,
        moved_to.len(),
        "each moved session counts as fenced"
    );
    // Their new shard is stable (the next in their hash order), not a random one.
    for (key, to) in &moved_to {
        assert_eq!(&ask(&gw, key).await, to);
    }
    // Undrained, they come back.
    gw.admin_post(&format!("/admin/shards/{victim}/undrain"))
        .await;
    for (key, was) in &home {
        assert_eq!(&ask(&gw, key).await, was);
    }

    // A shard that dies: its sessions are served elsewhere without a failure, and once it
    // is ejected (three refused connections) affinity passes it over.
    let dead = shards.iter().find(|s| s.id == victim).unwrap();
    dead.fault(FaultMode::Down);
    for _ in 0..2 {
        for key in home.keys() {
            assert_ne!(ask(&gw, key).await, victim);
        }
    }
    let s = gw.shard(&victim).await;
    assert_eq!(s["state"], "ejected", "{s}");
}

#[tokio::test]
async fn bounded_load_moves_a_hot_key() {
    // Slow tokens, so requests overlap: 40 at once, all with one session key.
    let mut shards = Vec::new();
    for id in ["s1", "s2", "s3", "s4"] {
        shards.push(start_shard(ShardSpec::new(id, "home").itl_ms(20)).await);
    }
    let refs: Vec<&Shard> = shards.iter().collect();
    // Admission off: no shard fills its limit (which would fence the key), so only the
    // load bound moves it.
    let text = policy(&refs, "affinity = \"session\"\naffinity_max_load = 1.5")
        + "\n[admission]\nenabled = false\n";
    let gw = Gateway::start(&text).await;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let url = gw.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let resp = client()
                .post(url)
                .json(&json!({"model": MODEL, "user": "hot", "max_tokens": 20,
                              "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-breakwater-shard"]
                .to_str()
                .unwrap()
                .to_string()
        }));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut per: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        *per.entry(t.await.unwrap()).or_default() += 1;
    }
    let o = outcomes(&gw).await;
    assert!(
        o.get("overridden_by_load").copied().unwrap_or(0) > 0,
        "{o:?}"
    );
    assert!(o.get("chosen").copied().unwrap_or(0) > 0, "{o:?}");
    let max = per.values().max().copied().unwrap();
    assert!(max < 30, "one shard took {max} of 40: {per:?}");
    assert!(per.len() >= 3, "{per:?}");
}

#[tokio::test]
async fn removing_a_shard_from_the_pool_moves_only_its_sessions() {
    let shards = four().await;
    let refs: Vec<&Shard> = shards.iter().collect();
    let gw = Gateway::start(&policy(&refs, "affinity = \"session\"")).await;
    let mut home: HashMap<String, String> = HashMap::new();
    for s in 0..32 {
        let key = format!("k{s}");
        home.insert(key.clone(), ask(&gw, &key).await);
    }
    gw.write_policy(&policy(&refs[..3], "affinity = \"session\""));
    let (status, body) = gw.reload().await;
    assert_eq!(status, 200, "{body}");
    let mut moved = 0;
    for (key, was) in &home {
        let now = ask(&gw, key).await;
        if was == "s4" {
            moved += 1;
            assert_ne!(now, "s4");
        } else {
            assert_eq!(
                &now, was,
                "{key} was on {was}, not the removed shard, and moved"
            );
        }
    }
    assert_eq!(moved, home.values().filter(|v| *v == "s4").count());
}

/// A chat body: a long shared system prompt and `turns` user/assistant exchanges.
fn conversation(turns: usize) -> Value {
    let system = "You are the harbour master's assistant. ".repeat(60);
    let mut messages = vec![json!({"role": "system", "content": system})];
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!("Question {t} about the tides and the breakwater?")}));
        messages.push(json!({"role": "assistant", "content": format!("Answer {t}: the breakwater keeps the swell out.")}));
    }
    messages.push(json!({"role": "user", "content": "And then?"}));
    json!({"model": MODEL, "messages": messages, "max_tokens": 2})
}

#[tokio::test]
async fn the_next_turn_of_a_conversation_finds_the_shard_holding_its_prefix() {
    let shards = four().await;
    let refs: Vec<&Shard> = shards.iter().collect();
    let gw = Gateway::start(&policy(
        &refs,
        "affinity = \"prefix\"\naffinity_block_bytes = 128",
    ))
    .await;
    let mut first = None;
    for turns in 0..6 {
        let resp = post(&gw, "/v1/chat/completions", &conversation(turns)).await;
        assert_eq!(resp.status(), 200);
        let shard = resp.headers()["x-breakwater-shard"]
            .to_str()
            .unwrap()
            .to_string();
        match &first {
            None => first = Some(shard),
            Some(f) => assert_eq!(&shard, f, "turn {turns} left the shard with its prefix"),
        }
    }
    assert_eq!(outcome_reaching(&gw, "chosen", 6).await, 6);
    // The engine reused the prefix: most of the later turns' prompt tokens were cached.
    let s = shards
        .iter()
        .find(|s| Some(&s.id) == first.as_ref())
        .unwrap()
        .stats();
    assert!(
        s.prefix_cache_hits_total * 2 > s.prefix_cache_queries_total,
        "hits {} of {} prompt tokens",
        s.prefix_cache_hits_total,
        s.prefix_cache_queries_total
    );
    // The gateway reads the engine's hit rate from its metrics and shows it per shard.
    let first = first.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let rate = gw.shard(&first).await["prefix_cache_hit_rate"].as_f64();
        if rate.is_some_and(|r| r > 0.5) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hit rate never shown: {rate:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let first = Some(first);
    // The other shards saw none of it.
    for other in shards.iter().filter(|s| Some(&s.id) != first.as_ref()) {
        assert_eq!(other.stats().requests_total, 0, "{}", other.id);
    }
}

#[tokio::test]
async fn a_saturated_shard_is_passed_over_by_affinity_at_once() {
    let mut shards = Vec::new();
    for id in ["s1", "s2", "s3", "s4"] {
        let mut spec = ShardSpec::new(id, "home");
        spec.slots = 2;
        shards.push(start_shard(spec).await);
    }
    let refs: Vec<&Shard> = shards.iter().collect();
    let gw = Gateway::start(&policy(&refs, "affinity = \"session\"")).await;
    let home = ask(&gw, "busy-conversation").await;
    assert_eq!(ask(&gw, "busy-conversation").await, home);
    // Another client fills that engine's queue directly: 2 running, 6 waiting.
    let target = shards.iter().find(|s| s.id == home).unwrap();
    let url = format!("{}/v1/chat/completions", target.sim.url());
    let mut flood = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        flood.push(tokio::spawn(async move {
            let _ = client()
                .post(url)
                .json(&json!({"model": MODEL, "max_tokens": 3000,
                              "messages": [{"role": "user", "content": "long"}]}))
                .send()
                .await;
        }));
    }
    // Once the gateway's scrape sees the queue (within about a second), the session goes
    // to the next shard in its order, and says so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = gw.shard(&home).await;
        if s["queue_depth"].as_f64().unwrap_or(0.0) >= 5.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the queue was never seen: {s}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let moved = ask(&gw, "busy-conversation").await;
    assert_ne!(moved, home, "a saturated shard was chosen by affinity");
    assert_eq!(outcome_reaching(&gw, "fenced", 1).await, 1);
    for f in flood {
        f.abort();
    }
}

#[tokio::test]
async fn a_recovering_shard_takes_its_sessions_back_gradually() {
    let shards = four().await;
    let refs: Vec<&Shard> = shards.iter().collect();
    // Quick ejections and a four-second slow start.
    let text = policy(&refs, "affinity = \"session\"").replace(
        "[health]\n",
        "[health]\nbase_ejection_ms = 1000\nejection_jitter_ms = 0\nslow_start_ms = 4000\n",
    );
    let gw = Gateway::start(&text).await;
    let mut home: HashMap<String, String> = HashMap::new();
    for s in 0..48 {
        let key = format!("r{s}");
        home.insert(key.clone(), ask(&gw, &key).await);
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for v in home.values() {
        *counts.entry(v).or_default() += 1;
    }
    let (victim, _) = counts.iter().max_by_key(|(_, n)| **n).unwrap();
    let victim = victim.to_string();
    let theirs: Vec<String> = home
        .iter()
        .filter(|(_, v)| **v == victim)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(theirs.len() >= 8, "{counts:?}");
    // It dies: refused connections eject it (its sessions are served elsewhere meanwhile).
    let shard = shards.iter().find(|s| s.id == victim).unwrap();
    shard.fault(FaultMode::Down);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gw.shard(&victim).await["state"] != "ejected" {
        for k in &theirs {
            assert_ne!(ask(&gw, k).await, victim);
        }
        assert!(std::time::Instant::now() < deadline, "never ejected");
    }
    // It comes back; after the ejection it ramps up from 10 % of its weight over 4 s.
    shard.fault(FaultMode::Ok);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = gw.shard(&victim).await;
        if s["state"] == "healthy" && s["weight_factor"].as_f64().unwrap_or(1.0) < 0.5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never in slow start: {s}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Early in the ramp only some of its sessions are back; at the end all of them are.
    let early = {
        let mut n = 0;
        for k in &theirs {
            n += usize::from(ask(&gw, k).await == victim);
        }
        n
    };
    while gw.shard(&victim).await["weight_factor"]
        .as_f64()
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow start never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let late = {
        let mut n = 0;
        for k in &theirs {
            n += usize::from(ask(&gw, k).await == victim);
        }
        n
    };
    assert!(
        early < theirs.len() * 2 / 3,
        "{early} of {} back at once",
        theirs.len()
    );
    assert_eq!(
        late,
        theirs.len(),
        "after the slow start every session is back"
    );
}
