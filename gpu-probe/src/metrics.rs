//! The Prometheus text exposition of a [`NodeReport`]: one series per device.

use std::fmt::Write as _;

use crate::{NodeReport, Verdict};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the report. Readings a device does not support are left out, not zeroed.
pub fn render(node: &NodeReport) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP gpu_probe_{name} {help}");
        let _ = writeln!(out, "# TYPE gpu_probe_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "gpu_probe_{name}{{{labels}}} {v}");
        }
    };
    let dev = |d: &crate::GpuReport| format!("gpu=\"{}\",name=\"{}\"", d.index, escape(&d.name));
    let per = |f: &dyn Fn(&crate::GpuReport) -> Option<f64>| -> Vec<(String, f64)> {
        node.devices
            .iter()
            .filter_map(|d| f(d).map(|v| (dev(d), v)))
            .collect()
    };
    family(
        "memory_total_bytes",
        "gauge",
        "Total device memory.",
        per(&|d| Some(d.memory_total_bytes as f64)),
    );
    family(
        "memory_free_bytes",
        "gauge",
        "Free device memory.",
        per(&|d| Some(d.memory_free_bytes as f64)),
    );
    family(
        "utilization_gpu_ratio",
        "gauge",
        "Share of time a kernel ran (0-1).",
        per(&|d| d.utilization_gpu_pct.map(|u| f64::from(u) / 100.0)),
    );
    family(
        "utilization_memory_ratio",
        "gauge",
        "Share of time memory was read or written (0-1).",
        per(&|d| d.utilization_memory_pct.map(|u| f64::from(u) / 100.0)),
    );
    family(
        "temperature_celsius",
        "gauge",
        "GPU temperature.",
        per(&|d| d.temperature_c.map(f64::from)),
    );
    family(
        "temperature_slowdown_celsius",
        "gauge",
        "Temperature at which hardware slowdown starts.",
        per(&|d| d.temperature_slowdown_c.map(f64::from)),
    );
    family("power_watts", "gauge", "Power draw.", per(&|d| d.power_w));
    family(
        "power_limit_watts",
        "gauge",
        "Enforced power limit.",
        per(&|d| d.power_limit_w),
    );
    let mut ecc = Vec::new();
    for d in &node.devices {
        for (kind, counter, v) in [
            ("corrected", "volatile", d.ecc.corrected_volatile),
            ("uncorrected", "volatile", d.ecc.uncorrected_volatile),
            ("corrected", "aggregate", d.ecc.corrected_aggregate),
            ("uncorrected", "aggregate", d.ecc.uncorrected_aggregate),
        ] {
            if let Some(v) = v {
                ecc.push((
                    format!("{},type=\"{kind}\",counter=\"{counter}\"", dev(d)),
                    v as f64,
                ));
            }
        }
    }
    family(
        "ecc_errors",
        "gauge",
        "ECC error counts (volatile: since the driver loaded).",
        ecc,
    );
    family(
        "remapped_rows_pending",
        "gauge",
        "1 when a row remap waits for a reset.",
        per(&|d| d.remapped_rows.pending.map(|p| f64::from(u8::from(p)))),
    );
    family(
        "remapped_rows_failure",
        "gauge",
        "1 when row remapping failed.",
        per(&|d| d.remapped_rows.failure.map(|p| f64::from(u8::from(p)))),
    );
    let mut throttles = Vec::new();
    for d in &node.devices {
        for r in &d.throttle_reasons {
            throttles.push((format!("{},reason=\"{}\"", dev(d), escape(r)), 1.0));
        }
    }
    family(
        "throttle_active",
        "gauge",
        "Active clock throttle reasons.",
        throttles,
    );
    family(
        "xid_events",
        "gauge",
        "Xid events held in the recent window.",
        per(&|d| Some(d.xid_events.len() as f64)),
    );
    family(
        "liveness_round_trip_seconds",
        "gauge",
        "CUDA liveness round-trip time.",
        per(&|d| d.liveness.round_trip_ms.map(|ms| ms / 1e3)),
    );
    let mut verdicts = Vec::new();
    for d in &node.devices {
        for v in [Verdict::Healthy, Verdict::Degraded, Verdict::Failing] {
            verdicts.push((
                format!("{},verdict=\"{}\"", dev(d), v.as_str()),
                f64::from(u8::from(d.verdict == v)),
            ));
        }
    }
    family(
        "verdict",
        "gauge",
        "1 for the device's current verdict.",
        verdicts,
    );
    family(
        "reading_age_seconds",
        "gauge",
        "Age of the reading served.",
        vec![(String::new(), node.age_ms as f64 / 1e3)],
    );
    out.replace("{}", "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GpuReport;

    #[test]
    fn one_series_per_device_and_unsupported_readings_left_out() {
        let node = NodeReport {
            source: "simulated".into(),
            devices: vec![
                GpuReport {
                    index: 0,
                    name: "A \"x\"".into(),
                    memory_total_bytes: 10,
                    temperature_c: Some(40),
                    ..GpuReport::default()
                },
                GpuReport {
                    index: 1,
                    name: "B".into(),
                    memory_total_bytes: 20,
                    verdict: Verdict::Failing,
                    ..GpuReport::default()
                },
            ],
            verdict: Verdict::Failing,
            age_ms: 1500,
            ..NodeReport::default()
        };
        let text = render(&node);
        assert!(
            text.contains("gpu_probe_memory_total_bytes{gpu=\"0\",name=\"A \\\"x\\\"\"} 10"),
            "{text}"
        );
        assert!(text.contains("gpu_probe_memory_total_bytes{gpu=\"1\",name=\"B\"} 20"));
        assert!(text.contains("gpu_probe_temperature_celsius{gpu=\"0\""));
        assert!(!text.contains("gpu_probe_temperature_celsius{gpu=\"1\""));
        assert!(text.contains("gpu_probe_verdict{gpu=\"1\",name=\"B\",verdict=\"failing\"} 1"));
        assert!(text.contains("gpu_probe_reading_age_seconds 1.5"));
        assert!(!text.contains("power_watts"));
    }
}
