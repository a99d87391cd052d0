//! `deploy/`: the offline checks of the Kubernetes, compose and systemd set-ups
//! (`deploy/check.py`), the compose stack's policy, and the image's health check run as the
//! Dockerfile writes it, against a live gateway.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{policy_text, start_shard, Gateway, ShardSpec};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_deploy_checks_pass() {
    let out = Command::new("python3")
        .arg(repo().join("deploy/check.py"))
        .output()
        .expect("python3 runs deploy/check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy/check.py:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("deploy/ OK"), "{stdout}");
}

#[test]
fn the_compose_stacks_policy_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("validate")
        .arg(repo().join("deploy/docker/policies"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4 shard(s)"), "{stdout}");
}

/// The gateway image's `HEALTHCHECK ... CMD [...]`, its binary replaced by this build's.
fn image_health_check() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).unwrap();
    let start = dockerfile
        .find("HEALTHCHECK")
        .expect("the Dockerfile has a HEALTHCHECK");
    let rest = &dockerfile[start..];
    let cmd = &rest[rest.find("CMD").unwrap() + 3..];
    let json = &cmd[..cmd.find(']').unwrap() + 1];
    let mut argv: Vec<String> = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(argv[0], "/usr/local/bin/breakwater");
    argv[0] = env!("CARGO_BIN_EXE_breakwater").to_string();
    argv
}

fn run(argv: &[String]) -> (bool, String) {
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_images_health_check_passes_on_a_live_gateway_and_fails_otherwise() {
    let shard = start_shard(ShardSpec::new("a", "local")).await;
    let gw = Gateway::start(&policy_text(&[&shard], "")).await;
    let mut argv = image_health_check();
    let url = argv.last().unwrap().clone();
    assert_eq!(
        url, "http://127.0.0.1:8080/healthz",
        "the image checks its own listener"
    );
    let n = argv.len() - 1;

    argv[n] = gw.url("/healthz");
    let (ok, stderr) = run(&argv);
    assert!(ok, "{stderr}");

    // A 404 is not healthy, nor is a port nobody listens on, nor an https URL.
    argv[n] = gw.url("/no-such-path");
    let (ok, stderr) = run(&argv);
    assert!(!ok);
    assert!(stderr.contains("status 404"), "{stderr}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    argv[n] = format!("http://127.0.0.1:{port}/healthz");
    let (ok, stderr) = run(&argv);
    assert!(!ok);
    assert!(stderr.starts_with("unhealthy: "), "{stderr}");
    argv[n] = "https://127.0.0.1/healthz".into();
    let (ok, stderr) = run(&argv);
    assert!(!ok);
    assert!(stderr.contains("not an http:// URL"), "{stderr}");
}
