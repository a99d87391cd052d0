#!/usr/bin/env python3
"""Instructions the gateway executes per request and per stream, counted by callgrind.

Usage:  python3 bench/instructions.py [--baseline BIN] [--requests N] [--streams N]
        python3 bench/instructions.py --affinity prefix|session
        python3 bench/instructions.py --cluster

--affinity measures this build twice instead, with the pool's cache affinity off and with
it set (and 16-byte blocks, so the load generator's short prompt is hashed in several blocks
and the prefix index is read and written on every request): the cost of affinity per
request.

--cluster measures this build twice too: with `[cluster]` on a redis-server it starts
(127.0.0.1:18779) and without, the requests' tenant limited (`rpm`, `tpm`) in both, so its
buckets are leased from the store in one and local in the other: the cost of sharing limits
and slots across replicas per request (the settling and the heartbeats run off the request
path and count in the idle rate).

CPU time on a small shared machine moves by 10-30 % from one run to the next, which hides a
change of a few percent on the request path; the number of instructions executed does not
move. This script runs each build (this tree's `production` binary, and --baseline BIN if
given: an earlier build, e.g. from a git worktree) under `valgrind --tool=callgrind`, one
worker thread, in front of an instant `llm-sim`, and for each:

  1. warms up (500 requests, 20 streams), then zeroes the counters (callgrind_control -z);
  2. idle: 3 s with no traffic, dumped, to measure what runs without requests (health
     checks, the history ticker) per second;
  3. requests: N non-streamed completions (default 2,000, 4 connections), dumped;
  4. streams: N streamed completions of 50 tokens (default 200, 10 at a time), dumped.

Each figure is that phase's instructions, less the idle rate times the phase's length,
divided by its count. It is the same measure as the callgrind table in RESULTS.md. It says
nothing about cache misses or system-call cost (bench/run.py measures CPU time); use it to
see whether a change added work per request, and how much. Every run is bounded.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
PROD = os.path.join(ROOT, "target", "production")
SIM = ("127.0.0.1", 18700)
GATEWAY = ("127.0.0.1", 18710)


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


REQUESTS = int(arg("--requests", "2000"))
STREAMS = int(arg("--streams", "200"))
BASELINE = arg("--baseline", None)
AFFINITY = arg("--affinity", None)
CLUSTER = "--cluster" in sys.argv
STORE_PORT = 18779


def loadgen(mode, model, **kw):
    cmd = [os.path.join(REL, "loadgen"), "--url", "http://%s:%d" % GATEWAY, "--mode", mode,
           "--model", model, "--duration-s", "300"]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=330).stdout
    return out


def dump(pid, out_dir):
    """Dumps callgrind's counters since the last zeroing; returns the instructions."""
    before = set(os.listdir(out_dir))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        new = sorted(set(os.listdir(out_dir)) - before)
        if new:
            time.sleep(0.5)
            text = open(os.path.join(out_dir, new[-1])).read()
            m = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text, re.M)
            if m:
                return int(m.group(1))
        time.sleep(0.2)
    raise SystemExit("callgrind wrote no dump")


def measure(binary, policy):
    out_dir = tempfile.mkdtemp(prefix="bw-callgrind-")
    gw = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
         binary, "serve", "--policy", policy, "--listen", "%s:%d" % GATEWAY,
         "--admin-listen", "127.0.0.1:18711", "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"))
    try:
        wait_http("http://%s:%d/v1/models" % GATEWAY, timeout=90, poll=0.2)
        loadgen("max", "bench-model", concurrency=4, requests=500)
        loadgen("stream", "bench-model", concurrency=10, requests=20, max_tokens=50)
        subprocess.run(["callgrind_control", "-z", str(gw.pid)], check=True, capture_output=True, timeout=60)
        t = time.time()
        time.sleep(3)
        idle = dump(gw.pid, out_dir)
        idle_rate = idle / (time.time() - t)
        subprocess.run(["callgrind_control", "-z", str(gw.pid)], check=True, capture_output=True, timeout=60)
        t = time.time()
        loadgen("max", "bench-model", concurrency=4, requests=REQUESTS)
        per_request = (dump(gw.pid, out_dir) - idle_rate * (time.time() - t)) / REQUESTS
        subprocess.run(["callgrind_control", "-z", str(gw.pid)], check=True, capture_output=True, timeout=60)
        t = time.time()
        loadgen("stream", "bench-model", concurrency=10, requests=STREAMS, max_tokens=50)
        per_stream = (dump(gw.pid, out_dir) - idle_rate * (time.time() - t)) / STREAMS
        return {"idle_per_s": idle_rate, "per_request": per_request, "per_stream": per_stream,
                "out_dir": out_dir}
    finally:
        gw.terminate()
        try:
            gw.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gw.kill()


def main():
    if CLUSTER and shutil.which("redis-server") is None:
        sys.exit("--cluster needs redis-server (Debian's redis-server package)")
    if shutil.which("valgrind") is None:
        root = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(root + ["apt-get", "update", "-qq"], check=True)
        subprocess.run(root + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                               "-qq", "valgrind"], check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "llm-sim", "-p", "breakwater-loadgen"],
                   cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--profile", "production", "-q", "-p", "breakwater", "--bin",
                    "breakwater"], cwd=ROOT, check=True)
    sim = subprocess.Popen(
        [os.path.join(REL, "llm-sim"), "--listen", "%s:%d" % SIM, "--control-listen", "127.0.0.1:18701",
         "--model", "bench-model", "--ttft-ms", "0", "--itl-ms", "0", "--capacity-tps", "1e9",
         "--slots", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http("http://%s:%d/v1/models" % SIM)
        tmp = tempfile.mkdtemp(prefix="bw-instr-")
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
[[shards]]
id = "fast-1"
pool = "fast"
url = "http://{SIM[0]}:{SIM[1]}"
capacity_tps = 1000000
""")
        builds = [("breakwater", os.path.join(PROD, "breakwater"), tmp)]
        if BASELINE:
            builds.append(("baseline", os.path.abspath(BASELINE), tmp))
        if AFFINITY:
            affine = tempfile.mkdtemp(prefix="bw-instr-affinity-")
            with open(os.path.join(tmp, "policy.toml")) as f:
                text = f.read().replace('models = ["bench-model"]', 'models = ["bench-model"]\n'
                                        f'affinity = "{AFFINITY}"\naffinity_block_bytes = 16')
            with open(os.path.join(affine, "policy.toml"), "w") as f:
                f.write(text)
            builds = [(f"affinity {AFFINITY}", os.path.join(PROD, "breakwater"), affine),
                      ("affinity off", os.path.join(PROD, "breakwater"), tmp)]
        store = None
        if CLUSTER:
            # The requests carry no key: the default tenant, limited far above the load.
            with open(os.path.join(tmp, "policy.toml"), "a") as f:
                f.write('[[tenants]]\nid = "default"\nrpm = 100000000\ntpm = 1000000000\n')
            shared = tempfile.mkdtemp(prefix="bw-instr-cluster-")
            with open(os.path.join(tmp, "policy.toml")) as f:
                text = f.read()
            with open(os.path.join(shared, "policy.toml"), "w") as f:
                f.write(text + f'[cluster]\nstore = "redis://127.0.0.1:{STORE_PORT}"\n')
            store = subprocess.Popen(["redis-server", "--port", str(STORE_PORT), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            builds = [("cluster", os.path.join(PROD, "breakwater"), shared),
                      ("one replica", os.path.join(PROD, "breakwater"), tmp)]
        try:
            results = {name: measure(path, policy) for name, path, policy in builds}
        finally:
            if store:
                store.terminate()
    finally:
        sim.terminate()
    print("| build | instructions / request | instructions / 50-token stream | idle / s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['per_request']:,.0f} | {r['per_stream']:,.0f} | {r['idle_per_s']:,.0f} |")
    if len(builds) == 2:
        (na, _, _), (nb, _, _) = builds
        a, b = results[na], results[nb]
        print(f"\n{na} / {nb}: {a['per_request'] / b['per_request']:.3f} per request, "
              f"{a['per_stream'] / b['per_stream']:.3f} per stream")
    for name, r in results.items():
        print(f"{name}: dumps in {r['out_dir']} (callgrind_annotate FILE)", file=sys.stderr)


if __name__ == "__main__":
    main()
