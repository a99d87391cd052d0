#!/usr/bin/env python3
"""What a gateway costs as its fleet grows: CPU per request, idle CPU and memory at 4, 64,
512 and 4,096 shards, in one run, and how long `breakwater validate` and a reload take on a
5,000-shard policy.

Usage:  python3 bench/fleet_size.py [--quick] [--sizes 4,64,512,4096]

Tried as a new user would: one instant llm-sim engine listening on 0.0.0.0, reached as N
distinct shards at N loopback addresses (127.0.x.y, one port), in one pool with the default
health settings (active checks every 5 s; a `generic` engine, so no metrics scrape). The
gateway runs one worker (`--threads 1`) pinned to one CPU; the simulator and the load
generator get the others. For each size, a fresh gateway:

  idle   10 s with no traffic (after 10 s to settle) -> idle CPU (% of a core), RSS
  load   32 connections, plain requests, 10 s       -> requests/s, CPU-s per 10k requests,
                                                       and the same less the idle CPU

--quick: 5 s windows. Results go to bench/out/fleet_size.json and a Markdown table on
stdout; the ratio column is CPU per request against the smallest size in the same run.
Every run is bounded in time.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_ticks, pinned, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
PROD = os.path.join(ROOT, "target", "production")
OUT = os.path.join(ROOT, "bench", "out")
TICK = os.sysconf("SC_CLK_TCK")
QUICK = "--quick" in sys.argv
WINDOW = 5 if QUICK else 10
SIZES = [4, 64, 512, 4096]
if "--sizes" in sys.argv:
    SIZES = [int(x) for x in sys.argv[sys.argv.index("--sizes") + 1].split(",")]
ENGINE_PORT = 18701
GATEWAY = ("127.0.0.1", 18711)
ADMIN = ("127.0.0.1", 18712)
TOKEN = "fleet-size-bench"
CPUS = sorted(os.sched_getaffinity(0))
PROXY_CPUS = CPUS[-1:] if len(CPUS) > 1 else None
LOAD_CPUS = CPUS[:-1] if len(CPUS) > 1 else None
procs = []


def address(i):
    """The i-th shard's loopback address: 127.0.x.y, y in 1..250."""
    return f"127.0.{i // 250}.{i % 250 + 1}"


def policy(n):
    head = """[gateway]
home_region = "local"
[[regions]]
id = "local"
[[pools]]
id = "fleet"
region = "local"
models = ["bench-model"]
"""
    shards = "".join(
        f'[[shards]]\nid = "s{i}"\npool = "fleet"\nurl = "http://{address(i)}:{ENGINE_PORT}"\n'
        f"capacity_tps = 100000\n" for i in range(n))
    return head + shards


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def start(cmd, cpus, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=pinned(cpus), **kw)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)


def loadgen(duration):
    cmd = [os.path.join(REL, "loadgen"), "--url", "http://%s:%d" % GATEWAY, "--mode", "max",
           "--model", "bench-model", "--concurrency", "32", "--duration-s", str(duration)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120,
                         preexec_fn=pinned(LOAD_CPUS)).stdout
    return json.loads(out)


def admin_post(path):
    req = urllib.request.Request("http://%s:%d%s" % (ADMIN + (path,)), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def measure(n, tmp):
    d = tempfile.mkdtemp(prefix=f"n{n}-", dir=tmp)  # a size may be listed twice
    with open(os.path.join(d, "policy.toml"), "w") as f:
        f.write(policy(n))
    gw = start([os.path.join(PROD, "breakwater"), "serve", "--policy", d, "--listen",
                "%s:%d" % GATEWAY, "--admin-listen", "%s:%d" % ADMIN, "--threads", "1"],
               PROXY_CPUS, env=dict(os.environ, RUST_LOG="warn", BREAKWATER_ADMIN_TOKEN=TOKEN))
    try:
        wait_http("http://%s:%d/ready" % ADMIN, timeout=60)
        time.sleep(WINDOW)  # the first round of checks, spread over their interval
        before = cpu_ticks([gw.pid])
        time.sleep(WINDOW)
        idle_cpu_s = (cpu_ticks([gw.pid]) - before) / TICK
        idle_rss = rss_mib(gw.pid)
        loadgen(2)  # warm-up: connections
        before = cpu_ticks([gw.pid])
        r = loadgen(WINDOW)
        used = (cpu_ticks([gw.pid]) - before) / TICK
        ok = r["ok"]
        idle_share = idle_cpu_s / WINDOW * r.get("duration_s", WINDOW)
        return {
            "shards": n,
            "requests_per_s": r.get("rps"),
            "ok": ok,
            "errors": r.get("errors"),
            "cpu_s_per_10k": used / ok * 10_000 if ok else None,
            "cpu_s_per_10k_less_idle": (used - idle_share) / ok * 10_000 if ok else None,
            "idle_cpu_percent": idle_cpu_s / WINDOW * 100,
            "idle_rss_mib": idle_rss,
            "loaded_rss_mib": rss_mib(gw.pid),
        }
    finally:
        stop(gw)


def big_policy_times(tmp, n=5000):
    """Seconds `breakwater validate` and a reload take on an n-shard policy."""
    d = os.path.join(tmp, f"big{n}")
    os.makedirs(d)
    with open(os.path.join(d, "policy.toml"), "w") as f:
        f.write(policy(n))
    t0 = time.monotonic()
    subprocess.run([os.path.join(PROD, "breakwater"), "validate", d], check=True,
                   capture_output=True, timeout=120)
    validate_s = time.monotonic() - t0
    gw = start([os.path.join(PROD, "breakwater"), "serve", "--policy", d, "--listen",
                "%s:%d" % GATEWAY, "--admin-listen", "%s:%d" % ADMIN, "--threads", "1"],
               PROXY_CPUS, env=dict(os.environ, RUST_LOG="warn", BREAKWATER_ADMIN_TOKEN=TOKEN))
    try:
        wait_http("http://%s:%d/ready" % ADMIN, timeout=120)
        # A change to every shard's weight: the whole table is rebuilt.
        with open(os.path.join(d, "policy.toml")) as f:
            text = f.read()
        with open(os.path.join(d, "policy.toml"), "w") as f:
            f.write(text.replace("capacity_tps = 100000", "capacity_tps = 100000\nweight = 2"))
        t0 = time.monotonic()
        applied = admin_post("/admin/reload")
        reload_s = time.monotonic() - t0
        assert applied.get("changed"), applied
    finally:
        stop(gw)
    return {"shards": n, "validate_s": validate_s, "reload_s": reload_s}


def main():
    os.makedirs(OUT, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "llm-sim", "-p", "breakwater-loadgen"],
                   cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--profile", "production", "-q", "-p", "breakwater", "--bin",
                    "breakwater"], cwd=ROOT, check=True)
    start([os.path.join(REL, "llm-sim"), "--listen", f"0.0.0.0:{ENGINE_PORT}", "--control-listen",
           "127.0.0.1:18702", "--model", "bench-model", "--ttft-ms", "0", "--itl-ms", "0",
           "--capacity-tps", "1e9", "--slots", "100000"], LOAD_CPUS)
    wait_http(f"http://127.0.0.1:{ENGINE_PORT}/health")
    tmp = tempfile.mkdtemp(prefix="bw-fleet-")
    rows = []
    try:
        for n in SIZES:
            rows.append(measure(n, tmp))
            print(json.dumps(rows[-1]), file=sys.stderr)
        big = big_policy_times(tmp)
    finally:
        for p in procs:
            stop(p)
    with open(os.path.join(OUT, "fleet_size.json"), "w") as f:
        json.dump({"rows": rows, "big_policy": big, "window_s": WINDOW}, f, indent=2)
    base = rows[0]["cpu_s_per_10k"]
    print("| shards | requests/s | CPU-s per 10k | less idle | vs smallest | idle CPU | RSS idle |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["cpu_s_per_10k"] / base if base and r["cpu_s_per_10k"] else None
        print(f"| {r['shards']} | {r['requests_per_s'] or 0:,.0f} | {r['cpu_s_per_10k'] or 0:.2f} | "
              f"{r['cpu_s_per_10k_less_idle'] or 0:.2f} | {ratio or 0:.2f}x | "
              f"{r['idle_cpu_percent']:.1f} % | {r['idle_rss_mib']:.1f} MiB |")
    print(f"\n{big['shards']} shards: validate {big['validate_s']:.2f} s, reload {big['reload_s']:.2f} s")


if __name__ == "__main__":
    main()
