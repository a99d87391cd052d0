//! The agent binary on a machine without a GPU: it fails cleanly without `--simulate`,
//! and with it serves the report, the metrics and health, and follows state changes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn libcuda_on_this_machine() -> bool {
    gpu_probe::source::nvidia::libcuda_present()
}

#[test]
fn without_a_driver_it_exits_2_with_a_clear_message_and_no_panic() {
    if libcuda_on_this_machine() {
        eprintln!("skipped: this machine has an NVIDIA driver (see scripts/gpu-check.sh)");
        return;
    }
    for args in [&["--once"][..], &["--listen", "127.0.0.1:0"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_gpu-probe"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("no NVIDIA driver: libcuda could not be loaded"),
            "{stderr}"
        );
        assert!(stderr.contains("--simulate"), "{stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-load"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no NVIDIA driver"));
}

#[test]
fn bad_flags_and_threshold_files_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-probe"))
        .args(["--simulate", "--once", "--min-free-memory-pct", "150"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_free_memory_pct"));
    let dir = std::env::temp_dir().join(format!("gpu-probe-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("thresholds.toml");
    std::fs::write(&file, "min_free_memory = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-probe"))
        .args(["--simulate", "--once", "--thresholds"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&file, "min_free_memory_pct = 50\n").unwrap();
    // A healthy simulated device keeps 10 % free: under a 50 % threshold it is degraded.
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-probe"))
        .args(["--simulate", "--once", "--thresholds"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "degraded");
}

struct Agent {
    child: Child,
    url: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn simulated_agent(devices: u32) -> Agent {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_gpu-probe"))
            .args([
                "--simulate",
                "--simulate-devices",
                &devices.to_string(),
                "--interval-ms",
                "100",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(format!("{}/healthz", agent.url)).await {
                if r.status() == 200 {
                    return agent;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("the simulated agent did not start");
}

async fn simulate(agent: &Agent, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/simulate", agent.url))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn the_simulated_agent_serves_reports_metrics_and_follows_changes() {
    let agent = simulated_agent(2).await;
    let report: Value = reqwest::get(format!("{}/v1/gpus", agent.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["source"], "simulated");
    assert_eq!(report["verdict"], "healthy");
    assert_eq!(report["devices"].as_array().unwrap().len(), 2);
    assert!(report["age_ms"].as_u64().unwrap() < 5000);
    for key in [
        "memory_total_bytes",
        "memory_free_bytes",
        "utilization_gpu_pct",
        "temperature_c",
        "power_w",
        "ecc",
        "remapped_rows",
        "throttle_reasons",
        "liveness",
        "reasons",
    ] {
        assert!(!report["devices"][0][key].is_null(), "missing {key}");
    }

    // ECC failure on device 1: failing, with the reason; device 0 unaffected.
    let (status, r) = simulate(&agent, r#"{"device":1,"ecc_uncorrected":1}"#).await;
    assert_eq!(status, 200);
    assert_eq!(r["verdict"], "failing");
    assert_eq!(r["devices"][0]["verdict"], "healthy");
    assert!(r["devices"][1]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("uncorrectable ECC"));

    // Low free memory and hardware throttling: degraded.
    simulate(&agent, r#"{"device":1,"reset":true}"#).await;
    let (_, r) = simulate(
        &agent,
        r#"{"device":0,"memory_free_pct":1.5,"throttle":["hw_slowdown"]}"#,
    )
    .await;
    assert_eq!(r["devices"][0]["verdict"], "degraded");
    assert_eq!(r["devices"][0]["reasons"].as_array().unwrap().len(), 2);

    // A hung device and a critical Xid: failing.
    let (_, r) = simulate(&agent, r#"{"device":1,"hung":true}"#).await;
    assert_eq!(r["devices"][1]["liveness"]["state"], "hung");
    assert_eq!(r["devices"][1]["verdict"], "failing");
    let (_, r) = simulate(&agent, r#"{"device":1,"hung":false,"xid":79}"#).await;
    assert!(r["devices"][1]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("Xid 79"));

    // The same state as Prometheus series, one per device.
    let metrics = reqwest::get(format!("{}/metrics", agent.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "gpu_probe_verdict{gpu=\"0\",name=\"Simulated H200\",verdict=\"degraded\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics
        .contains("gpu_probe_verdict{gpu=\"1\",name=\"Simulated H200\",verdict=\"failing\"} 1"));
    assert!(metrics.contains(
        "gpu_probe_throttle_active{gpu=\"0\",name=\"Simulated H200\",reason=\"hw_slowdown\"} 1"
    ));

    // Bad changes are refused and change nothing.
    let (status, body) = simulate(&agent, r#"{"device":9,"hung":true}"#).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no device 9"));
    assert_eq!(simulate(&agent, r#"{"ecc":1}"#).await.0, 400);
    assert_eq!(simulate(&agent, r#"{"memory_free_pct":120}"#).await.0, 400);
    assert_eq!(
        reqwest::get(format!("{}/nope", agent.url))
            .await
            .unwrap()
            .status(),
        404
    );
}
