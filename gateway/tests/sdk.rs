//! The official OpenAI Python SDK against `breakwater demo`: `tests/sdk/openai_sdk.py` makes
//! every call a user would (chat, completions, embeddings, responses plain and streamed,
//! models, the error types) through the gateway.
//!
//! It needs a Python with the `openai` package: `BREAKWATER_SDK_PYTHON`, or the virtual
//! environment `.ci/run` makes at `target/ci-sdk`. Without either the test says so and
//! passes (a developer's machine); CI always has it, and there a failing call fails it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Demo;

fn sdk_python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        std::env::var_os("BREAKWATER_SDK_PYTHON").map(PathBuf::from),
        Some(root.join("target/ci-sdk/bin/python")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_against_the_demo() {
    let Some(python) = sdk_python() else {
        if std::env::var_os("BREAKWATER_SDK_PYTHON").is_some() {
            panic!("BREAKWATER_SDK_PYTHON is set but cannot import openai");
        }
        eprintln!("skipped: no Python with the openai package (run .ci/run, or set BREAKWATER_SDK_PYTHON)");
        return;
    };
    let demo = Demo::start().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk/openai_sdk.py");
    let base = format!("http://{}", demo.listen);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([base.as_str(), "demo-llama", "sk-demo-critical"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
    eprintln!("{stdout}");
}
