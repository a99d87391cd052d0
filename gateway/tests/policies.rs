//! `breakwater validate` on every policy directory in the repository, and on broken ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn validate(dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("validate")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_policy_directory_in_the_repository_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let (ok, stdout, stderr) = validate(&dir);
        assert!(ok, "{}: {stderr}", dir.display());
        assert!(stdout.starts_with("policy OK: "), "{stdout}");
        assert_eq!(stdout.lines().count(), 1);
        checked += 1;
    }
    assert!(checked >= 2, "expected policies/demo and policies/examples");
}

#[test]
fn an_invalid_set_prints_one_line_per_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[gateway]\nhome_region = \"east\"\n[[regions]]\nid = \"east\"\n[[pools]]\nid = \"p\"\nregion = \"east\"\nmodels = [\"m\"]\n[[shards]]\nid = \"s1\"\npool = \"p\"\nurl = \"http://10.0.0.1:8000\"\ncapacity_tps = -1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "[[shards]]\nid = \"s2\"\npool = \"missing\"\nurl = \"http://10.0.0.2:8000\"\ncapacity_tps = 10\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "[[regions]]\nid = \"west\"\ncolour = \"blue\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let (ok, _, stderr) = validate(dir.path());
    assert!(!ok);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("c.toml: line 3, column 1: unknown field `colour`")),
        "{stderr}"
    );
    // Parse errors stop before cross-file checks; fix c.toml and the others show.
    std::fs::remove_file(dir.path().join("c.toml")).unwrap();
    let (ok, _, stderr) = validate(dir.path());
    assert!(!ok);
    assert!(
        stderr.contains("a.toml: shards[0].capacity_tps: -1 must be a positive number"),
        "{stderr}"
    );
    assert!(
        stderr.contains("b.toml: shards[0].pool: shard \"s2\" names pool \"missing\""),
        "{stderr}"
    );
    assert!(
        stderr
            .trim_end()
            .ends_with("2 problem(s); the policy set is not valid"),
        "{stderr}"
    );

    let (ok, _, stderr) = validate(Path::new("/nonexistent/policy/dir"));
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/policy/dir"), "{stderr}");
}

#[test]
fn serving_on_a_port_that_is_taken_fails_clearly() {
    // The workers share their port through SO_REUSEPORT; a port another server holds must
    // still be an error, not a silent split of its connections.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["serve", "--policy"])
        .arg(&policy)
        .args([
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn run(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of `policies/examples` in a temporary directory.
fn examples_copy() -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn policy_diff_on_the_examples_names_what_a_change_does_and_fails_on_an_invalid_set() {
    let old = examples_copy();
    let new = examples_copy();
    let us_east = new.path().join("10-us-east.toml");
    let text = std::fs::read_to_string(&us_east).unwrap();
    // Halve one shard's weight (an upgrade), add one, tighten a tenant.
    let text = text.replacen("weight = 0.5", "weight = 0.25", 1)
        + "\n[[shards]]\nid = \"use1-llama70b-d\"\npool = \"llama70b-us-east\"\nurl = \"http://10.10.1.13:8000\"\ncapacity_tps = 2400\n";
    std::fs::write(&us_east, text).unwrap();
    let tenants = new.path().join("30-tenants.toml");
    let t = std::fs::read_to_string(&tenants)
        .unwrap()
        .replacen("rpm = 3000", "rpm = 1500", 1);
    std::fs::write(&tenants, t).unwrap();
    let (code, out, err) = run(&[
        "policy".as_ref(),
        "diff".as_ref(),
        old.path().as_os_str(),
        new.path().as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("+ use1-llama70b-d (region us-east, pool llama70b-us-east)"),
        "{out}"
    );
    assert!(
        out.contains("~ use1-llama70b-c: weight 0.5 → 0.25"),
        "{out}"
    );
    assert!(out.contains("customer-acme: rpm 3000 → 1500"), "{out}");
    // 70B in us-east: 2400 + 2400 + 1200 → 2400 + 2400 + 600 + 2400.
    assert!(out.contains("6000 →     7800  (+30 %)"), "{out}");
    // The same set: nothing to say.
    let (code, out, _) = run(&[
        "policy".as_ref(),
        "diff".as_ref(),
        old.path().as_os_str(),
        old.path().as_os_str(),
    ]);
    assert_eq!(code, 0);
    assert!(out.ends_with("no change\n"), "{out}");
    // An invalid new set: its problems, and a failure for the CI job.
    std::fs::write(
        new.path().join("40-typo.toml"),
        "[limits]\nmax_body_byts = 1\n",
    )
    .unwrap();
    let (code, _, err) = run(&[
        "policy".as_ref(),
        "diff".as_ref(),
        old.path().as_os_str(),
        new.path().as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("40-typo.toml") && err.contains("max_body_byts"),
        "{err}"
    );
}
