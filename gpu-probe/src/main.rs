//! `gpu-probe`: the GPU health agent. One per GPU node.

#![allow(clippy::print_stdout)] // `--once` prints the report

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gpu_probe::classify::Thresholds;
use gpu_probe::server::{self, Agent};
use gpu_probe::source::nvidia::NvidiaSource;
use gpu_probe::source::simulated::SimulatedNode;
use gpu_probe::source::{GpuSource, ProbeError};

/// Reads every GPU on this node (CUDA memory and a liveness round-trip, NVML health
/// counters), classifies each healthy / degraded / failing, and serves the verdicts.
#[derive(Parser, Debug)]
#[command(name = "gpu-probe", version)]
struct Args {
    /// Address of the HTTP API (`/v1/gpus`, `/metrics`, `/healthz`).
    #[arg(long, default_value = "0.0.0.0:9400")]
    listen: SocketAddr,
    /// Serve simulated devices whose state is set with `POST /v1/simulate`.
    #[arg(long)]
    simulate: bool,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 1)]
    simulate_devices: u32,
    /// Time between readings, milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Deadline of the CUDA liveness round-trip, milliseconds; past it the device is hung.
    #[arg(long, default_value_t = 5000)]
    liveness_timeout_ms: u64,
    /// Classification thresholds (TOML; see the README for the keys).
    #[arg(long)]
    thresholds: Option<PathBuf>,
    /// Free memory below this percentage of the total is degraded (overrides the file).
    #[arg(long)]
    min_free_memory_pct: Option<f64>,
    /// Take one reading, print it as JSON and exit.
    #[arg(long)]
    once: bool,
}

/// Exit code when there is no usable GPU.
const EXIT_NO_GPU: u8 = 2;

fn thresholds(args: &Args) -> Result<Thresholds, String> {
    let mut t = match &args.thresholds {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?
        }
        None => Thresholds::default(),
    };
    if let Some(p) = args.min_free_memory_pct {
        t.min_free_memory_pct = p;
    }
    t.validate()?;
    Ok(t)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A panic inside a driver binding is caught and reported as an error; keep its
    // message to one line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("internal error: {info}");
    }));
    let args = Args::parse();
    let thresholds = match thresholds(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gpu-probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.interval_ms == 0 || args.liveness_timeout_ms == 0 || args.simulate_devices == 0 {
        eprintln!("gpu-probe: --interval-ms, --liveness-timeout-ms and --simulate-devices must be positive");
        return ExitCode::FAILURE;
    }
    let (source, simulated): (Box<dyn GpuSource>, _) = if args.simulate {
        let node = SimulatedNode::new(args.simulate_devices);
        (Box::new(node.clone()), Some(node))
    } else {
        match NvidiaSource::open(Duration::from_millis(args.liveness_timeout_ms)) {
            Ok(s) => (Box::new(s), None),
            Err(e) => {
                eprintln!("gpu-probe: {e}");
                if matches!(e, ProbeError::NoDriver | ProbeError::NoDevices) {
                    eprintln!("gpu-probe: run with --simulate to serve simulated devices instead");
                }
                return ExitCode::from(EXIT_NO_GPU);
            }
        }
    };
    let agent = Agent::new(
        source,
        thresholds,
        Duration::from_millis(args.interval_ms),
        simulated,
    );
    if args.once {
        return match agent.refresh() {
            Ok(r) => {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gpu-probe: {e}");
                ExitCode::from(EXIT_NO_GPU)
            }
        };
    }
    if let Err(e) = agent.refresh() {
        tracing::warn!(error = %e, "first reading failed");
    }
    agent.spawn_poller();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpu-probe: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("gpu-probe: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().map_or(args.listen, |a| a);
        tracing::info!(%addr, simulate = args.simulate, "gpu-probe listening on http://{addr}");
        tokio::select! {
            _ = server::serve(agent, listener) => ExitCode::SUCCESS,
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        }
    })
}
