//! The command line: `serve`, `validate`, `policy diff` and `demo`.

#![allow(clippy::print_stdout)] // printing to the terminal is this module's job

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::policy::revision::Revision;
use crate::policy::{self, PolicyError};
use crate::server::{self, ServeOptions};

/// Breakwater: an LLM inference gateway that keeps serving through surges and failures.
#[derive(Parser, Debug)]
#[command(name = "breakwater", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How log lines are written: `text` for people, `json` (one object per line, the
    /// access log's fields included) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The same as `--log-format json`.
    #[arg(long, global = true, hide = true)]
    pub log_json: bool,
    /// Send a span per request (and one per attempt) to this OTLP/HTTP collector, e.g.
    /// `http://127.0.0.1:4318` (default: `OTEL_EXPORTER_OTLP_ENDPOINT`; unset: no export).
    #[arg(long, global = true)]
    pub otlp_endpoint: Option<String>,
}

/// The OTLP endpoint from the flag or `OTEL_EXPORTER_OTLP_ENDPOINT`: `Ok(None)` when
/// neither is set; an error for a malformed or non-`http` URL.
fn otlp_endpoint(flag: Option<&str>) -> Result<Option<url::Url>, String> {
    let given = match flag {
        Some(f) => f.to_string(),
        None => match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Ok(v) if !v.trim().is_empty() => v,
            _ => return Ok(None),
        },
    };
    let url = url::Url::parse(given.trim())
        .map_err(|e| format!("OTLP endpoint {given:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" if url.host_str().is_some() => Ok(Some(url)),
        "https" => Err(format!(
            "OTLP endpoint {given:?}: https is not supported yet; use a local collector over http"
        )),
        _ => Err(format!("OTLP endpoint {given:?} must be an http:// URL")),
    }
}

/// The log's format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway from a policy directory.
    Serve {
        /// Directory of policy `*.toml` files.
        #[arg(long)]
        policy: PathBuf,
        /// Traffic listener (default: the policy's `gateway.listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin listener (default: the policy's `gateway.admin_listen`).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Worker threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
        /// Where listening sockets are handed over in a zero-downtime upgrade (`SIGQUIT`
        /// to the running gateway sends them there).
        #[arg(long, default_value = "/tmp/breakwater-upgrade.sock")]
        upgrade_sock: PathBuf,
        /// Take over the listening sockets of the gateway running on `--upgrade-sock`
        /// (start this one, then send the old one `SIGQUIT`).
        #[arg(long)]
        upgrade: bool,
        /// Once listening, write `{"listen": ..., "admin_listen": ...}` here (useful with
        /// port 0, which lets the system choose).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Check a policy directory: one line per problem and a non-zero exit, or a summary.
    Validate {
        /// Directory of policy `*.toml` files.
        dir: PathBuf,
    },
    /// Work with policy directories.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// `GET` a URL over plain HTTP and exit 0 on a 2xx answer, 1 otherwise (a container's
    /// health check: no curl or shell needed in the image).
    CheckHealth {
        /// e.g. `http://127.0.0.1:8080/healthz`.
        url: String,
    },
    /// Run the gateway in front of a built-in simulated fleet (two regions) on 127.0.0.1.
    #[cfg(feature = "demo")]
    Demo {
        /// Traffic listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener.
        #[arg(long, default_value = "127.0.0.1:9091")]
        admin_listen: SocketAddr,
    },
}

/// `breakwater policy ...`.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// What changing from OLD to NEW does: shards, capacity per region and model, tenants,
    /// settings. Exits 1 when NEW is not a valid set (its problems are printed).
    Diff {
        /// The policy directory in force (e.g. the target branch's checkout).
        old: PathBuf,
        /// The proposed one.
        new: PathBuf,
    },
    /// The same check as `breakwater validate`.
    Validate {
        /// Directory of policy `*.toml` files.
        dir: PathBuf,
    },
}

/// A policy directory read for the CLI: the set and its declared settings, or its problems.
fn read_set(
    dir: &std::path::Path,
) -> Result<(policy::Policy, policy::diff::Settings, Revision), PolicyError> {
    let sources = policy::read_sources(dir)?;
    let p = policy::from_sources(&sources)?;
    Ok((
        p,
        policy::diff::settings(&sources),
        Revision::of(Some(dir), &sources),
    ))
}

fn policy_diff(old: &std::path::Path, new: &std::path::Path) -> ExitCode {
    let new_set = match read_set(new) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: the new set is not valid:", new.display());
            print_policy_error(&e);
            return ExitCode::FAILURE;
        }
    };
    let name = |r: &Revision| match &r.commit {
        Some(c) => format!("commit {c}, sha256:{}", &r.content[..16]),
        None => r.label(),
    };
    println!("new: {} ({})", new.display(), name(&new_set.2));
    match read_set(old) {
        Ok(old_set) => {
            println!("old: {} ({})", old.display(), name(&old_set.2));
            let d = policy::diff::diff((&old_set.0, &old_set.1), (&new_set.0, &new_set.1));
            print!("{d}");
        }
        Err(e) => {
            println!(
                "old: {} is not a valid set, so there is nothing to compare:",
                old.display()
            );
            print_policy_error(&e);
            println!("{}", new_set.0.summary());
        }
    }
    ExitCode::SUCCESS
}

fn validate(dir: &std::path::Path) -> ExitCode {
    match policy::load_dir(dir) {
        Ok(p) => {
            println!("{}", p.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_policy_error(&e);
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,pingora_core=warn,pingora_proxy=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        // One flat object per line: the event's fields at the top level, beside
        // `timestamp`, `level`, `target` and `message`.
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn print_policy_error(e: &PolicyError) {
    match e {
        PolicyError::Invalid(issues) => {
            for i in issues {
                eprintln!("{i}");
            }
            eprintln!("{} problem(s); the policy set is not valid", issues.len());
        }
        other => eprintln!("{other}"),
    }
}

fn admin_token(generate: bool) -> (String, bool) {
    match std::env::var("BREAKWATER_ADMIN_TOKEN") {
        Ok(t) if !t.is_empty() => (t, false),
        _ if generate => (format!("{:032x}", rand::random::<u128>()), true),
        _ => (String::new(), false),
    }
}

/// Runs the command line; the exit code is non-zero on any failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { dir }
        | Command::Policy {
            command: PolicyCommand::Validate { dir },
        } => validate(&dir),
        Command::Policy {
            command: PolicyCommand::Diff { old, new },
        } => policy_diff(&old, &new),
        Command::CheckHealth { url } => match crate::check_health::check(&url) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            policy: dir,
            listen,
            admin_listen,
            threads,
            upgrade_sock,
            upgrade,
            addr_file,
        } => {
            init_logging(cli.log_json || cli.log_format == LogFormat::Json);
            let otlp_endpoint = match otlp_endpoint(cli.otlp_endpoint.as_deref()) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let loaded = policy::read_sources(&dir).and_then(|sources| {
                let p = policy::from_sources(&sources)?;
                Ok((p, Revision::of(Some(&dir), &sources)))
            });
            let (policy, revision) = match loaded {
                Ok(ok) => ok,
                Err(e) => {
                    print_policy_error(&e);
                    return ExitCode::FAILURE;
                }
            };
            let (admin_token, _) = admin_token(false);
            serve(ServeOptions {
                policy,
                policy_dir: Some(dir),
                revision,
                listen,
                admin_listen,
                admin_token,
                fault_controls: Default::default(),
                threads,
                upgrade_sock,
                upgrade,
                addr_file,
                otlp_endpoint,
            })
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            listen,
            admin_listen,
        } => {
            init_logging(cli.log_json || cli.log_format == LogFormat::Json);
            match otlp_endpoint(cli.otlp_endpoint.as_deref()) {
                Ok(otlp) => demo(listen, admin_listen, otlp),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(opts: ServeOptions) -> ExitCode {
    match server::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("breakwater: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "demo")]
fn demo(listen: SocketAddr, admin_listen: SocketAddr, otlp_endpoint: Option<url::Url>) -> ExitCode {
    let policy = match crate::demo::policy() {
        Ok(p) => p,
        Err(e) => {
            print_policy_error(&e);
            return ExitCode::FAILURE;
        }
    };
    let controls = match crate::demo::start_fleet(&policy) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("breakwater demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (token, generated) = admin_token(true);
    let model = policy
        .pools
        .first()
        .and_then(|p| p.models.first())
        .cloned()
        .unwrap_or_default();
    println!(
        "Breakwater demo: {} shards in {} regions (home: {})",
        policy.shards.len(),
        policy.regions.len(),
        policy.home_region
    );
    for s in &policy.shards {
        println!(
            "  {:<10} {:<8} {:>6} tok/s  {}",
            s.id, s.region, s.capacity_tps, s.url
        );
    }
    println!();
    println!("OpenAI API:  http://{listen}/v1");
    println!("Admin API:   http://{admin_listen}/admin/status   (metrics: http://{admin_listen}/metrics)");
    if generated {
        println!("Admin token: {token}   (set BREAKWATER_ADMIN_TOKEN to choose your own)");
    } else {
        println!("Admin token: from BREAKWATER_ADMIN_TOKEN");
    }
    println!();
    println!("Tenants (send the key as Authorization: Bearer KEY; without one a request is the standard 'default' tenant):");
    for (id, priority, key) in crate::demo::DEMO_KEYS {
        println!("  {key:<20} {id} ({priority})");
    }
    println!();
    println!("Try:");
    println!(
        "  curl -s http://{listen}/v1/chat/completions -H 'content-type: application/json' \\"
    );
    println!("    -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}],\"max_tokens\":16}}'");
    println!("  curl -s -H 'authorization: Bearer {token}' http://{admin_listen}/admin/status");
    println!("  curl -s -X POST -H 'authorization: Bearer {token}' http://{admin_listen}/admin/shards/use-big/fault -d '{{\"mode\":\"down\"}}'");
    println!("  (fault modes: down, error, slow, hang, midstream, ok, and for the simulated GPU: gpu_degraded, gpu_failing, gpu_hung, gpu_ok)");
    println!();
    println!("Surge it (open-loop arrivals from the three tenants, 20 to 400 req/s) and watch refusals and goodput:");
    println!("  cargo run --release -p breakwater-loadgen --bin surge -- --url http://{listen} --model {model} \\");
    println!("    --base-rate 20 --phases base:1:5,surge:20:10,base-again:1:5 \\");
    println!("    --tenants critical:critical:10:sk-demo-critical,standard:standard:60:sk-demo-standard,sheddable:sheddable:30:sk-demo-sheddable");
    println!("  curl -s http://{admin_listen}/metrics | grep -E 'breakwater_(refused|admitted)_total|queue_depth'");
    println!();
    println!("Ctrl-C stops everything.");
    let revision = Revision::of(None, &crate::demo::policy_sources());
    serve(ServeOptions {
        policy,
        policy_dir: None,
        revision,
        listen: Some(listen),
        admin_listen: Some(admin_listen),
        admin_token: token,
        fault_controls: controls,
        threads: Some(2),
        upgrade_sock: std::env::temp_dir().join("breakwater-demo-upgrade.sock"),
        upgrade: false,
        addr_file: None,
        otlp_endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::otlp_endpoint;

    #[test]
    fn otlp_endpoints_must_be_plain_http_urls() {
        let ok = otlp_endpoint(Some("http://127.0.0.1:4318"))
            .unwrap()
            .unwrap();
        assert_eq!(ok.as_str(), "http://127.0.0.1:4318/");
        for bad in ["https://collector:4318", "ftp://x", "not a url", "http://"] {
            let e = otlp_endpoint(Some(bad)).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
