//! TLS and HTTP/2 end to end, with certificates made for each test: HTTPS and HTTP/2 to the
//! gateway (streamed and not), cleartext HTTP/2, `https://` shards behind a private CA, a
//! wrong CA, mTLS, the admin listener's own certificate, and a certificate rotated on disk
//! while a stream is open.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{chat, Gateway, MODEL};
use futures_util::StreamExt;
use llm_sim::{SimConfig, SimHandle};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::Value;

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its key, in PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA.
    fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "leaf");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

impl Leaf {
    /// Writes the pair as `name.crt` and `name.key` in `dir`.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        write_atomically(&c, &self.cert_pem);
        write_atomically(&k, &self.key_pem);
        (c, k)
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A simulated engine serving HTTPS with `leaf`; with `client_ca`, it requires a client
/// certificate from that CA.
async fn tls_shard(leaf: &Leaf, client_ca: Option<&Ca>) -> SimHandle {
    let serve = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ca_pem = client_ca.map(Ca::pem);
    let tls = llm_sim::tls::server_config(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        ca_pem.as_deref().map(str::as_bytes),
    )
    .unwrap();
    let config = SimConfig {
        model: MODEL.into(),
        capacity_tps: 5000.0,
        slots: 64,
        ttft: Duration::from_millis(5),
        itl: Duration::from_millis(2),
        kv_capacity_tokens: 1 << 20,
        behaviour: llm_sim::Behaviour::Continuous,
    };
    SimHandle::spawn_with_tls(config, serve, control, Some(tls)).unwrap()
}

/// A plain simulated engine whose tokens come every `itl_ms`.
async fn plain_shard(itl_ms: u64) -> SimHandle {
    let serve = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = SimConfig {
        model: MODEL.into(),
        capacity_tps: 5000.0,
        slots: 64,
        ttft: Duration::from_millis(5),
        itl: Duration::from_millis(itl_ms),
        kv_capacity_tokens: 1 << 20,
        behaviour: llm_sim::Behaviour::Continuous,
    };
    SimHandle::spawn(config, serve, control).unwrap()
}

/// A policy with one shard at `url`; `gateway` and `pool` are added to those sections.
fn policy(url: &str, gateway: &str, pool: &str) -> String {
    format!(
        "[gateway]\nhome_region = \"home\"\n{gateway}\n\n[[regions]]\nid = \"home\"\n\n\
         [[pools]]\nid = \"p\"\nregion = \"home\"\nengine = \"vllm\"\nmodels = [\"{MODEL}\"]\n{pool}\n\n\
         [[shards]]\nid = \"s1\"\npool = \"p\"\nurl = \"{url}\"\ncapacity_tps = 5000\n"
    )
}

/// A client that trusts only `ca` and reports the server's certificate.
fn https_client(ca: &Ca) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .tls_info(true)
}

/// The `data:` events' text of a streamed chat answer, and whether it ended with `[DONE]`.
async fn read_stream(resp: reqwest::Response) -> (String, bool) {
    let mut body = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(c) = chunks.next().await {
        body.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    let mut text = String::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    (text, body.trim_end().ends_with("data: [DONE]"))
}

fn peer_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("a TLS answer carries the server's certificate")
        .to_vec()
}

#[tokio::test]
async fn openai_clients_speak_https_and_http2_to_the_gateway_streamed_and_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("gateway test CA");
    let (cert, key) = ca
        .issue(&["localhost", "127.0.0.1"])
        .write(dir.path(), "gw");
    let shard = plain_shard(1).await;
    let gw = Gateway::start(&policy(
        &shard.url(),
        &format!(
            "[gateway.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        "",
    ))
    .await;
    let url = format!("https://localhost:{}/v1/chat/completions", gw.addr.port());

    for (client, version) in [
        (
            https_client(&ca).http1_only().build().unwrap(),
            reqwest::Version::HTTP_11,
        ),
        (https_client(&ca).build().unwrap(), reqwest::Version::HTTP_2),
    ] {
        let resp = client
            .post(&url)
            .json(&chat(16, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version, "ALPN chooses the protocol");
        let v: Value = resp.json().await.unwrap();
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .len()
                > 10
        );
        assert_eq!(v["usage"]["completion_tokens"], 16);

        let resp = client
            .post(&url)
            .json(&chat(24, true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let (text, done) = read_stream(resp).await;
        assert!(done, "{version:?}: the stream ends with [DONE]");
        assert!(text.len() > 10, "{version:?}: {text:?}");
    }

    // Plain HTTP on the HTTPS port is not served.
    let plain = common::client()
        .get(format!("http://127.0.0.1:{}/healthz", gw.addr.port()))
        .send()
        .await;
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true));
    // A client that does not trust the CA is refused in the handshake.
    let untrusting = https_client(&Ca::new("another CA")).build().unwrap();
    let e = untrusting.get(&url).send().await.unwrap_err();
    assert!(e.is_connect() || e.is_request(), "{e:?}");
}

#[tokio::test]
async fn cleartext_http2_streams_when_the_policy_asks_for_h2c() {
    let shard = plain_shard(2).await;
    let gw = Gateway::start(&policy(&shard.url(), "h2c = true", "")).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(40, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    // The events arrive as they are made, not at the end: the first comes well before
    // the last of 40 tokens at 2 ms each.
    let started = Instant::now();
    let mut chunks = resp.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    let mut rest = String::new();
    while let Some(c) = chunks.next().await {
        rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    let all_at = started.elapsed();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(
        first_at * 2 < all_at,
        "streamed, not buffered: first event at {first_at:?}, last at {all_at:?}"
    );
    // A header over HTTP/2's bound (64 KiB) is refused, and the connection and the gateway
    // go on serving.
    let big = h2
        .post(gw.url("/v1/chat/completions"))
        .header("x-big", "a".repeat(100 << 10))
        .json(&chat(4, false))
        .send()
        .await;
    assert!(
        big.as_ref().map(|r| r.status() != 200).unwrap_or(true),
        "{big:?}"
    );
    let resp = h2
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // HTTP/1.1 still works on the same listener.
    let resp = common::post(&gw, "/v1/chat/completions", &chat(8, false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
}

#[tokio::test]
async fn a_shard_behind_tls_with_a_private_ca_is_served_checked_and_its_connections_reused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("shard CA");
    let shard = tls_shard(&ca.issue(&["localhost"]), None).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let url = format!("https://localhost:{}", shard.addr().port());
    let gw = Gateway::start(&policy(
        &url,
        "",
        &format!(
            "[pools.tls]\nca_file = {:?}\n",
            ca_file.display().to_string()
        ),
    ))
    .await;
    let client = common::client();
    for stream in [false, true, false, true, false, false] {
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(8, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "stream={stream}");
        if stream {
            let (_, done) = read_stream(resp).await;
            assert!(done);
        } else {
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 8);
        }
    }
    // One after another, the requests share kept connections: fewer connections than
    // requests (the health checks open their own).
    let requests = shard.engine().stats().requests_total;
    let connections = shard.engine().stats().connections_total;
    assert!(requests >= 6, "{requests}");
    assert!(
        connections < 6,
        "{connections} TLS connections for 6 requests: not reused"
    );
    // The active checks and the metrics scrape reach it through TLS too: it is healthy,
    // with the engine's queue read from its /metrics.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = gw.shard("s1").await;
        if s["state"] == "healthy" && s["queue_depth"].is_number() {
            break;
        }
        assert!(Instant::now() < deadline, "not checked over TLS: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_shard_whose_certificate_the_pool_does_not_trust_is_a_502_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let shard_ca = Ca::new("the shard's CA");
    let shard = tls_shard(&shard_ca.issue(&["localhost"]), None).await;
    let other = write(dir.path(), "other.pem", &Ca::new("another CA").pem());
    let url = format!("https://localhost:{}", shard.addr().port());
    let gw = Gateway::start(&policy(
        &url,
        "",
        &format!("[pools.tls]\nca_file = {:?}\n", other.display().to_string()),
    ))
    .await;
    let resp = common::post(&gw, "/v1/chat/completions", &chat(8, false)).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("TLS handshake failed"), "{msg}");
    assert!(
        msg.contains("not trusted") && msg.contains("UnknownIssuer"),
        "{msg}"
    );
    assert_eq!(shard.engine().stats().requests_total, 0);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("outcome=\"tls_error\""),
        "the attempt is counted as a TLS error"
    );

    // The bundle is fixed in place and the policy reloaded (its files are unchanged; what
    // they point to is not): the shard is trusted from then on.
    write(dir.path(), "other.pem", &shard_ca.pem());
    let (status, body) = gw.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], true, "{body}");
    let resp = common::post(&gw, "/v1/chat/completions", &chat(8, false)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn mtls_to_a_shard_that_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("shard CA");
    let client_ca = Ca::new("gateway client CA");
    let shard = tls_shard(&server_ca.issue(&["127.0.0.1"]), Some(&client_ca)).await;
    let ca_file = write(dir.path(), "ca.pem", &server_ca.pem());
    let (cert, key) = client_ca.issue(&["breakwater"]).write(dir.path(), "client");
    let url = format!("https://127.0.0.1:{}", shard.addr().port());
    let ca_line = format!(
        "[pools.tls]\nca_file = {:?}\n",
        ca_file.display().to_string()
    );

    // Without a client certificate, the shard refuses the handshake: a 502 that says so.
    let gw = Gateway::start(&policy(&url, "", &ca_line)).await;
    let resp = common::post(&gw, "/v1/chat/completions", &chat(8, false)).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("client certificate"), "{msg}");
    drop(gw);

    // With it, the request is served.
    let gw = Gateway::start(&policy(
        &url,
        "",
        &format!(
            "{ca_line}client_cert_file = {:?}\nclient_key_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    ))
    .await;
    let resp = common::post(&gw, "/v1/chat/completions", &chat(8, false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(shard.engine().stats().requests_total, 1);
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_while_an_open_stream_continues() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("rotation CA");
    let first = ca.issue(&["localhost"]);
    let (cert, key) = first.write(dir.path(), "gw");
    let admin_ca = Ca::new("admin CA");
    let (admin_cert, admin_key) = admin_ca.issue(&["localhost"]).write(dir.path(), "admin");
    // 200 tokens at 10 ms: a stream of about two seconds.
    let shard = plain_shard(10).await;
    let gw = Gateway::start(&policy(
        &shard.url(),
        &format!(
            "[gateway.tls]\ncert_file = {:?}\nkey_file = {:?}\n\n\
             [gateway.admin_tls]\ncert_file = {:?}\nkey_file = {:?}\nhttp2 = false\n",
            cert.display().to_string(),
            key.display().to_string(),
            admin_cert.display().to_string(),
            admin_key.display().to_string(),
        ),
        "",
    ))
    .await;
    let url = format!("https://localhost:{}/v1/chat/completions", gw.addr.port());
    // Each request on a connection of its own, so each sees the certificate served now.
    let fresh = || https_client(&ca).pool_max_idle_per_host(0).build().unwrap();

    let resp = fresh()
        .post(&url)
        .json(&chat(200, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(peer_cert(&resp), first.der);
    let open_stream = tokio::spawn(read_stream(resp));

    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = ca.issue(&["localhost"]);
    second.write(dir.path(), "gw");
    // The gateway looks at the files at most once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = fresh()
            .post(&url)
            .json(&chat(2, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        if peer_cert(&resp) == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !open_stream.is_finished(),
        "the stream should still be running when the new certificate is served"
    );
    let (text, done) = open_stream.await.unwrap();
    assert!(done, "the stream opened before the rotation ends normally");
    assert!(text.len() > 100);

    // The admin listener has its own certificate (and speaks HTTP/1.1 only, as asked).
    let admin = https_client(&admin_ca)
        .build()
        .unwrap()
        .get(format!(
            "https://localhost:{}/admin/status",
            gw.admin.port()
        ))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    assert_eq!(admin.version(), reqwest::Version::HTTP_11);
}
