//! A real DNS server for discovery tests: Debian's `dnsmasq` on a loopback port, serving
//! the A records of a hosts file the test rewrites (`.ci/run` installs it).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `dnsmasq` process; killed on drop.
pub struct Dns {
    child: Child,
    dir: tempfile::TempDir,
    /// The UDP and TCP port it answers on, 127.0.0.1.
    pub port: u16,
}

impl Dns {
    /// Starts dnsmasq answering `records` (`(IP, NAME)`) with a TTL of `ttl_s`.
    pub fn start(records: &[(&str, &str)], ttl_s: u32) -> Dns {
        Self::start_with(records, ttl_s, &[])
    }

    /// [`Dns::start`] with more dnsmasq options (`--srv-host=…`, fixed for its life).
    pub fn start_with(records: &[(&str, &str)], ttl_s: u32, options: &[String]) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        // dnsmasq started as root reads the file as `nobody`.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = free_udp_port();
        let child = spawn(&dir, port, ttl_s, options);
        let mut dns = Dns { child, dir, port };
        assert!(
            dns.wait_answering(Duration::from_secs(10)),
            "dnsmasq did not start: {}",
            std::fs::read_to_string(dns.dir.path().join("dnsmasq.log")).unwrap_or_default()
        );
        dns.set(records);
        dns
    }

    fn hosts(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Replaces the records served and has dnsmasq read them again (SIGHUP).
    pub fn set(&self, records: &[(&str, &str)]) {
        let text: String = records
            .iter()
            .map(|(ip, name)| format!("{ip} {name}\n"))
            .collect();
        let path = self.hosts();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        self.signal("HUP");
    }

    /// Sends `signal` (`HUP`, `STOP`, `CONT`) to dnsmasq.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal}");
    }

    /// Whether dnsmasq answers a query (any answer) within `within`.
    fn wait_answering(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if query_answers(self.port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &tempfile::TempDir, port: u16, ttl_s: u32, options: &[String]) -> Child {
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "").unwrap();
    std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = std::fs::File::create(dir.path().join("dnsmasq.log")).unwrap();
    // Debian installs it in /usr/sbin, which a user's PATH may lack.
    let bin = ["/usr/sbin/dnsmasq", "/usr/local/sbin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("dnsmasq");
    Command::new(bin)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            &format!("--port={port}"),
            &format!("--addn-hosts={}", hosts.display()),
            &format!("--local-ttl={ttl_s}"),
            "--log-facility=-",
            &format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()),
        ])
        .args(options)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("dnsmasq (Debian's dnsmasq-base; .ci/run installs it)")
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends a query for `probe.invalid` A and says whether any response came back.
fn query_answers(port: u16) -> bool {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "invalid"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if s.send_to(&q, ("127.0.0.1", port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    s.recv_from(&mut buf).is_ok()
}
