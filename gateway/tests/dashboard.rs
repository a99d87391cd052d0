//! The dashboard in a real browser: headless Chromium driven through chromedriver
//! (WebDriver) opens the admin listener of a running `breakwater demo`, is refused with a
//! wrong token, signs in, finds four shards in two regions, presses a fault button and sees
//! the shard leave `healthy`, opens a routing decision, and saves a screenshot
//! (`target/dashboard.png`); and, on two replicas sharing a real `redis-server`, shows the
//! store's state, the replicas and a tenant's use across them, and the store going down and
//! coming back; and a pool discovered from a real dnsmasq, its lookups failing and
//! answering again. Needs `chromium` and `chromium-driver` (`.ci/run` installs them); without
//! them the test fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::dns::Dns;
use common::redis::Redis;
use common::{chat, client, policy_text, start_shard, Demo, Gateway, ShardSpec, ADMIN_TOKEN};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// chromedriver on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let binary = ["chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
            .unwrap_or_else(|| {
                panic!("chromedriver not found: install Debian's chromium and chromium-driver (.ci/run does)")
            });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = c.get(format!("{url}/status")).send().await;
            if let Ok(r) = ready {
                if r.json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true)
                {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { child, url }
    }

    async fn browser(&self) -> Client {
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1440,2000",
        ];
        args.push("--disable-extensions");
        let mut options = json!({ "args": args });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let caps: serde_json::Map<String, Value> =
            serde_json::from_value(json!({ "goog:chromeOptions": options })).unwrap();
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `check` (a script returning a value) returns something truthy; returns it.
async fn wait_js(b: &Client, script: &str, within: Duration, what: &str) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = b.execute(script, vec![]).await.unwrap();
        let truthy = match &v {
            Value::Null | Value::Bool(false) => false,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        if Instant::now() >= deadline {
            let page = b
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("{what}: not within {within:?}; the page says:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the element `css` finds. The page re-renders as it polls, so an element found
/// may be replaced before the click lands: then it is found again (a few times).
async fn click(b: &Client, css: &str) {
    for attempt in 0.. {
        let err = match b.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(_) => return,
                Err(err) => err,
            },
            Err(err) => err,
        };
        assert!(attempt < 5, "{css}: {err}");
        eprintln!("{css}: {err}; again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sign_in(b: &Client, token: &str) {
    let input = b.wait().for_element(Locator::Css("#token")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(token).await.unwrap();
    b.find(Locator::Css("#login-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_breaks_a_shard_from_the_dashboard_and_watches_it_leave_healthy() {
    let demo = Demo::start().await;
    let driver = Driver::start().await;
    let b = driver.browser().await;
    let page = format!("http://{}/", demo.admin);
    b.goto(&page).await.unwrap();

    // A wrong token is refused and the fleet stays hidden.
    sign_in(&b, "not-the-token").await;
    let said = wait_js(
        &b,
        "return document.getElementById('login-error').textContent",
        Duration::from_secs(5),
        "the wrong token's refusal",
    )
    .await;
    assert!(said.as_str().unwrap().contains("refused"), "{said}");
    let hidden = b
        .execute("return document.getElementById('app').hidden", vec![])
        .await
        .unwrap();
    assert_eq!(hidden, json!(true));

    // The right one shows four shards in two regions.
    sign_in(&b, &demo.token).await;
    wait_js(
        &b,
        "return document.querySelectorAll('#fleet article.shard').length === 4",
        Duration::from_secs(10),
        "four shards",
    )
    .await;
    let regions = b
        .execute(
            "return [...document.querySelectorAll('#fleet section.region')].map(r => r.dataset.region)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(regions, json!(["us-east", "eu-west"]));
    // The token is in no URL and nowhere on the page.
    assert!(!b
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains(&demo.token));
    assert!(!b.source().await.unwrap().contains(&demo.token));

    // Traffic, so the charts and decisions have something; one request to look up.
    let c = client();
    let body = json!({"model": "demo-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4});
    for i in 0..20 {
        let r = c
            .post(format!("http://{}/v1/chat/completions", demo.listen))
            .header("x-request-id", format!("dash-{i}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // A fault button takes use-small down; the health checks eject it and the page shows it.
    let t = Instant::now();
    click(&b, "button[data-shard='use-small'][data-fault='down']").await;
    let state = wait_js(
        &b,
        "const s = document.querySelector(\"article[data-shard='use-small']\"); \
         return s && s.dataset.state !== 'healthy' ? s.dataset.state : null",
        Duration::from_secs(10),
        "use-small leaving healthy",
    )
    .await;
    eprintln!(
        "the dashboard showed use-small {state} {:?} after the click",
        t.elapsed()
    );
    wait_js(
        &b,
        "return [...document.querySelectorAll('#events li')].some(l => l.textContent.includes('use-small: healthy → '))",
        Duration::from_secs(5),
        "the transition in the events timeline",
    )
    .await;

    // A routing decision opens to show the candidates its pick saw.
    wait_js(
        &b,
        "return !!document.querySelector(\"#decisions details[data-request='dash-19']\")",
        Duration::from_secs(5),
        "the decision of dash-19",
    )
    .await;
    click(&b, "#decisions details[data-request='dash-19'] summary").await;
    let shown = wait_js(
        &b,
        "const d = document.querySelector(\"#decisions details[data-request='dash-19']\"); \
         return d && d.open ? d.innerText : null",
        Duration::from_secs(5),
        "the open decision",
    )
    .await;
    for shard in ["use-big", "use-small", "euw-big", "euw-small"] {
        assert!(shown.as_str().unwrap().contains(shard), "{shown}");
    }

    // The charts have drawn lines.
    wait_js(
        &b,
        "return document.querySelectorAll('#chart-requests path').length > 0",
        Duration::from_secs(5),
        "the requests chart",
    )
    .await;
    let png = b.screenshot().await.unwrap();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    std::fs::write(&out, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {} ({} bytes)", out.display(), png.len());

    // Mended from the page too.
    click(&b, "button[data-shard='use-small'][data-fault='ok']").await;
    wait_js(
        &b,
        "return document.querySelector(\"article[data-shard='use-small']\").dataset.state === 'healthy'",
        Duration::from_secs(15),
        "use-small healthy again",
    )
    .await;
    b.close().await.unwrap();
}

/// The header's text (policy, `[cluster]` and discovery lines), once it contains `text`.
async fn header_line(b: &Client, text: &str, within: Duration) -> String {
    let script = format!(
        "const p = document.getElementById('policy'); \
         return p && p.innerText.includes({text:?}) ? p.innerText : null"
    );
    let v = wait_js(b, &script, within, &format!("the header saying {text:?}")).await;
    v.as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_replicas_the_store_and_a_tenants_use_across_them() {
    let mut redis = Redis::start();
    let port = redis.port;
    let shard = start_shard(ShardSpec::new("s1", "home")).await;
    let key = "sk-dashboard";
    let policy = |replica: &str| {
        policy_text(
            &[&shard],
            &format!(
                "[cluster]\nstore = \"redis://127.0.0.1:{port}\"\nreplica_id = \"{replica}\"\n\
                 timeout_ms = 100\nsync_ms = 100\nreplica_ttl_ms = 2000\n\n\
                 [[tenants]]\nid = \"acme\"\napi_key_sha256 = [\"{}\"]\nrpm = 60\n",
                breakwater::admission::tenant::key_digest_hex(key)
            ),
        )
    };
    let a = Gateway::start(&policy("gw-a")).await;
    let b_gw = Gateway::start(&policy("gw-b")).await;
    let driver = Driver::start().await;
    let b = driver.browser().await;
    b.goto(&format!("http://{}/", a.admin)).await.unwrap();
    sign_in(&b, ADMIN_TOKEN).await;

    let line = header_line(&b, "2 replica(s): gw-a, gw-b", Duration::from_secs(10)).await;
    assert!(line.contains("cluster gw-a"), "{line}");
    let state = b
        .execute(
            "const s = document.getElementById('cluster-state'); return [s.textContent, s.className]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(state, json!(["store up", "good"]), "{line}");

    // Ten requests, five through each replica: the tenant's use across both shows here.
    let c = client();
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b_gw };
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat(4, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let script = "const m = document.getElementById('policy').innerText.match(/acme rpm (\\d+)\\/60 left/); \
                  return m ? Number(m[1]) : null";
    let deadline = Instant::now() + Duration::from_secs(5);
    let left = loop {
        let v = b.execute(script, vec![]).await.unwrap();
        // The store refills 1 a second; ten spent across the two, so at most 55 left
        // a few seconds on, whichever replica's page this is.
        if let Some(n) = v.as_f64().filter(|n| *n <= 55.0) {
            break n;
        }
        assert!(Instant::now() < deadline, "the tenant's use not shown: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("the dashboard showed acme rpm {left}/60 left after ten requests over two replicas");

    // The store dies: the header says the limits are local, in red; it comes back: up.
    redis.kill();
    let line = header_line(&b, "store down, limits local", Duration::from_secs(5)).await;
    let class = b
        .execute(
            "return document.getElementById('cluster-state').className",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(class, json!("bad"), "{line}");
    let _restarted = Redis::start_on(port);
    header_line(&b, "store up", Duration::from_secs(10)).await;
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_discovered_pool_and_its_lookups_failing() {
    let shard = start_shard(ShardSpec::new("s1", "home")).await;
    let port = shard.sim.url().rsplit(':').next().unwrap().to_string();
    let dns = Dns::start(&[("127.0.0.1", "engines.test")], 1);
    let policy = format!(
        "[gateway]\nhome_region = \"home\"\n\n[[regions]]\nid = \"home\"\n\n\
         [discovery]\nnameservers = [\"127.0.0.1:{}\"]\ntimeout_ms = 200\n\n\
         [[pools]]\nid = \"p\"\nregion = \"home\"\nmodels = [\"m\"]\n\
         discover = \"dns://engines.test:{port}\"\ncapacity_tps = 1000\ndiscover_min_ms = 200\n",
        dns.port
    );
    let gw = Gateway::start(&policy).await;
    let driver = Driver::start().await;
    let b = driver.browser().await;
    b.goto(&format!("http://{}/", gw.admin)).await.unwrap();
    sign_in(&b, ADMIN_TOKEN).await;
    let line = header_line(
        &b,
        &format!("p dns://engines.test:{port}: 1 shard(s), resolved"),
        Duration::from_secs(10),
    )
    .await;
    let class = "return document.getElementById('discovery-p').className";
    assert_eq!(
        b.execute(class, vec![]).await.unwrap(),
        json!("good"),
        "{line}"
    );
    // The server hangs: the lookups fail, in red, and the shard stays.
    dns.signal("STOP");
    let line = header_line(&b, "lookups failing", Duration::from_secs(10)).await;
    assert!(line.contains("1 shard(s)"), "{line}");
    assert_eq!(
        b.execute(class, vec![]).await.unwrap(),
        json!("bad"),
        "{line}"
    );
    dns.signal("CONT");
    header_line(&b, "1 shard(s), resolved", Duration::from_secs(10)).await;
    b.close().await.unwrap();
}
