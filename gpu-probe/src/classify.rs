//! Reading → verdict. Pure rules, no I/O; thresholds come from flags or a TOML file.
//!
//! The rules follow NVIDIA's own guidance and what fleet operators drain on (see the
//! project's reliability notes):
//! - **failing** (drain): uncorrectable ECC errors since the driver loaded; a failed row
//!   remap (the GPU needs replacing); the CUDA liveness round-trip hung or failed; a recent
//!   critical Xid (48 double-bit ECC, 64 remap failure, 74 NVLink, 79 fallen off the bus,
//!   94/95 contained/uncontained ECC, 119/120 GSP errors).
//! - **degraded** (less weight): a pending row remap (needs a reset), hardware or thermal
//!   clock throttling (`sw_power_cap` alone is normal under load and does not count), the
//!   temperature within a margin of the slowdown threshold, free memory under a share of
//!   the total, many corrected ECC errors, a slow liveness round-trip, Xid 63 (remap
//!   recorded) or 92 (high single-bit ECC rate).
//!
//! Free memory is a weak signal on inference nodes — vLLM preallocates most of it — so the
//! default threshold (5 %) sits below what a healthy engine leaves free and only a leak
//! or an exhausted device crosses it.

use serde::Deserialize;

use crate::{GpuReport, LivenessState, Verdict};

/// Xids that mean the device should be drained.
pub const FAILING_XIDS: [u64; 8] = [48, 64, 74, 79, 94, 95, 119, 120];
/// Xids that mean the device is degraded.
pub const DEGRADED_XIDS: [u64; 2] = [63, 92];

/// Classification thresholds. Every field has a default; a TOML file may set any of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Free memory below this share of the total (percent) is degraded. Default 5.
    pub min_free_memory_pct: f64,
    /// Within this many °C of the slowdown temperature is degraded. Default 5.
    pub temperature_margin_c: u32,
    /// A liveness round-trip slower than this (ms) is degraded. Default 1000.
    pub slow_liveness_ms: f64,
    /// More corrected ECC errors than this since the driver loaded is degraded.
    /// Default 1000.
    pub max_corrected_ecc_volatile: u64,
    /// Xid events older than this (seconds) no longer count. Default 600.
    pub xid_window_s: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_free_memory_pct: 5.0,
            temperature_margin_c: 5,
            slow_liveness_ms: 1000.0,
            max_corrected_ecc_volatile: 1000,
            xid_window_s: 600,
        }
    }
}

impl Thresholds {
    /// Checks that every value makes sense.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=100.0).contains(&self.min_free_memory_pct) {
            return Err(format!(
                "min_free_memory_pct {} must be within 0..=100",
                self.min_free_memory_pct
            ));
        }
        if !(self.slow_liveness_ms.is_finite() && self.slow_liveness_ms > 0.0) {
            return Err(format!(
                "slow_liveness_ms {} must be positive",
                self.slow_liveness_ms
            ));
        }
        Ok(())
    }
}

/// Throttle reasons that mean the GPU runs below its normal clocks for a hardware reason.
const SLOWING_THROTTLES: [&str; 4] = [
    "hw_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "sw_thermal_slowdown",
];

/// Sets `report.verdict` and `report.reasons` from its readings. `now_unix_ms` dates the
/// Xid window.
pub fn classify(report: &mut GpuReport, t: &Thresholds, now_unix_ms: u64) {
    let mut failing = Vec::new();
    let mut degraded = Vec::new();

    if let Some(n) = report.ecc.uncorrected_volatile.filter(|n| *n > 0) {
        failing.push(format!(
            "{n} uncorrectable ECC error(s) since the driver loaded"
        ));
    }
    if report.remapped_rows.failure == Some(true) {
        failing.push("row remapping failed: the GPU needs replacing".to_string());
    }
    match report.liveness.state {
        LivenessState::Hung => failing.push("CUDA liveness round-trip hung".to_string()),
        LivenessState::Failed => failing.push(format!(
            "CUDA liveness round-trip failed: {}",
            report.liveness.error.as_deref().unwrap_or("unknown error")
        )),
        LivenessState::Ok => {
            if let Some(ms) = report
                .liveness
                .round_trip_ms
                .filter(|ms| *ms > t.slow_liveness_ms)
            {
                degraded.push(format!("slow CUDA liveness round-trip ({ms:.0} ms)"));
            }
        }
        LivenessState::Unknown => {}
    }
    let window_start = now_unix_ms.saturating_sub(t.xid_window_s * 1000);
    for e in report
        .xid_events
        .iter()
        .filter(|e| e.at_unix_ms >= window_start)
    {
        if FAILING_XIDS.contains(&e.xid) {
            failing.push(format!("critical Xid {}", e.xid));
        } else if DEGRADED_XIDS.contains(&e.xid) {
            degraded.push(format!("Xid {}", e.xid));
        }
    }

    if report.remapped_rows.pending == Some(true) {
        degraded.push("row remap pending: needs a GPU reset".to_string());
    }
    for r in &report.throttle_reasons {
        if SLOWING_THROTTLES.contains(&r.as_str()) {
            degraded.push(format!("clocks throttled: {r}"));
        }
    }
    if let (Some(temp), Some(limit)) = (report.temperature_c, report.temperature_slowdown_c) {
        if temp + t.temperature_margin_c >= limit {
            degraded.push(format!(
                "temperature {temp} °C within {} °C of slowdown at {limit} °C",
                t.temperature_margin_c
            ));
        }
    }
    if report.memory_total_bytes > 0 {
        let free_pct = report.memory_free_bytes as f64 * 100.0 / report.memory_total_bytes as f64;
        if free_pct < t.min_free_memory_pct {
            degraded.push(format!(
                "free memory {free_pct:.1} % is under {} %",
                t.min_free_memory_pct
            ));
        }
    }
    if let Some(n) = report
        .ecc
        .corrected_volatile
        .filter(|n| *n > t.max_corrected_ecc_volatile)
    {
        degraded.push(format!("{n} corrected ECC errors since the driver loaded"));
    }

    report.verdict = if !failing.is_empty() {
        Verdict::Failing
    } else if !degraded.is_empty() {
        Verdict::Degraded
    } else {
        Verdict::Healthy
    };
    failing.extend(degraded);
    report.reasons = failing;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Liveness, XidEvent};

    const NOW: u64 = 1_800_000_000_000;

    fn healthy() -> GpuReport {
        GpuReport {
            name: "NVIDIA H200".into(),
            memory_total_bytes: 100,
            memory_free_bytes: 10,
            temperature_c: Some(40),
            temperature_slowdown_c: Some(90),
            throttle_reasons: vec!["sw_power_cap".into()],
            liveness: Liveness {
                state: LivenessState::Ok,
                round_trip_ms: Some(2.0),
                error: None,
            },
            ..GpuReport::default()
        }
    }

    fn verdict(mut r: GpuReport) -> (Verdict, Vec<String>) {
        classify(&mut r, &Thresholds::default(), NOW);
        (r.verdict, r.reasons)
    }

    #[test]
    fn a_busy_power_capped_gpu_with_vllm_memory_use_is_healthy() {
        assert_eq!(verdict(healthy()), (Verdict::Healthy, vec![]));
    }

    #[test]
    fn failing_conditions() {
        let mut r = healthy();
        r.ecc.uncorrected_volatile = Some(2);
        assert_eq!(verdict(r).0, Verdict::Failing);
        let mut r = healthy();
        r.remapped_rows.failure = Some(true);
        assert_eq!(verdict(r).0, Verdict::Failing);
        let mut r = healthy();
        r.liveness.state = LivenessState::Hung;
        assert_eq!(
            verdict(r).1,
            vec!["CUDA liveness round-trip hung".to_string()]
        );
        let mut r = healthy();
        r.liveness = Liveness {
            state: LivenessState::Failed,
            round_trip_ms: None,
            error: Some("CUDA_ERROR_ILLEGAL_ADDRESS".into()),
        };
        assert!(verdict(r).1[0].contains("CUDA_ERROR_ILLEGAL_ADDRESS"));
        let mut r = healthy();
        r.xid_events = vec![XidEvent {
            xid: 79,
            at_unix_ms: NOW - 1000,
        }];
        assert_eq!(
            verdict(r),
            (Verdict::Failing, vec!["critical Xid 79".into()])
        );
    }

    #[test]
    fn degraded_conditions() {
        type Change = Box<dyn Fn(&mut GpuReport)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|r| r.remapped_rows.pending = Some(true)),
                "row remap pending",
            ),
            (
                Box::new(|r| r.throttle_reasons.push("hw_slowdown".into())),
                "hw_slowdown",
            ),
            (Box::new(|r| r.temperature_c = Some(86)), "within 5 °C"),
            (Box::new(|r| r.memory_free_bytes = 4), "free memory 4.0 %"),
            (
                Box::new(|r| r.ecc.corrected_volatile = Some(5000)),
                "5000 corrected",
            ),
            (
                Box::new(|r| r.liveness.round_trip_ms = Some(1500.0)),
                "slow CUDA",
            ),
            (
                Box::new(|r| {
                    r.xid_events.push(XidEvent {
                        xid: 63,
                        at_unix_ms: NOW,
                    })
                }),
                "Xid 63",
            ),
        ];
        for (change, needle) in cases {
            let mut r = healthy();
            change(&mut r);
            let (v, reasons) = verdict(r);
            assert_eq!(v, Verdict::Degraded, "{needle}");
            assert!(
                reasons.iter().any(|x| x.contains(needle)),
                "{needle}: {reasons:?}"
            );
        }
    }

    #[test]
    fn failing_wins_and_every_reason_is_kept() {
        let mut r = healthy();
        r.ecc.uncorrected_volatile = Some(1);
        r.memory_free_bytes = 1;
        let (v, reasons) = verdict(r);
        assert_eq!(v, Verdict::Failing);
        assert_eq!(reasons.len(), 2);
    }

    #[test]
    fn old_xids_and_unknown_readings_do_not_count() {
        let mut r = healthy();
        r.xid_events = vec![XidEvent {
            xid: 48,
            at_unix_ms: NOW - 601_000,
        }];
        r.temperature_c = None;
        r.liveness = Liveness::default();
        assert_eq!(verdict(r).0, Verdict::Healthy);
    }

    #[test]
    fn thresholds_from_toml() {
        let t: Thresholds = toml::from_str("min_free_memory_pct = 2.5\n").unwrap();
        assert_eq!(t.min_free_memory_pct, 2.5);
        assert_eq!(t.temperature_margin_c, 5);
        assert!(toml::from_str::<Thresholds>("min_free_mem = 1\n").is_err());
        let bad = Thresholds {
            min_free_memory_pct: 120.0,
            ..Thresholds::default()
        };
        assert!(bad.validate().is_err());
    }
}
