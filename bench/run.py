#!/usr/bin/env python3
"""Breakwater benchmark: the gateway versus going straight to the simulator and versus
nginx, in the same run, on loopback.

Usage:  python3 bench/run.py [--quick] [--rounds N] [--no-pin] [--baseline BIN] [--tls]
        python3 bench/run.py --table     (the table again, from bench/out/results.json)

--baseline BIN adds another breakwater binary (an earlier build, e.g. one built in a git
worktree of the commit before a change) as the target "baseline", taking its turns in the
same rounds as this build, and prints both builds' ratios against nginx and this build's
against the baseline per round: the guard for a change on the request path, without the
run-to-run drift of comparing two separate runs.

--tls adds the targets "breakwater-tls" and "nginx-tls": the same runs over HTTPS, both
servers presenting the same certificate (ECDSA P-256, made with openssl for the run) and the
load generator offering TLS 1.3 with TLS_AES_128_GCM_SHA256 only, so both encrypt the same
way; connections are kept (nginx's keepalive_requests raised to match the gateway's
unlimited reuse), so the figures are the cost of the records, not of handshakes.

It builds the proxies with the `production` profile (the simulator and load generator with
`release`), installs nginx if missing (Debian/Ubuntu), starts two
llm-sim engines (an instant one for request overhead, a streaming one at 10 ms per token),
then runs the same load against each target:

  rate    fixed 1000 req/s for 10 s        -> added p50/p99 latency, proxy CPU per 10k requests
  max     32 connections for 10 s          -> maximum requests/s, proxy CPU per 10k requests
  stream  100 concurrent streams, 50 tokens -> time to first event, gaps between events
          (and again with 10 concurrent streams, to separate hop latency from CPU contention)
  pingora-stock: Pingora's stock proxy with nothing added (gateway/examples/stock_proxy.rs),
          for what Pingora itself costs per request (no stream runs)

Every target goes through every measurement once per round, targets taking turns, for
--rounds rounds (default 3; 1 with --quick); each figure reported is the median over the
rounds, and the ratios against nginx are given per round too. On a small shared machine a
single 10 s run moves by 10-20 % from one run to the next; turns and medians keep a slow
minute from landing on one target only.

The proxy under test gets CPUs of its own: the upper half of the CPUs this process may use
(one of two), with one worker per CPU (breakwater --threads, nginx worker_processes, the
stock proxy's threads); the simulators and the load generator are pinned to the other half.
Otherwise the load generator and the simulator compete with the proxy for the same cores,
and the latency figures measure that contention more than the proxy. --no-pin (or a single
CPU) runs everything unpinned with two workers per proxy, as earlier results were taken.

Before each target's stream runs, 100 streams run for 2 s unmeasured (as the request
warm-up does for the others), so the figures are steady-state: the first burst of 100
streams opening 100 new upstream connections at once is not in them.

CPU seconds come from /proc/PID/stat (utime + stime) of the proxy's processes (all nginx
workers included), for the request runs and for the 100-stream run; RSS from
/proc/PID/status after the runs. Results go to bench/out/results.json and a Markdown table
on stdout. Every run is bounded in time.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import cpu_ticks, pinned, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
# The proxies under test are built as shipped: the `production` profile (fat LTO, one
# codegen unit). The simulator and the load generator use the plain release build.
PROD = os.path.join(ROOT, "target", "production")
OUT = os.path.join(ROOT, "bench", "out")
QUICK = "--quick" in sys.argv
DUR = 3 if QUICK else 10
PIN = "--no-pin" not in sys.argv
ROUNDS = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else (1 if QUICK else 3)
TICK = os.sysconf("SC_CLK_TCK")

FAST = ("127.0.0.1", 18600)
STREAM = ("127.0.0.1", 18610)
GATEWAY = ("127.0.0.1", 18630)
BASE_GATEWAY = ("127.0.0.1", 18650)
BASELINE = os.path.abspath(sys.argv[sys.argv.index("--baseline") + 1]) if "--baseline" in sys.argv else None
NGINX_FAST = ("127.0.0.1", 18620)
NGINX_STREAM = ("127.0.0.1", 18621)
STOCK = ("127.0.0.1", 18640)
TLS = "--tls" in sys.argv
TLS_GATEWAY = ("127.0.0.1", 18660)
NGINX_TLS_FAST = ("127.0.0.1", 18622)
NGINX_TLS_STREAM = ("127.0.0.1", 18623)

procs = []


def split_cpus():
    """(proxy CPUs, load CPUs), or (None, None) when not pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not PIN or len(cpus) < 2:
        return None, None
    k = max(1, len(cpus) // 2)
    return cpus[-k:], cpus[:-k]


PROXY_CPUS, LOAD_CPUS = split_cpus()
WORKERS = len(PROXY_CPUS) if PROXY_CPUS else 2


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def start(cmd, cpus=None, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=pinned(cpus), **kw)
    procs.append(p)
    return p


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def nginx_pids(master):
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [master] + [int(x) for x in out.split()]


def loadgen(url, mode, model, **kw):
    cmd = [os.path.join(REL, "loadgen"), "--url", url, "--mode", mode, "--model", model,
           "--duration-s", str(kw.pop("duration", DUR))]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120,
                         preexec_fn=pinned(LOAD_CPUS)).stdout
    return json.loads(out)


def run_target(name, fast_url, stream_url, pids, ca=None):
    res = {"target": name, "stream": None, "stream10": None}
    tls = dict(ca_file=ca) if ca else {}
    # Warm-up: connections, pools, page cache.
    loadgen(fast_url, "max", "bench-model", concurrency=8, requests=2000, duration=2, **tls)
    for mode, kw in (("rate", dict(rate=1000)), ("max", dict(concurrency=32))):
        before = cpu_ticks(pids) if pids else 0
        r = loadgen(fast_url, mode, "bench-model", **kw, **tls)
        used = (cpu_ticks(pids) - before) / TICK if pids else None
        r["cpu_s_per_10k"] = used / r["ok"] * 10_000 if pids and r["ok"] else None
        res[mode] = r
    if stream_url:
        loadgen(stream_url, "stream", "bench-stream", concurrency=100, max_tokens=50,
                requests=100_000, duration=2, **tls)
        before = cpu_ticks(pids) if pids else 0
        res["stream"] = loadgen(stream_url, "stream", "bench-stream", concurrency=100,
                                max_tokens=50, requests=100_000, duration=DUR, **tls)
        used = (cpu_ticks(pids) - before) / TICK if pids else None
        ok = res["stream"]["ok"]
        res["stream"]["cpu_s_per_1k"] = used / ok * 1000 if pids and ok else None
        # A light load isolates the per-hop latency from CPU contention on small machines.
        res["stream10"] = loadgen(stream_url, "stream", "bench-stream", concurrency=10,
                                  max_tokens=50, requests=100_000, duration=DUR, **tls)
    res["rss_mib"] = rss_kib(pids) / 1024 if pids else None
    return res


def main():
    os.makedirs(OUT, exist_ok=True)
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        root = [] if os.geteuid() == 0 else ["sudo"]
        sh(root + ["apt-get", "update", "-qq"])
        sh(root + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq", "nginx"])
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    sh(["cargo", "build", "--release", "-q", "-p", "llm-sim", "-p", "breakwater-loadgen"], cwd=ROOT)
    sh(["cargo", "build", "--profile", "production", "-q", "-p", "breakwater", "--bin", "breakwater",
        "--example", "stock_proxy"], cwd=ROOT)
    sim = os.path.join(REL, "llm-sim")
    common = ["--capacity-tps", "1e9", "--slots", "100000"]
    start([sim, "--listen", "%s:%d" % FAST, "--control-listen", "127.0.0.1:18601",
           "--model", "bench-model", "--ttft-ms", "0", "--itl-ms", "0"] + common, LOAD_CPUS)
    start([sim, "--listen", "%s:%d" % STREAM, "--control-listen", "127.0.0.1:18611",
           "--model", "bench-stream", "--ttft-ms", "20", "--itl-ms", "10"] + common, LOAD_CPUS)
    tmp = tempfile.mkdtemp(prefix="bw-bench-")
    with open(os.path.join(tmp, "policy.toml"), "w") as f:
        f.write(f"""
[gateway]
home_region = "local"
[[regions]]
id = "local"
[[pools]]
id = "fast"
region = "local"
engine = "vllm"
models = ["bench-model"]
[[pools]]
id = "stream"
region = "local"
engine = "vllm"
models = ["bench-stream"]
[[shards]]
id = "fast-1"
pool = "fast"
url = "http://{FAST[0]}:{FAST[1]}"
capacity_tps = 1000000
[[shards]]
id = "stream-1"
pool = "stream"
url = "http://{STREAM[0]}:{STREAM[1]}"
capacity_tps = 1000000
""")
    tls_dir = make_certificate(tmp) if TLS else None
    tls_gw = None
    if TLS:
        with open(os.path.join(tmp, "policy.toml")) as f:
            plain_policy = f.read()
        tls_section = "\n".join([
            'home_region = "local"', "[gateway.tls]", f'cert_file = "{tls_dir}/tls.crt"',
            f'key_file = "{tls_dir}/tls.key"'])
        os.makedirs(os.path.join(tls_dir, "policy"))
        with open(os.path.join(tls_dir, "policy", "policy.toml"), "w") as f:
            f.write(plain_policy.replace('home_region = "local"', tls_section))
        tls_gw = start([os.path.join(PROD, "breakwater"), "serve", "--policy", os.path.join(tls_dir, "policy"),
                        "--listen", "%s:%d" % TLS_GATEWAY, "--admin-listen", "127.0.0.1:18661",
                        "--threads", str(WORKERS)], PROXY_CPUS, env=dict(os.environ, RUST_LOG="warn"))
    gw = start([os.path.join(PROD, "breakwater"), "serve", "--policy", tmp, "--listen",
                "%s:%d" % GATEWAY, "--admin-listen", "127.0.0.1:18631", "--threads", str(WORKERS)],
               PROXY_CPUS, env=dict(os.environ, RUST_LOG="warn"))
    base = None
    if BASELINE:
        base = start([BASELINE, "serve", "--policy", tmp, "--listen", "%s:%d" % BASE_GATEWAY,
                      "--admin-listen", "127.0.0.1:18632", "--threads", str(WORKERS)],
                     PROXY_CPUS, env=dict(os.environ, RUST_LOG="warn"))
    with open(os.path.join(tmp, "nginx.conf"), "w") as f:
        f.write(f"""
worker_processes {WORKERS};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream fast {{ least_conn; server {FAST[0]}:{FAST[1]}; keepalive 256; }}
  upstream stream {{ least_conn; server {STREAM[0]}:{STREAM[1]}; keepalive 256; }}
  server {{
    listen {NGINX_FAST[0]}:{NGINX_FAST[1]};
    location / {{ proxy_pass http://fast; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; client_max_body_size 8m; }}
  }}
  server {{
    listen {NGINX_STREAM[0]}:{NGINX_STREAM[1]};
    location / {{ proxy_pass http://stream; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; }}
  }}
{nginx_tls_servers(tls_dir) if TLS else ''}
}}
""")
    ng = start([nginx, "-c", os.path.join(tmp, "nginx.conf"), "-g", "daemon off;"], PROXY_CPUS)
    stock = start([os.path.join(PROD, "examples", "stock_proxy"), "%s:%d" % STOCK, "%s:%d" % FAST,
                   str(WORKERS)], PROXY_CPUS)
    print(f"proxies on CPUs {PROXY_CPUS} with {WORKERS} worker(s), load on {LOAD_CPUS}"
          if PROXY_CPUS else "unpinned, 2 workers per proxy", file=sys.stderr)
    for host, port in (FAST, STREAM, NGINX_FAST, GATEWAY, STOCK) + ((BASE_GATEWAY,) if base else ()):
        wait_http(f"http://{host}:{port}/v1/models")
    if TLS:
        for host, port in (TLS_GATEWAY, NGINX_TLS_FAST, NGINX_TLS_STREAM):
            wait_tcp(host, port)
    time.sleep(0.5)
    targets = [
        ("direct", "http://%s:%d" % FAST, "http://%s:%d" % STREAM, []),
        ("breakwater", "http://%s:%d" % GATEWAY, "http://%s:%d" % GATEWAY, [gw.pid]),
        ("nginx", "http://%s:%d" % NGINX_FAST, "http://%s:%d" % NGINX_STREAM, nginx_pids(ng.pid)),
        ("pingora-stock", "http://%s:%d" % STOCK, None, [stock.pid]),
    ]
    if base:
        targets.insert(2, ("baseline", "http://%s:%d" % BASE_GATEWAY, "http://%s:%d" % BASE_GATEWAY,
                           [base.pid]))
    if TLS:
        ca = os.path.join(tls_dir, "ca.crt")
        targets += [
            ("breakwater-tls", "https://localhost:%d" % TLS_GATEWAY[1],
             "https://localhost:%d" % TLS_GATEWAY[1], [tls_gw.pid], ca),
            ("nginx-tls", "https://localhost:%d" % NGINX_TLS_FAST[1],
             "https://localhost:%d" % NGINX_TLS_STREAM[1], nginx_pids(ng.pid), ca),
        ]
    rounds = []
    for i in range(ROUNDS):
        print(f"round {i + 1} of {ROUNDS}", file=sys.stderr)
        rounds.append([run_target(*t) for t in targets])
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(rounds, f, indent=2)
    print_table(rounds)


def make_certificate(tmp):
    """A CA and a certificate for localhost signed by it (ECDSA P-256), in tmp/tls."""
    d = os.path.join(tmp, "tls")
    os.makedirs(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    quiet = dict(cwd=d, capture_output=True)
    sh(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=breakwater bench CA"], **quiet)
    sh(["openssl", "req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=localhost"], **quiet)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    sh(["openssl", "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "san.ext"], **quiet)
    return d


def nginx_tls_servers(d):
    """nginx's HTTPS servers in front of the same upstreams, with the run's certificate."""
    tls = (f"ssl_certificate {d}/tls.crt; ssl_certificate_key {d}/tls.key; "
           "ssl_protocols TLSv1.2 TLSv1.3; keepalive_requests 10000000;")
    return f"""
  server {{
    listen {NGINX_TLS_FAST[0]}:{NGINX_TLS_FAST[1]} ssl; {tls}
    location / {{ proxy_pass http://fast; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; client_max_body_size 8m; }}
  }}
  server {{
    listen {NGINX_TLS_STREAM[0]}:{NGINX_TLS_STREAM[1]} ssl; {tls}
    location / {{ proxy_pass http://stream; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; }}
  }}"""


def wait_tcp(host, port, within=20):
    """Waits until host:port accepts connections."""
    import socket
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{host}:{port} never listened")


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def value(run, key):
    return lambda r, d: r[run][key]


def added(run, key):
    """How much a target adds to going direct."""
    return lambda r, d: r[run][key] - d[run][key]


ROWS = [
    ("rate 1000/s: p50 ms", value("rate", "p50_ms")),
    ("rate 1000/s: p99 ms", value("rate", "p99_ms")),
    ("rate: added p50 ms vs direct", added("rate", "p50_ms")),
    ("rate: added p99 ms vs direct", added("rate", "p99_ms")),
    ("rate: proxy CPU s / 10k req", value("rate", "cpu_s_per_10k")),
    ("max: requests/s (32 conns)", value("max", "rps")),
    ("max: proxy CPU s / 10k req", value("max", "cpu_s_per_10k")),
    ("stream: TTFT p50 ms", value("stream", "ttft_p50_ms")),
    ("stream: TTFT p99 ms", value("stream", "ttft_p99_ms")),
    ("stream: added TTFT p50 ms vs direct", added("stream", "ttft_p50_ms")),
    ("stream: added TTFT p99 ms vs direct", added("stream", "ttft_p99_ms")),
    ("stream: proxy CPU s / 1k streams", value("stream", "cpu_s_per_1k")),
    ("stream x10: TTFT p50 ms", value("stream10", "ttft_p50_ms")),
    ("stream x10: added TTFT p50 ms vs direct", added("stream10", "ttft_p50_ms")),
    ("stream x10: added TTFT p99 ms vs direct", added("stream10", "ttft_p99_ms")),
    ("stream: gap p50 ms", value("stream", "gap_p50_ms")),
    ("stream: gap p99 ms", value("stream", "gap_p99_ms")),
    ("stream: streams completed", value("stream", "ok")),
    ("errors (all runs)", lambda r, d: r["rate"]["errors"] + r["max"]["errors"] + (r["stream"] or {}).get("errors", 0)),
    ("proxy RSS MiB after", lambda r, d: r["rss_mib"]),
]


def cell(rounds, t, f):
    """The median over rounds of f for target index t, or None where it does not apply."""
    try:
        return median([f(results[t], results[0]) for results in rounds])
    except (TypeError, KeyError):
        return None


def print_table(rounds):
    names = [r["target"] for r in rounds[0]]
    print(f"Medians over {len(rounds)} round(s).\n")
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, f in ROWS:
        print(f"| {label} | " + " | ".join(fmt(cell(rounds, t, f)) for t in range(len(names))) + " |")
    per_round = [
        ("CPU per request at 1000 req/s", lambda r: r["rate"]["cpu_s_per_10k"]),
        ("CPU per request at maximum throughput", lambda r: r["max"]["cpu_s_per_10k"]),
        ("CPU per 100-stream run", lambda r: r["stream"]["cpu_s_per_1k"]),
    ]
    print()
    pairs = [("breakwater", "nginx")]
    if "baseline" in names:
        pairs += [("baseline", "nginx"), ("breakwater", "baseline")]
    if "breakwater-tls" in names:
        pairs += [("breakwater-tls", "nginx-tls")]
    for label, f in per_round:
        for a, b in pairs:
            ia, ib = names.index(a), names.index(b)
            ratios = [f(results[ia]) / f(results[ib]) for results in rounds
                      if f(results[ia]) and f(results[ib])]
            if ratios:
                shown = ", ".join(f"{x:.2f}" for x in ratios)
                print(f"{label}, {a} / {b}: median {median(ratios):.2f} (rounds: {shown})")


if "--table" in sys.argv:
    with open(os.path.join(OUT, "results.json")) as f:
        print_table(json.load(f))
    sys.exit(0)

try:
    main()
finally:
    for p in procs:
        try:
            p.send_signal(signal.SIGINT if p.args and "nginx" not in p.args[0] else signal.SIGQUIT)
        except Exception:
            pass
    time.sleep(0.3)
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
