//! A simulated node whose device state is set over HTTP (`POST /v1/simulate`), for the demo
//! and the tests. Same report shape as the NVIDIA source.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::{GpuSource, ProbeError, Reading};
use crate::{GpuReport, Liveness, LivenessState, XidEvent};

/// A change to one simulated device; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedChange {
    /// Device index (default 0).
    #[serde(default)]
    pub device: u32,
    /// Back to a healthy, idle device first.
    #[serde(default)]
    pub reset: bool,
    /// Free memory, bytes.
    pub memory_free_bytes: Option<u64>,
    /// Free memory as a share of the total, percent (alternative to bytes).
    pub memory_free_pct: Option<f64>,
    /// GPU utilisation, percent.
    pub utilization_gpu_pct: Option<u32>,
    /// Temperature, °C.
    pub temperature_c: Option<u32>,
    /// Uncorrectable ECC errors since the driver loaded.
    pub ecc_uncorrected: Option<u64>,
    /// Corrected ECC errors since the driver loaded.
    pub ecc_corrected: Option<u64>,
    /// A row remap is pending.
    pub remap_pending: Option<bool>,
    /// Row remapping failed.
    pub remap_failure: Option<bool>,
    /// Active throttle reasons (replaces the list).
    pub throttle: Option<Vec<String>>,
    /// The CUDA liveness round-trip hangs.
    pub hung: Option<bool>,
    /// Deliver an Xid event now.
    pub xid: Option<u64>,
}

/// Shared handle on the simulated devices: the HTTP server writes, the reader reads.
#[derive(Clone)]
pub struct SimulatedNode {
    devices: Arc<Mutex<Vec<GpuReport>>>,
}

const TOTAL_BYTES: u64 = 141 << 30; // an H200's 141 GiB

fn idle_device(index: u32) -> GpuReport {
    GpuReport {
        index,
        name: "Simulated H200".into(),
        uuid: Some(format!("GPU-sim-{index:04}")),
        compute_capability: Some("9.0".into()),
        memory_total_bytes: TOTAL_BYTES,
        // vLLM preallocates 90 %: a healthy serving GPU shows about 10 % free.
        memory_free_bytes: TOTAL_BYTES / 10,
        utilization_gpu_pct: Some(35),
        utilization_memory_pct: Some(20),
        temperature_c: Some(45),
        temperature_slowdown_c: Some(90),
        power_w: Some(300.0),
        power_limit_w: Some(700.0),
        liveness: Liveness {
            state: LivenessState::Ok,
            round_trip_ms: Some(1.0),
            error: None,
        },
        ..GpuReport::default()
    }
}

impl SimulatedNode {
    /// `devices` healthy simulated devices.
    pub fn new(devices: u32) -> Self {
        Self {
            devices: Arc::new(Mutex::new((0..devices).map(idle_device).collect())),
        }
    }

    /// Applies a change; the error names what is wrong.
    pub fn apply(&self, change: SimulatedChange) -> Result<(), String> {
        let mut devices = self
            .devices
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        let count = devices.len();
        let d = devices
            .get_mut(change.device as usize)
            .ok_or_else(|| format!("no device {} (this node has {count})", change.device))?;
        if change.reset {
            *d = idle_device(change.device);
        }
        if let Some(pct) = change.memory_free_pct {
            if !(0.0..=100.0).contains(&pct) {
                return Err(format!("memory_free_pct {pct} must be within 0..=100"));
            }
            d.memory_free_bytes = (d.memory_total_bytes as f64 * pct / 100.0) as u64;
        }
        if let Some(b) = change.memory_free_bytes {
            if b > d.memory_total_bytes {
                return Err(format!(
                    "memory_free_bytes {b} exceeds the total {}",
                    d.memory_total_bytes
                ));
            }
            d.memory_free_bytes = b;
        }
        if let Some(u) = change.utilization_gpu_pct {
            if u > 100 {
                return Err(format!("utilization_gpu_pct {u} exceeds 100"));
            }
            d.utilization_gpu_pct = Some(u);
        }
        if let Some(t) = change.temperature_c {
            d.temperature_c = Some(t);
        }
        if let Some(n) = change.ecc_uncorrected {
            d.ecc.uncorrected_volatile = Some(n);
        }
        if let Some(n) = change.ecc_corrected {
            d.ecc.corrected_volatile = Some(n);
        }
        if let Some(p) = change.remap_pending {
            d.remapped_rows.pending = Some(p);
        }
        if let Some(f) = change.remap_failure {
            d.remapped_rows.failure = Some(f);
        }
        if let Some(t) = change.throttle {
            d.throttle_reasons = t;
        }
        if let Some(h) = change.hung {
            d.liveness = if h {
                Liveness {
                    state: LivenessState::Hung,
                    round_trip_ms: None,
                    error: None,
                }
            } else {
                idle_device(change.device).liveness
            };
        }
        if let Some(xid) = change.xid {
            let at_unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            d.xid_events.push(XidEvent { xid, at_unix_ms });
            let excess = d.xid_events.len().saturating_sub(16);
            d.xid_events.drain(..excess);
        }
        Ok(())
    }
}

impl GpuSource for SimulatedNode {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn read(&mut self) -> Result<Reading, ProbeError> {
        let devices = match self.devices.lock() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Ok(Reading {
            driver_version: Some("simulated".into()),
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_apply_and_bad_ones_are_refused() {
        let node = SimulatedNode::new(2);
        let change: SimulatedChange =
            serde_json::from_str(r#"{"device":1,"ecc_uncorrected":3,"memory_free_pct":2}"#)
                .unwrap();
        node.apply(change).unwrap();
        let r = node.clone().read().unwrap();
        assert_eq!(r.devices[1].ecc.uncorrected_volatile, Some(3));
        assert_eq!(r.devices[1].memory_free_bytes, TOTAL_BYTES / 50);
        assert_eq!(r.devices[0].ecc.uncorrected_volatile, None);
        assert!(node
            .apply(SimulatedChange {
                device: 5,
                ..Default::default()
            })
            .is_err());
        assert!(serde_json::from_str::<SimulatedChange>(r#"{"ecc":1}"#).is_err());
        node.apply(SimulatedChange {
            device: 1,
            reset: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(node.clone().read().unwrap().devices[1], idle_device(1));
    }
}
