//! Active health checks: `GET` a path on every shard at an interval (with jitter, so a
//! fleet of gateways does not probe in lock-step), and tell the monitor what came back.
//! 2xx passes; 503 means the engine says it is dead (vLLM's `/health` after its engine
//! core died) and fails at once; anything else — another status, a refused connection, no
//! answer within the timeout — counts toward the unhealthy threshold.

use std::time::Duration;

use http_body_util::BodyExt;
use rand::Rng;

use tokio::task::JoinHandle;

use crate::config::HealthConfig;
use crate::monitor::HealthMonitor;
use crate::probes::ProbeClient;
use crate::tracker::Signal;
use crate::view::ShardId;

/// One shard to check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckTarget {
    /// The shard.
    pub shard: ShardId,
    /// The full URL to `GET`, e.g. `http://10.0.0.1:8000/health`.
    pub url: String,
}

/// Starts checking one shard on the current Tokio runtime until the returned handle is
/// aborted. The first check comes at a random point within `first_within` (one interval
/// for the fleet the gateway starts with, less for a shard that joins later and waits for
/// it), so a fleet of gateways (or a reload that adds many shards) does not probe in
/// lock-step.
pub fn spawn_check(
    target: CheckTarget,
    client: ProbeClient,
    cfg: &HealthConfig,
    first_within: Duration,
    monitor: HealthMonitor,
) -> JoinHandle<()> {
    let (interval, timeout) = (cfg.check_interval, cfg.check_timeout);
    tokio::spawn(async move {
        let first = rand::thread_rng().gen_range(Duration::ZERO..=first_within);
        tokio::time::sleep(first).await;
        loop {
            let signal = check_once(&client, &target.url, timeout).await;
            monitor.report(target.shard, signal);
            let unit: f64 = rand::thread_rng().gen_range(0.0..=1.0);
            tokio::time::sleep(jittered(interval, unit)).await;
        }
    })
}

/// `interval` ±10 %, for `unit` in 0..=1.
fn jittered(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

async fn check_once(client: &ProbeClient, url: &str, timeout: Duration) -> Signal {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let i = Duration::from_millis(1000);
        assert_eq!(jittered(i, 0.0), Duration::from_millis(900));
        assert_eq!(jittered(i, 1.0), Duration::from_millis(1100));
        assert_eq!(jittered(i, 7.0), Duration::from_millis(1100));
    }

    #[tokio::test]
    async fn checks_report_pass_dead_and_unreachable() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A tiny server answering 200, then 503.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let client = crate::probes::client(Duration::from_secs(2), true, None);
        let url = format!("http://{addr}/health");
        let t = Duration::from_secs(2);
        assert_eq!(check_once(&client, &url, t).await, Signal::CheckPassed);
        assert!(matches!(
            check_once(&client, &url, t).await,
            Signal::CheckFailedHard { .. }
        ));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("http://{closed}/health");
        assert!(matches!(
            check_once(&client, &url, t).await,
            Signal::CheckFailed { .. }
        ));
    }
}
