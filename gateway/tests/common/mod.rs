//! Shared helpers for the end-to-end tests: simulated shards on loopback, a policy
//! written for them, and the compiled `breakwater` binary started against it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod dns;
pub mod redis;

use llm_sim::{Fault, FaultMode, SimConfig, SimHandle, SimStats};
use serde_json::Value;

pub const MODEL: &str = "test-model";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A simulated shard and where it sits in the policy.
pub struct Shard {
    pub id: String,
    pub region: String,
    pub capacity_tps: f64,
    pub sim: SimHandle,
}

impl Shard {
    pub fn stats(&self) -> SimStats {
        self.sim.engine().stats()
    }
    pub fn fault(&self, mode: FaultMode) {
        self.sim.engine().set_fault(Fault::new(mode));
    }
    pub fn set_fault(&self, fault: Fault) {
        self.sim.engine().set_fault(fault);
    }
}

/// Describes one shard to start.
pub struct ShardSpec {
    pub id: &'static str,
    pub region: &'static str,
    pub capacity_tps: f64,
    pub ttft_ms: u64,
    pub itl_ms: u64,
    pub slots: usize,
    pub behaviour: llm_sim::Behaviour,
    pub kv_capacity_tokens: u64,
}

impl ShardSpec {
    pub fn new(id: &'static str, region: &'static str) -> Self {
        Self {
            id,
            region,
            capacity_tps: 1000.0,
            ttft_ms: 5,
            itl_ms: 1,
            slots: 64,
            behaviour: llm_sim::Behaviour::Continuous,
            kv_capacity_tokens: 1 << 20,
        }
    }
    pub fn capacity(mut self, tps: f64) -> Self {
        self.capacity_tps = tps;
        self
    }
    pub fn itl_ms(mut self, ms: u64) -> Self {
        self.itl_ms = ms;
        self
    }
}

pub async fn start_shard(spec: ShardSpec) -> Shard {
    let serve = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = SimConfig {
        model: MODEL.into(),
        capacity_tps: spec.capacity_tps,
        slots: spec.slots,
        ttft: Duration::from_millis(spec.ttft_ms),
        itl: Duration::from_millis(spec.itl_ms),
        kv_capacity_tokens: spec.kv_capacity_tokens,
        behaviour: spec.behaviour,
    };
    Shard {
        id: spec.id.into(),
        region: spec.region.into(),
        capacity_tps: spec.capacity_tps,
        sim: SimHandle::spawn(config, serve, control).unwrap(),
    }
}

/// Writes a policy for `shards`: home region is the first shard's region; regions in
/// order of first appearance; one pool per region serving [`MODEL`]. `extra` is appended.
pub fn policy_text(shards: &[&Shard], extra: &str) -> String {
    let mut regions: Vec<&str> = Vec::new();
    for s in shards {
        if !regions.contains(&s.region.as_str()) {
            regions.push(&s.region);
        }
    }
    let mut t = String::new();
    writeln!(t, "[gateway]\nhome_region = \"{}\"\n", regions[0]).unwrap();
    for r in &regions {
        writeln!(t, "[[regions]]\nid = \"{r}\"\n").unwrap();
        writeln!(t, "[[pools]]\nid = \"pool-{r}\"\nregion = \"{r}\"\nengine = \"vllm\"\nmodels = [\"{MODEL}\"]\n").unwrap();
    }
    for s in shards {
        writeln!(
            t,
            "[[shards]]\nid = \"{}\"\npool = \"pool-{}\"\nurl = \"{}\"\ncapacity_tps = {}\n",
            s.id,
            s.region,
            s.sim.url(),
            s.capacity_tps
        )
        .unwrap();
    }
    t.push_str(extra);
    t
}

/// A policy with one shard, `id`, at `addr` (`host:port`) — an engine a test runs itself —
/// in a generic pool of region "home". `extra` is appended.
pub fn one_shard_policy(id: &str, addr: &str, extra: &str) -> String {
    format!(
        "[gateway]\nhome_region = \"home\"\n\n[[regions]]\nid = \"home\"\n\n\
         [[pools]]\nid = \"p\"\nregion = \"home\"\nengine = \"generic\"\nmodels = [\"{MODEL}\"]\n\n\
         [[shards]]\nid = \"{id}\"\npool = \"p\"\nurl = \"http://{addr}\"\ncapacity_tps = 1000\n\n{extra}"
    )
}

/// A `breakwater serve` process; killed on drop.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The policy directory.
    dir: PathBuf,
    /// Holds the directory (and the log) for the gateway's life; a successor started by
    /// [`Gateway::successor`] borrows its predecessor's.
    _dir: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl Gateway {
    /// Writes `policy` to a temporary directory and starts the gateway on free ports.
    pub async fn start(policy: &str) -> Gateway {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("policy");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        Self::start_in(root, dir).await
    }

    /// Starts the gateway on the policy directory `dir` (under `root`, which holds the
    /// log and lives as long as the gateway).
    pub async fn start_in(root: tempfile::TempDir, dir: PathBuf) -> Gateway {
        Self::start_with(root, dir, &[]).await
    }

    /// [`Gateway::start_in`] with more `serve` arguments.
    pub async fn start_with(root: tempfile::TempDir, dir: PathBuf, args: &[&str]) -> Gateway {
        let log = root.path().join("gateway.log");
        // Port 0: the gateway chooses its ports and writes them to the address file.
        let addr_file = root.path().join("addrs.json");
        let addr_arg = addr_file.display().to_string();
        let mut all = vec!["--addr-file", addr_arg.as_str()];
        all.extend_from_slice(args);
        let mut child = serve(&dir, "127.0.0.1:0", "127.0.0.1:0", &log, &all);
        let Some((addr, admin)) = wait_listening(&mut child, &addr_file).await else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the gateway did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Gateway {
            child,
            addr,
            admin,
            dir,
            _dir: Some(root),
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A new gateway process on the same ports and policy, started with `args` (for
    /// example `--upgrade`); not waited for.
    pub fn successor(&self, args: &[&str]) -> Gateway {
        let log = self.log.with_extension("next.log");
        let (addr, admin) = (self.addr.to_string(), self.admin.to_string());
        let child = serve(&self.dir, &addr, &admin, &log, args);
        Gateway {
            child,
            addr: self.addr,
            admin: self.admin,
            dir: self.dir.clone(),
            _dir: None,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The policy directory the gateway reads (and reloads).
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Replaces the policy file atomically (written aside, then renamed over it).
    pub fn write_policy(&self, policy: &str) {
        let tmp = self.dir.with_extension("tmp");
        std::fs::write(&tmp, policy).unwrap();
        std::fs::rename(&tmp, self.dir.join("policy.toml")).unwrap();
    }

    /// `POST` an admin route with the token: the status and the JSON answer.
    pub async fn admin_post(&self, path: &str) -> (u16, Value) {
        let r = client()
            .post(format!("http://{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /admin/reload`.
    pub async fn reload(&self) -> (u16, Value) {
        self.admin_post("/admin/reload").await
    }

    /// Sends the process a signal (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits (bounded) for the process to exit; its exit status, if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An admin API route, with the admin token, as JSON.
    pub async fn admin_json(&self, path: &str) -> Value {
        client()
            .get(format!("http://{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /admin/status` as JSON.
    pub async fn status(&self) -> Value {
        self.admin_json("/admin/status").await
    }

    /// One shard's entry in `GET /admin/status`.
    pub async fn shard(&self, id: &str) -> Value {
        let status = self.status().await;
        status["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no shard {id} in {status}"))
            .clone()
    }

    /// `GET /admin/events` as JSON.
    pub async fn events(&self) -> Value {
        self.admin_json("/admin/events").await
    }

    /// One small non-streamed chat completion that must succeed; its response headers
    /// (`x-breakwater-shard`, `x-breakwater-region`, ...).
    pub async fn chat_ok(&self) -> reqwest::header::HeaderMap {
        let r = client()
            .post(self.url("/v1/chat/completions"))
            .json(&chat(2, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let headers = r.headers().clone();
        r.bytes().await.unwrap();
        headers
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sum of in-flight tokens over every shard, from the admin API.
    pub async fn inflight_tokens(&self) -> u64 {
        self.status().await["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["inflight_tokens"].as_u64().unwrap())
            .sum()
    }

    /// Waits (bounded) until the ledger is back to zero; returns the last total seen.
    pub async fn wait_ledger_zero(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = self.inflight_tokens().await;
            if t == 0 || Instant::now() > deadline {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts `breakwater serve` on `dir` with the test admin token, two workers and `args`,
/// logging to `log`.
fn serve(
    dir: &std::path::Path,
    listen: &str,
    admin: &str,
    log: &std::path::Path,
    args: &[&str],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("serve")
        .arg("--policy")
        .arg(dir)
        .arg("--listen")
        .arg(listen)
        .arg("--admin-listen")
        .arg(admin)
        .arg("--threads")
        .arg("2")
        .args(args)
        .env("BREAKWATER_ADMIN_TOKEN", ADMIN_TOKEN)
        // Warnings only (and the cluster's transitions, one line each), unless a test chose
        // the log format: then it reads the access log too.
        .env(
            "RUST_LOG",
            if args.contains(&"--log-format") {
                "warn,breakwater::cluster=info,access=info"
            } else {
                "warn,breakwater::cluster=info"
            },
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for the gateway's address file; its two addresses.
async fn wait_listening(
    child: &mut Child,
    file: &std::path::Path,
) -> Option<(SocketAddr, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if let Ok(text) = std::fs::read_to_string(file) {
            let v: Value = serde_json::from_str(&text).ok()?;
            let addr = v["listen"].as_str()?.parse().ok()?;
            let admin = v["admin_listen"].as_str()?.parse().ok()?;
            return Some((addr, admin));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST`s `body` as JSON to the gateway's `path`.
pub async fn post(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    client().post(gw.url(path)).json(body).send().await.unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A chat body with `max_tokens`.
pub fn chat(max_tokens: u64, stream: bool) -> Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about breakwaters."}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// One client request's outcome under [`load`].
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was sent, from the start of the load.
    pub sent_at: Duration,
    /// How long the client waited for the whole answer.
    pub took: Duration,
    /// Status (0: no HTTP answer at all).
    pub status: u16,
    /// `x-breakwater-shard` of the answer.
    pub shard: String,
}

/// `workers` clients sending non-streamed `max_tokens` requests back to back for `length`
/// (at most 2,000 each), while `during` (a fault script, a sampler) runs alongside.
pub async fn load<F: std::future::Future>(
    gw: &Gateway,
    workers: usize,
    length: Duration,
    max_tokens: u64,
    during: F,
) -> (Vec<Record>, F::Output) {
    let start = Instant::now();
    let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (url, records) = (
            gw.url("/v1/chat/completions"),
            std::sync::Arc::clone(&records),
        );
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..2000 {
                if start.elapsed() >= length {
                    break;
                }
                let sent = Instant::now();
                let (status, shard) = match c.post(&url).json(&chat(max_tokens, false)).send().await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let shard = r
                            .headers()
                            .get("x-breakwater-shard")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let _ = r.bytes().await;
                        (status, shard)
                    }
                    Err(_) => (0, String::new()),
                };
                records.lock().unwrap().push(Record {
                    sent_at: sent - start,
                    took: sent.elapsed(),
                    status,
                    shard,
                });
            }
        }));
    }
    let out = during.await;
    for t in tasks {
        t.await.unwrap();
    }
    let records = records.lock().unwrap().clone();
    (records, out)
}

/// Runs `promtool check metrics` (Debian's prometheus package; `.ci/run` installs it) on a
/// `/metrics` text: `Err` with what it said when it finds a problem.
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is needed; .ci/run installs it");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// `breakwater demo` on free ports with a generated admin token, ready to serve; killed
/// on drop (the simulated shards' fixed ports are then free for the next test binary).
pub struct Demo {
    /// The OpenAI API's address.
    pub listen: std::net::SocketAddr,
    /// The admin listener's address.
    pub admin: std::net::SocketAddr,
    /// The admin token it printed.
    pub token: String,
    /// What it printed before serving.
    pub printed: Vec<String>,
    child: Child,
}

impl Demo {
    /// Starts the demo and waits until `/readyz` answers 200.
    pub async fn start() -> Demo {
        use std::io::{BufRead, BufReader};
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (listen, admin) = (free(), free());
        let mut child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args([
                "demo",
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .env_remove("BREAKWATER_ADMIN_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut printed = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.starts_with("Ctrl-C");
            printed.push(line);
            if done {
                break;
            }
        }
        let token = printed
            .iter()
            .find_map(|l| l.strip_prefix("Admin token: "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        let demo = Demo {
            listen,
            admin,
            token,
            printed,
            child,
        };
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(20);
        while c
            .get(format!("http://{listen}/readyz"))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "demo not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        demo
    }

    /// The demo's process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
