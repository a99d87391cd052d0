//! `llm-sim` command line: one simulated engine on a serving and a control listener.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use llm_sim::{Behaviour, SimConfig, SimHandle};

/// A simulated OpenAI-compatible inference engine (continuous batching, SSE, vLLM metrics,
/// fault injection).
#[derive(Parser, Debug)]
#[command(name = "llm-sim", version)]
struct Args {
    /// Address of the OpenAI API, `/health` and `/metrics`.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Address of the control API (`POST /fault`, `GET /stats`).
    #[arg(long, default_value = "127.0.0.1:8100")]
    control_listen: SocketAddr,
    /// The model served.
    #[arg(long, default_value = "sim-llama")]
    model: String,
    /// Decode throughput of the whole engine, tokens per second.
    #[arg(long, default_value_t = 1000.0)]
    capacity_tps: f64,
    /// Batch slots; requests beyond them queue.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Base time to first token, milliseconds.
    #[arg(long, default_value_t = 20)]
    ttft_ms: u64,
    /// Minimum gap between tokens of one request, milliseconds.
    #[arg(long, default_value_t = 5)]
    itl_ms: u64,
    /// KV-cache size, tokens.
    #[arg(long, default_value_t = 65_536)]
    kv_capacity_tokens: u64,
    /// How the engine schedules and paces its batch: continuous (the batch shares
    /// `--capacity-tps`), fifo (each slot decodes at `--itl-ms` whatever the batch),
    /// slowing-decode (a full batch decodes `1 + --decode-slowdown` times slower),
    /// prefill-heavy (prompts prefilled one at a time at `--prefill-tps`), kv-preempt (the
    /// youngest request is preempted when the KV cache overflows).
    #[arg(long, default_value = "continuous")]
    behaviour: String,
    /// slowing-decode: extra time per token at a full batch, as a multiple of `--itl-ms`.
    #[arg(long, default_value_t = 2.0)]
    decode_slowdown: f64,
    /// prefill-heavy: prefill throughput, prompt tokens per second (default: 2 x
    /// `--capacity-tps`).
    #[arg(long)]
    prefill_tps: Option<f64>,
    /// Serve HTTPS with this certificate chain (PEM); needs `--tls-key`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates issued by this CA (PEM): mTLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !(args.capacity_tps.is_finite() && args.capacity_tps > 0.0) {
        anyhow::bail!("--capacity-tps must be a positive number");
    }
    let prefill_tps = args.prefill_tps.unwrap_or(2.0 * args.capacity_tps);
    if !(prefill_tps.is_finite() && prefill_tps > 0.0) {
        anyhow::bail!("--prefill-tps must be a positive number");
    }
    if !(args.decode_slowdown.is_finite() && args.decode_slowdown >= 0.0) {
        anyhow::bail!("--decode-slowdown must be a number of at least 0");
    }
    let behaviour = Behaviour::parse(&args.behaviour, args.decode_slowdown, prefill_tps)
        .with_context(|| {
            format!(
                "--behaviour {:?}: expected one of {}",
                args.behaviour,
                Behaviour::NAMES
            )
        })?;
    if args.slots == 0 {
        anyhow::bail!("--slots must be at least 1");
    }
    let config = SimConfig {
        model: args.model,
        capacity_tps: args.capacity_tps,
        slots: args.slots,
        ttft: Duration::from_millis(args.ttft_ms),
        itl: Duration::from_millis(args.itl_ms),
        kv_capacity_tokens: args.kv_capacity_tokens.max(1),
        behaviour,
    };
    let read =
        |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let ca = args.tls_client_ca.as_deref().map(read).transpose()?;
            Some(llm_sim::tls::server_config(
                &read(cert)?,
                &read(key)?,
                ca.as_deref(),
            )?)
        }
        _ => None,
    };
    let sim = SimHandle::bind(config, args.listen, args.control_listen, tls)
        .await
        .with_context(|| format!("binding {} and {}", args.listen, args.control_listen))?;
    tracing::info!(listen = %sim.addr(), control = %sim.control_addr(), "llm-sim ready");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
