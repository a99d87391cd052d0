//! `loadgen`: the benchmark's load generator. One run against one URL, one JSON line out.
//!
//! - `rate`: open loop at a fixed request rate; latency is measured from each request's
//!   scheduled start, so a stall is not hidden (no coordinated omission).
//! - `max`: closed loop with a fixed number of connections; reports requests/s.
//! - `stream`: concurrent streamed completions; reports time to first event and the gaps
//!   between events.
//!
//! Every run is bounded by a request count and a duration.

#![allow(clippy::print_stdout)] // the JSON result goes to stdout

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::json;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Rate,
    Max,
    Stream,
}

/// Benchmark load generator.
#[derive(Parser, Debug)]
struct Args {
    /// Base URL, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    /// Kind of run.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Requests per second (rate mode).
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Concurrent connections or streams (max and stream modes).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Upper bound on the run's length, seconds.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Upper bound on the number of requests.
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 1)]
    max_tokens: u64,
    /// The model name.
    #[arg(long, default_value = "bench-model")]
    model: String,
    /// For an `https://` URL: trust only this CA (PEM). TLS 1.3 with one cipher suite,
    /// TLS_AES_128_GCM_SHA256, so every server under test encrypts the same way.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client TLS settings: `ca_file`'s certificates, TLS 1.3, AES-128-GCM only.
fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading {}", path.display()))?
        {
            roots.add(cert.context("--ca-file")?)?;
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

struct Shared {
    client: HttpClient,
    uri: hyper::Uri,
    body: Bytes,
    latency: Mutex<Histogram<u64>>,
    ttft: Mutex<Histogram<u64>>,
    gaps: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: AtomicU64,
    issued: AtomicU64,
}

fn hist() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    if let Ok(mut h) = h.lock() {
        let _ = h.record((d.as_micros() as u64).max(1));
    }
}

impl Shared {
    fn request(&self) -> hyper::Request<Full<Bytes>> {
        let mut r = hyper::Request::new(Full::new(self.body.clone()));
        *r.method_mut() = hyper::Method::POST;
        *r.uri_mut() = self.uri.clone();
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    }

    /// One non-streamed request; returns whether it succeeded.
    async fn one(&self) -> bool {
        match self.client.request(self.request()).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                ok && resp.into_body().collect().await.is_ok()
            }
            Err(_) => false,
        }
    }

    /// One streamed request, recording the first-event time and the gaps between events.
    async fn one_stream(&self) -> bool {
        let started = Instant::now();
        let Ok(resp) = self.client.request(self.request()).await else {
            return false;
        };
        if !resp.status().is_success() {
            return false;
        }
        let mut body = resp.into_body();
        let mut last: Option<Instant> = None;
        let mut done = false;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            match last {
                None => record(&self.ttft, now - started),
                Some(prev) => record(&self.gaps, now - prev),
            }
            last = Some(now);
            if data.windows(6).any(|w| w == b"[DONE]") {
                done = true;
            }
        }
        done
    }

    fn count(&self, ok: bool) {
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn pct(h: &Mutex<Histogram<u64>>, q: f64) -> f64 {
    h.lock()
        .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 || args.rate == 0 {
        bail!("--concurrency and --rate must be positive");
    }
    let stream = matches!(args.mode, Mode::Stream);
    let body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": "Write one sentence about harbours and the sea."}],
        "max_tokens": args.max_tokens,
        "stream": stream,
    });
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(args.ca_file.as_deref())?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(connector);
    let shared = Arc::new(Shared {
        client,
        uri: format!("{}/v1/chat/completions", args.url.trim_end_matches('/'))
            .parse()
            .context("--url")?,
        body: Bytes::from(body.to_string()),
        latency: Mutex::new(hist()?),
        ttft: Mutex::new(hist()?),
        gaps: Mutex::new(hist()?),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        issued: AtomicU64::new(0),
    });
    let started = Instant::now();
    let stop = started + Duration::from_secs(args.duration_s);
    match args.mode {
        Mode::Rate => {
            let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
            let mut tasks = Vec::new();
            for i in 0..args.requests {
                let scheduled = started + interval.mul_f64(i as f64);
                if scheduled >= stop {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                let s = Arc::clone(&shared);
                tasks.push(tokio::spawn(async move {
                    let ok = s.one().await;
                    record(&s.latency, scheduled.elapsed());
                    s.count(ok);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        Mode::Max | Mode::Stream => {
            let mut tasks = Vec::new();
            for _ in 0..args.concurrency {
                let s = Arc::clone(&shared);
                let limit = args.requests;
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < stop && s.issued.fetch_add(1, Ordering::Relaxed) < limit
                    {
                        let t = Instant::now();
                        let ok = if stream {
                            s.one_stream().await
                        } else {
                            s.one().await
                        };
                        record(&s.latency, t.elapsed());
                        s.count(ok);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = shared.ok.load(Ordering::Relaxed);
    let out = json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "ok": ok,
        "errors": shared.errors.load(Ordering::Relaxed),
        "duration_s": elapsed,
        "rps": ok as f64 / elapsed,
        "p50_ms": pct(&shared.latency, 0.5),
        "p99_ms": pct(&shared.latency, 0.99),
        "ttft_p50_ms": pct(&shared.ttft, 0.5),
        "ttft_p99_ms": pct(&shared.ttft, 0.99),
        "gap_p50_ms": pct(&shared.gaps, 0.5),
        "gap_p99_ms": pct(&shared.gaps, 0.99),
    });
    println!("{out}");
    Ok(())
}
