//! Active health checks: `GET` a path on every shard at an interval (with jitter, so a
//! fleet of gateways does not probe in lock-step), and tell the monitor what came back.
//! 2xx passes; 503 means the engine says it is dead (vLLM's `/health` after its engine
//! core died) and fails at once; anything else — another status, a refused connection, no
//! answer within the timeout — counts toward the unhealthy threshold.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;

use crate::config::HealthConfig;
use crate::monitor::HealthMonitor;
use crate::tracker::Signal;

/// One shard to check.
#[derive(Debug, Clone)]
pub struct CheckTarget {
    /// Shard index (as the monitor numbers shards).
    pub shard: usize,
    /// The full URL to `GET`, e.g. `http://10.0.0.1:8000/health`.
    pub url: String,
}

/// Starts one checking task per target on the current Tokio runtime. Does nothing when
/// checks are off in `cfg`.
pub fn spawn_checks(targets: Vec<CheckTarget>, cfg: &HealthConfig, monitor: HealthMonitor) {
    if !cfg.checks_enabled() {
        return;
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.check_timeout));
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    for target in targets {
        let (client, monitor) = (client.clone(), monitor.clone());
        let (interval, timeout) = (cfg.check_interval, cfg.check_timeout);
        tokio::spawn(async move {
            // Spread the first checks over one interval.
            let first = rand::thread_rng().gen_range(Duration::ZERO..=interval);
            tokio::time::sleep(first).await;
            loop {
                let signal = check_once(&client, &target.url, timeout).await;
                monitor.report(target.shard, signal);
                let jitter = interval.mul_f64(rand::thread_rng().gen_range(-0.1..=0.1));
                tokio::time::sleep(if jitter.is_zero() {
                    interval
                } else {
                    interval.saturating_add(jitter)
                })
                .await;
            }
        });
    }
}

async fn check_once(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    timeout: Duration,
) -> Signal {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return Signal::CheckFailed {
            detail: format!("bad check URL {url}"),
        };
    };
    let call = async {
        let resp = client.get(uri).await?;
        let status = resp.status().as_u16();
        // Read (and drop) the body so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(status)) if (200..300).contains(&status) => Signal::CheckPassed,
        Ok(Ok(503)) => Signal::CheckFailedHard {
            detail: format!("GET {url}: status 503"),
        },
        Ok(Ok(status)) => Signal::CheckFailed {
            detail: format!("GET {url}: status {status}"),
        },
        Ok(Err(e)) => Signal::CheckFailed {
            detail: format!("GET {url}: {e}"),
        },
        Err(_) => Signal::CheckFailed {
            detail: format!("GET {url}: no answer within {} ms", timeout.as_millis()),
        },
    }
}
