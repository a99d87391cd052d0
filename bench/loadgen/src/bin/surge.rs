//! `surge`: open-loop Poisson arrivals of streamed chat completions in phases (a release
//! week: base, 2x, 5x, 10x, 20x, base again), from tenants of three priorities, against one
//! URL. Prints one JSON object: per phase, goodput and what every client saw.
//!
//! Arrivals are scheduled ahead (exponential gaps) and sent whether or not earlier ones
//! have finished, so a slow target meets the same offered load as a fast one. Every
//! request is bounded by the client timeout and the run by its phases.

#![allow(clippy::print_stdout)] // the JSON result goes to stdout

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Surge load generator.
#[derive(Parser, Debug)]
struct Args {
    /// Base URL, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    /// Base rate, requests per second.
    #[arg(long, default_value_t = 15.0)]
    base_rate: f64,
    /// Phases as `NAME:MULTIPLIER:SECONDS`, comma-separated.
    #[arg(
        long,
        default_value = "base:1:8,2x:2:8,5x:5:8,10x:10:10,20x:20:10,base-again:1:8"
    )]
    phases: String,
    /// Tenants as `NAME:PRIORITY:SHARE:KEY`, comma-separated (KEY may be empty).
    #[arg(long)]
    tenants: String,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 24)]
    max_tokens: u64,
    /// A good answer's first token came within this, milliseconds.
    #[arg(long, default_value_t = 1000)]
    slo_ms: u64,
    /// The client gives up after this, seconds.
    #[arg(long, default_value_t = 30)]
    client_timeout_s: u64,
    /// The model name.
    #[arg(long, default_value = "bench-model")]
    model: String,
    /// Seed of the arrival process.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Prompt sizes as `MIN:MAX` bytes, uniform (each prompt different, so an engine's
    /// prefix cache cannot skip its prefill); default: one short fixed prompt.
    #[arg(long)]
    prompt_bytes: Option<String>,
}

/// A chat body asking for `max_tokens`, streamed, with `content` as the prompt.
fn chat_body(model: &str, content: &str, max_tokens: u64) -> Bytes {
    Bytes::from(
        json!({
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": true,
        })
        .to_string(),
    )
}

fn parse_range(s: &str) -> anyhow::Result<(usize, usize)> {
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("{s:?}: expected MIN:MAX"))?;
    let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
    if a > b || b > 1 << 20 {
        bail!("{s:?}: expected MIN <= MAX <= 1048576");
    }
    Ok((a, b))
}

struct Phase {
    name: String,
    multiplier: f64,
    length: Duration,
}

struct Tenant {
    name: String,
    priority: String,
    share: f64,
    key: String,
}

/// What one client saw.
#[derive(Debug, Clone)]
struct Record {
    phase: usize,
    tenant: usize,
    /// From the phase's start.
    sent_in_phase: Duration,
    /// When the answer ended (or the client gave up), from the run's start.
    done_at: Duration,
    status: u16,
    ttft: Option<Duration>,
    total: Duration,
    complete: bool,
    cut: bool,
    timed_out: bool,
    retry_after: bool,
}

fn parse_phases(s: &str) -> anyhow::Result<Vec<Phase>> {
    s.split(',')
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            if parts.len() != 3 {
                bail!("phase {p:?} is not NAME:MULTIPLIER:SECONDS");
            }
            Ok(Phase {
                name: parts[0].to_string(),
                multiplier: parts[1].parse().context("multiplier")?,
                length: Duration::from_secs_f64(parts[2].parse().context("seconds")?),
            })
        })
        .collect()
}

fn parse_tenants(s: &str) -> anyhow::Result<Vec<Tenant>> {
    s.split(',')
        .map(|t| {
            let parts: Vec<&str> = t.splitn(4, ':').collect();
            if parts.len() != 4 {
                bail!("tenant {t:?} is not NAME:PRIORITY:SHARE:KEY");
            }
            Ok(Tenant {
                name: parts[0].to_string(),
                priority: parts[1].to_string(),
                share: parts[2].parse().context("share")?,
                key: parts[3].to_string(),
            })
        })
        .collect()
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one(
    client: HttpClient,
    uri: hyper::Uri,
    body: Bytes,
    key: String,
    timeout: Duration,
) -> (u16, Option<Duration>, bool, bool, bool, bool) {
    let start = Instant::now();
    let mut req = hyper::Request::post(uri).header("content-type", "application/json");
    if !key.is_empty() {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let Ok(req) = req.body(Full::new(body)) else {
        return (0, None, false, false, false, false);
    };
    let work = async {
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(_) => return (0, None, false, false, false),
        };
        let status = resp.status().as_u16();
        let retry_after = resp.headers().contains_key("retry-after");
        let mut body = resp.into_body();
        let mut ttft = None;
        let mut tail: Vec<u8> = Vec::new();
        let mut errored = false;
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        if ttft.is_none() && status == 200 && d.windows(5).any(|w| w == b"data:") {
                            ttft = Some(start.elapsed());
                        }
                        if d.windows(9).any(|w| w == b"\"error\":{") {
                            errored = true;
                        }
                        tail.extend_from_slice(d);
                        if tail.len() > 64 {
                            tail.drain(..tail.len() - 64);
                        }
                    }
                }
                Some(Err(_)) => return (status, ttft, false, true, retry_after),
                None => break,
            }
        }
        let done = tail.windows(12).any(|w| w == b"data: [DONE]");
        let complete = status == 200 && done && !errored;
        let cut = status == 200 && !complete;
        (status, ttft, complete, cut, retry_after)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((status, ttft, complete, cut, retry_after)) => {
            (status, ttft, complete, cut, false, retry_after)
        }
        Err(_) => (0, None, false, false, true, false),
    }
}

fn pct(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

fn hist() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let phases = parse_phases(&args.phases)?;
    let tenants = parse_tenants(&args.tenants)?;
    let share_total: f64 = tenants.iter().map(|t| t.share).sum();
    if tenants.is_empty() || share_total <= 0.0 {
        bail!("at least one tenant with a positive share is needed");
    }
    let uri: hyper::Uri = format!("{}/v1/chat/completions", args.url.trim_end_matches('/'))
        .parse()
        .context("--url")?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4096)
        .build(connector);
    let body = chat_body(
        &args.model,
        "Tell me about breakwaters and harbours.",
        args.max_tokens,
    );
    let prompt_bytes = args
        .prompt_bytes
        .as_deref()
        .map(parse_range)
        .transpose()
        .context("--prompt-bytes")?;
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let timeout = Duration::from_secs(args.client_timeout_s);
    let mut tasks = tokio::task::JoinSet::new();
    let run_start = Instant::now();
    // Each phase's window, from the run's start.
    let mut windows = Vec::with_capacity(phases.len());
    for (pi, phase) in phases.iter().enumerate() {
        let rate = args.base_rate * phase.multiplier;
        let start = Instant::now();
        let from = start - run_start;
        windows.push(from..from + phase.length);
        let mut next = Duration::ZERO;
        loop {
            let gap: f64 = -rng.gen::<f64>().max(1e-12).ln() / rate;
            next += Duration::from_secs_f64(gap);
            if next >= phase.length {
                break;
            }
            tokio::time::sleep_until((start + next).into()).await;
            let mut pick = rng.gen::<f64>() * share_total;
            let mut ti = 0;
            for (i, t) in tenants.iter().enumerate() {
                ti = i;
                if pick < t.share {
                    break;
                }
                pick -= t.share;
            }
            let body = match prompt_bytes {
                Some((lo, hi)) => {
                    let n = rng.gen_range(lo..=hi);
                    let head = format!("{} ", rng.gen::<u64>());
                    let content = head + &"word ".repeat(n / 5 + 1)[..n];
                    chat_body(&args.model, &content, args.max_tokens)
                }
                None => body.clone(),
            };
            let (client, uri, key) = (client.clone(), uri.clone(), tenants[ti].key.clone());
            let records = Arc::clone(&records);
            let sent_in_phase = start.elapsed();
            tasks.spawn(async move {
                let sent = Instant::now();
                let (status, ttft, complete, cut, timed_out, retry_after) =
                    one(client, uri, body, key, timeout).await;
                let r = Record {
                    phase: pi,
                    tenant: ti,
                    sent_in_phase,
                    status,
                    ttft,
                    total: sent.elapsed(),
                    done_at: run_start.elapsed(),
                    complete,
                    cut,
                    timed_out,
                    retry_after,
                };
                if let Ok(mut v) = records.lock() {
                    v.push(r);
                }
            });
            while tasks.try_join_next().is_some() {}
        }
        // Wait out the rest of the phase.
        tokio::time::sleep_until((start + phase.length).into()).await;
    }
    while tasks.join_next().await.is_some() {}
    let records = records.lock().map(|v| v.clone()).unwrap_or_default();
    let slo = Duration::from_millis(args.slo_ms);
    let good = |r: &Record| r.complete && r.ttft.is_some_and(|t| t <= slo);
    let mut out = Vec::new();
    for (pi, phase) in phases.iter().enumerate() {
        let rs: Vec<&Record> = records.iter().filter(|r| r.phase == pi).collect();
        let mut ttft = hist()?;
        let mut ttft_late = hist()?;
        let mut refusal = hist()?;
        for r in &rs {
            if let Some(t) = r.ttft {
                ttft.record(t.as_micros().max(1) as u64)?;
                if r.sent_in_phase >= Duration::from_secs(2) {
                    ttft_late.record(t.as_micros().max(1) as u64)?;
                }
            }
            if matches!(r.status, 429 | 503) {
                refusal.record(r.total.as_micros().max(1) as u64)?;
            }
        }
        let refused = rs.iter().filter(|r| matches!(r.status, 429 | 503)).count();
        let per_tenant: Vec<_> = tenants
            .iter()
            .enumerate()
            .map(|(ti, t)| {
                let mine: Vec<&&Record> = rs.iter().filter(|r| r.tenant == ti).collect();
                let g = mine.iter().filter(|r| good(r)).count();
                json!({
                    "tenant": t.name,
                    "priority": t.priority,
                    "offered": mine.len(),
                    "good": g,
                    "refused": mine.iter().filter(|r| matches!(r.status, 429 | 503)).count(),
                })
            })
            .collect();
        let good_n = rs.iter().filter(|r| good(r)).count();
        // Good answers that ended inside this phase's window, whenever they were sent: the
        // rate the fleet delivered good work during the phase. Counting by arrival instead
        // credits a phase with work done after it ended (a queue that spills into the next).
        let window = &windows[pi];
        let good_done = records
            .iter()
            .filter(|r| good(r) && window.contains(&r.done_at))
            .count();
        out.push(json!({
            "phase": phase.name,
            "rate": args.base_rate * phase.multiplier,
            "seconds": phase.length.as_secs_f64(),
            "offered": rs.len(),
            "good": good_n,
            "good_per_s": good_n as f64 / phase.length.as_secs_f64(),
            "good_done": good_done,
            "good_done_per_s": good_done as f64 / phase.length.as_secs_f64(),
            "ok": rs.iter().filter(|r| r.status == 200).count(),
            "ttft_p50_ms": pct(&ttft, 0.5),
            "ttft_p99_ms": pct(&ttft, 0.99),
            "ttft_after_2s_p50_ms": pct(&ttft_late, 0.5),
            "ttft_after_2s_p99_ms": pct(&ttft_late, 0.99),
            "refused": refused,
            "refused_with_retry_after": rs.iter().filter(|r| matches!(r.status, 429 | 503) && r.retry_after).count(),
            "refusal_p50_ms": pct(&refusal, 0.5),
            "refusal_p99_ms": pct(&refusal, 0.99),
            "status_5xx": rs.iter().filter(|r| r.status >= 500 && r.status != 503).count(),
            "status_503": rs.iter().filter(|r| r.status == 503).count(),
            "no_answer": rs.iter().filter(|r| r.status == 0 && !r.timed_out).count(),
            "timeouts": rs.iter().filter(|r| r.timed_out).count(),
            "cut_streams": rs.iter().filter(|r| r.cut).count(),
            "tenants": per_tenant,
        }));
    }
    println!("{}", json!({ "phases": out }));
    Ok(())
}
