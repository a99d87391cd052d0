//! The dashboard in a real browser: headless Chromium driven through chromedriver
//! (WebDriver) opens the admin listener of a running `breakwater demo`, is refused with a
//! wrong token, signs in, finds four shards in two regions, presses a fault button and sees
//! the shard leave `healthy`, opens a routing decision, and saves a screenshot
//! (`target/dashboard.png`). Needs `chromium` and `chromium-driver` (`.ci/run` installs
//! them); without them the test fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, Demo};
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
    b.find(Locator::Css(
        "button[data-shard='use-small'][data-fault='down']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
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
    b.find(Locator::Css(
        "#decisions details[data-request='dash-19'] summary",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
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
    b.find(Locator::Css(
        "button[data-shard='use-small'][data-fault='ok']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    wait_js(
        &b,
        "return document.querySelector(\"article[data-shard='use-small']\").dataset.state === 'healthy'",
        Duration::from_secs(15),
        "use-small healthy again",
    )
    .await;
    b.close().await.unwrap();
}
