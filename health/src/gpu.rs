//! Reading each shard's gpu-probe: `GET {probe}/v1/gpus` every interval, the verdict of the
//! devices the shard runs on (the worst of them), passed to the monitor. A probe that does
//! not answer, answers nonsense or serves a stale reading yields an *unknown* verdict, which
//! never takes a shard out of service (see [`crate::tracker`]).

use std::time::Duration;

use gpu_probe::{NodeReport, Verdict};
use http_body_util::{BodyExt, Limited};

use tokio::task::JoinHandle;

use crate::config::HealthConfig;
use crate::monitor::HealthMonitor;
use crate::probes::ProbeClient;
use crate::tracker::Signal;
use crate::view::{GpuSummary, ShardId};

/// One shard's probe.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuTarget {
    /// The shard.
    pub shard: ShardId,
    /// The probe's base URL, e.g. `http://10.0.0.1:9400`.
    pub probe: String,
    /// Device indices the shard runs on; empty: every device on the node.
    pub devices: Vec<u32>,
}

/// Starts polling one shard's probe on the current Tokio runtime until the returned
/// handle is aborted.
pub fn spawn_gpu_poll(
    target: GpuTarget,
    client: ProbeClient,
    cfg: &HealthConfig,
    monitor: HealthMonitor,
) -> JoinHandle<()> {
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(cfg.gpu_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let summary = read_once(&client, &target, &cfg).await;
            monitor.report(target.shard, Signal::Gpu(summary));
        }
    })
}

fn unknown(reason: String) -> GpuSummary {
    GpuSummary {
        verdict: None,
        reasons: vec![reason],
        ..GpuSummary::default()
    }
}

async fn read_once(client: &ProbeClient, target: &GpuTarget, cfg: &HealthConfig) -> GpuSummary {
    let url = format!("{}/v1/gpus", target.probe.trim_end_matches('/'));
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return unknown(format!("bad probe URL {url}"));
    };
    let call = async {
        let resp = client.get(uri).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), 4 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice::<NodeReport>(&body).map_err(|e| format!("unreadable report: {e}"))
    };
    let report = match tokio::time::timeout(cfg.gpu_timeout, call).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return unknown(format!("probe {url}: {e}")),
        Err(_) => {
            return unknown(format!(
                "probe {url}: no answer within {} ms",
                cfg.gpu_timeout.as_millis()
            ))
        }
    };
    summarize(&report, &target.devices, cfg.gpu_stale)
}

/// The shard's view of a node report: its devices only, the worst verdict, summed memory.
pub fn summarize(report: &NodeReport, devices: &[u32], stale: Duration) -> GpuSummary {
    if report.age_ms > stale.as_millis() as u64 {
        return unknown(format!("stale reading ({} ms old)", report.age_ms));
    }
    let mine: Vec<_> = report
        .devices
        .iter()
        .filter(|d| devices.is_empty() || devices.contains(&d.index))
        .collect();
    if mine.is_empty() || mine.len() < devices.len() {
        return unknown(format!("the probe does not report devices {devices:?}"));
    }
    let verdict = mine
        .iter()
        .map(|d| d.verdict)
        .max()
        .unwrap_or(Verdict::Healthy);
    GpuSummary {
        verdict: Some(verdict),
        reasons: mine
            .iter()
            .flat_map(|d| {
                d.reasons
                    .iter()
                    .map(move |r| format!("gpu {}: {r}", d.index))
            })
            .collect(),
        memory_free_bytes: mine.iter().map(|d| d.memory_free_bytes).sum(),
        memory_total_bytes: mine.iter().map(|d| d.memory_total_bytes).sum(),
        utilization_gpu_pct: mine.iter().filter_map(|d| d.utilization_gpu_pct).max(),
        temperature_c: mine.iter().filter_map(|d| d.temperature_c).max(),
        age_ms: report.age_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_probe::GpuReport;

    fn report(age_ms: u64) -> NodeReport {
        let dev = |index, verdict, reasons: &[&str]| GpuReport {
            index,
            name: "H200".into(),
            memory_total_bytes: 100,
            memory_free_bytes: 10,
            verdict,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            ..GpuReport::default()
        };
        NodeReport {
            source: "simulated".into(),
            devices: vec![
                dev(0, Verdict::Healthy, &[]),
                dev(1, Verdict::Failing, &["2 uncorrectable ECC error(s)"]),
            ],
            verdict: Verdict::Failing,
            age_ms,
            ..NodeReport::default()
        }
    }

    #[test]
    fn a_shard_sees_only_its_devices() {
        let stale = Duration::from_secs(5);
        let s = summarize(&report(10), &[0], stale);
        assert_eq!(
            (s.verdict, s.memory_total_bytes),
            (Some(Verdict::Healthy), 100)
        );
        let s = summarize(&report(10), &[0, 1], stale);
        assert_eq!(s.verdict, Some(Verdict::Failing));
        assert_eq!(
            s.reasons,
            vec!["gpu 1: 2 uncorrectable ECC error(s)".to_string()]
        );
        assert_eq!(summarize(&report(10), &[], stale).memory_total_bytes, 200);
    }

    #[test]
    fn stale_readings_and_missing_devices_are_unknown() {
        let stale = Duration::from_secs(5);
        assert_eq!(summarize(&report(6000), &[0], stale).verdict, None);
        assert_eq!(summarize(&report(10), &[7], stale).verdict, None);
    }
}
