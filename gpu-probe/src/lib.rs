//! `gpu-probe`: the report a GPU node agent publishes about its devices, and the verdict
//! the gateway's health model consumes.
//!
//! This crate owns the report types only; it has no GPU code and never links CUDA.

use serde::{Deserialize, Serialize};

/// A device's (or a node's) fitness to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Serving normally.
    #[default]
    Healthy,
    /// Serving, but slower or close to a limit: take less traffic.
    Degraded,
    /// About to fail or failed: drain.
    Failing,
}

/// What the agent read from one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuReport {
    /// Device index as the driver numbers it.
    pub index: u32,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total device memory, bytes.
    pub memory_total_bytes: u64,
    /// Free device memory, bytes.
    pub memory_free_bytes: u64,
    /// GPU utilisation, percent (time-slice activity, not a load signal on its own).
    pub utilization_gpu_pct: Option<u32>,
    /// Temperature, degrees Celsius.
    pub temperature_c: Option<u32>,
    /// Uncorrectable ECC errors since the driver loaded.
    pub ecc_uncorrected_volatile: Option<u64>,
    /// The device's verdict.
    pub verdict: Verdict,
    /// Why the verdict is not `healthy`.
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// What the agent serves on `GET /v1/gpus`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    /// One report per device.
    pub devices: Vec<GpuReport>,
    /// The worst device verdict.
    pub verdict: Verdict,
    /// Age of the newest reading, milliseconds.
    pub age_ms: u64,
}

impl NodeReport {
    /// The node verdict for a set of device reports: the worst of them.
    pub fn verdict_of(devices: &[GpuReport]) -> Verdict {
        devices.iter().map(|d| d.verdict).max().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(verdict: Verdict) -> GpuReport {
        GpuReport {
            index: 0,
            name: "sim".into(),
            memory_total_bytes: 80 << 30,
            memory_free_bytes: 10 << 30,
            utilization_gpu_pct: Some(50),
            temperature_c: Some(60),
            ecc_uncorrected_volatile: Some(0),
            verdict,
            reasons: vec![],
        }
    }

    #[test]
    fn node_verdict_is_the_worst_device() {
        let devices = [
            device(Verdict::Healthy),
            device(Verdict::Failing),
            device(Verdict::Degraded),
        ];
        assert_eq!(NodeReport::verdict_of(&devices), Verdict::Failing);
        assert_eq!(NodeReport::verdict_of(&[]), Verdict::Healthy);
    }

    #[test]
    fn report_round_trips_as_json() {
        let node = NodeReport {
            devices: vec![device(Verdict::Degraded)],
            verdict: Verdict::Degraded,
            age_ms: 12,
        };
        let json = serde_json::to_string(&node).unwrap();
        assert!(json.contains("\"verdict\":\"degraded\""));
        assert_eq!(serde_json::from_str::<NodeReport>(&json).unwrap(), node);
    }
}
