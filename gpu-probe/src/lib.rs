//! `gpu-probe`: the GPU health agent that runs on every GPU node, and the report it
//! publishes.
//!
//! Always built (what the gateway links): the report types ([`GpuReport`], [`NodeReport`],
//! [`Verdict`]) and the pure [`classify`] rules that turn a reading into a verdict.
//!
//! With the `agent` feature: the HTTP server ([`server`]: `/v1/gpus`, `/metrics`,
//! `/healthz`), the Prometheus text ([`metrics`]) and the simulated source. With `nvidia`
//! (default; implies `agent`): the NVIDIA source through cudarc and NVML, both loaded at run
//! time, and the `gpu-probe` and `gpu-load` binaries.
//!
//! # Layout
//! - [`classify`]: thresholds and verdict rules.
//! - [`source`]: where readings come from.
//! - [`server`], [`metrics`]: what the agent serves.

pub mod classify;
#[cfg(feature = "agent")]
pub mod metrics;
#[cfg(feature = "agent")]
pub mod server;
#[cfg(feature = "agent")]
pub mod source;

use serde::{Deserialize, Serialize};

/// A device's (or a node's) fitness to serve.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
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

impl Verdict {
    /// The verdict's name in JSON, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Failing => "failing",
        }
    }
}

/// ECC error counts (`None`: not supported or ECC off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EccCounts {
    /// Corrected (single-bit) errors since the driver loaded.
    pub corrected_volatile: Option<u64>,
    /// Uncorrected (double-bit) errors since the driver loaded.
    pub uncorrected_volatile: Option<u64>,
    /// Corrected errors over the device's life.
    pub corrected_aggregate: Option<u64>,
    /// Uncorrected errors over the device's life.
    pub uncorrected_aggregate: Option<u64>,
}

/// Row remapping state (Ampere and newer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemappedRows {
    /// Rows remapped for correctable errors.
    pub correctable: Option<u64>,
    /// Rows remapped for uncorrectable errors.
    pub uncorrectable: Option<u64>,
    /// A remap waits for a GPU reset to take effect.
    pub pending: Option<bool>,
    /// A remap failed: the GPU needs replacing.
    pub failure: Option<bool>,
}

/// The CUDA liveness round-trip: a small allocation, copy and synchronize on the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LivenessState {
    /// Finished within the deadline.
    Ok,
    /// Did not finish within the deadline (or an earlier one never finished).
    Hung,
    /// A CUDA call failed.
    Failed,
    /// Not measured (no CUDA context).
    #[default]
    Unknown,
}

/// The last liveness round-trip.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Liveness {
    /// Outcome.
    pub state: LivenessState,
    /// Round-trip time, milliseconds (when it finished).
    pub round_trip_ms: Option<f64>,
    /// The CUDA error, when it failed.
    pub error: Option<String>,
}

/// One Xid event the driver reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidEvent {
    /// The Xid number (e.g. 48: double-bit ECC; 79: fallen off the bus).
    pub xid: u64,
    /// When the agent received it, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// What the agent read from one device, with its verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuReport {
    /// Device index (NVML's, which follows PCI bus order).
    pub index: u32,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Device UUID.
    pub uuid: Option<String>,
    /// CUDA compute capability, e.g. "9.0".
    pub compute_capability: Option<String>,
    /// Total device memory, bytes.
    pub memory_total_bytes: u64,
    /// Free device memory, bytes.
    pub memory_free_bytes: u64,
    /// Share of time a kernel ran over the last sample period, percent. Not a load signal
    /// on its own (an engine holding the GPU busy at low throughput still reads 100).
    pub utilization_gpu_pct: Option<u32>,
    /// Share of time device memory was read or written, percent.
    pub utilization_memory_pct: Option<u32>,
    /// GPU temperature, °C.
    pub temperature_c: Option<u32>,
    /// Temperature at which the GPU starts hardware slowdown, °C.
    pub temperature_slowdown_c: Option<u32>,
    /// Power draw, watts.
    pub power_w: Option<f64>,
    /// Enforced power limit, watts.
    pub power_limit_w: Option<f64>,
    /// ECC error counts.
    #[serde(default)]
    pub ecc: EccCounts,
    /// Row remapping.
    #[serde(default)]
    pub remapped_rows: RemappedRows,
    /// Active clock throttle reasons, e.g. `sw_power_cap`, `hw_slowdown`.
    #[serde(default)]
    pub throttle_reasons: Vec<String>,
    /// Xid events received recently (bounded).
    #[serde(default)]
    pub xid_events: Vec<XidEvent>,
    /// The CUDA liveness round-trip.
    #[serde(default)]
    pub liveness: Liveness,
    /// The device's verdict.
    #[serde(default)]
    pub verdict: Verdict,
    /// Why the verdict is not `healthy`.
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// What the agent serves on `GET /v1/gpus`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    /// `nvidia` or `simulated`.
    pub source: String,
    /// NVIDIA driver version.
    pub driver_version: Option<String>,
    /// One report per device.
    pub devices: Vec<GpuReport>,
    /// The worst device verdict.
    pub verdict: Verdict,
    /// Age of the reading, milliseconds, at the time it was served.
    pub age_ms: u64,
    /// How long the reading took, milliseconds.
    pub read_ms: f64,
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
            name: "sim".into(),
            memory_total_bytes: 80 << 30,
            memory_free_bytes: 10 << 30,
            verdict,
            ..GpuReport::default()
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
            source: "simulated".into(),
            devices: vec![device(Verdict::Degraded)],
            verdict: Verdict::Degraded,
            age_ms: 12,
            ..NodeReport::default()
        };
        let json = serde_json::to_string(&node).unwrap();
        assert!(json.contains("\"verdict\":\"degraded\""));
        assert_eq!(serde_json::from_str::<NodeReport>(&json).unwrap(), node);
    }
}
