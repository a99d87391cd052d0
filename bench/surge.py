#!/usr/bin/env python3
"""Breakwater surge benchmark: a release-week surge against a fleet of known capacity,
three targets in one run.

Usage:  python3 bench/surge.py [--quick] [--pin] [--only admission,learned,no-admission,haproxy]
                               [--admission-set 'KEY = VALUE; ...']

`--pin` runs the proxy on the last CPU and the engines and the load generator on the others:
unpinned, the simulated engines' token timers share cores with the proxy, so a proxy that
uses more CPU slows the engines it is measured against (real engines run on their own
machines). `--admission-set` adds settings to the admission target's `[admission]` table (to try a
setting against the defaults in the same run, e.g. `--admission-set 'queue_target_ms = 60'`).

The fleet: four llm-sim engines in two regions (two each), 16 batch slots, 1,000 tokens/s,
50 ms base TTFT; each streamed request asks for 24 tokens, so an engine finishes about 37
requests/s and the fleet about 147 (16 slots / (50 ms + 24 x 16 ms), computed; HAProxy,
told the slots, comes close to it at 10x).

Arrivals: open-loop Poisson (bench/loadgen `surge`), stepped like a release week — base
15 req/s (a tenth of capacity), 2x, 5x, 10x (about capacity), 20x (2x capacity), base
again — streamed chat completions from three tenants: critical 10 %, standard 60 %,
sheddable 30 %. A request is *good* when it is answered 200, complete ([DONE], no error
event) and its first token came within 1 s. Goodput is given two ways: good requests *sent*
in a phase per second, and good answers *delivered* (ended) in the phase per second — the
rate the fleet did good work during it. The first credits a phase with work done after it
ended, so a target that queues longer at the end of a phase than at its start gains from it.

Targets, each against freshly started engines:
  admission     breakwater serve, admission on (the default policy), tenants by key, each
                shard's batch slots declared (`max_requests = 16`, as HAProxy is told them)
  learned       the same with nothing about slots declared (only with --only)
  no-admission  the same with [admission] enabled = false: the negative control
  haproxy       HAProxy, leastconn, maxconn 16 per server (each engine's slots, told by
                hand), timeout queue 500 ms, option http-no-delay
  learned-x3    three `learned` replicas sharing limits and slots through a redis-server
                (`[cluster]`), behind HAProxy in TCP mode (round robin per connection); the
                gateway's own figures (queue, refusals by reason) are the first replica's

Also per phase: the engines' batch use (running, waiting), the requests they completed per
second and the connections they accepted (llm-sim's `/stats`, sampled every 250 ms), and
the CPU seconds the proxy and the engines used over the whole surge.

Results: bench/out/surge.json and a Markdown table on stdout. Every run is bounded.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import cpu_ticks, pinned, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
OUT = os.path.join(ROOT, "bench", "out")
QUICK = "--quick" in sys.argv
# --pin: the proxy on the last CPU, the engines and the load generator on the others, so the
# proxy's own work cannot delay the simulated engines' timers (real engines run elsewhere).
PIN = "--pin" in sys.argv and (os.cpu_count() or 1) > 1
PROXY_CPUS = {os.cpu_count() - 1} if PIN else None
LOAD_CPUS = set(range(os.cpu_count() - 1)) if PIN else None
ADMISSION_SET = (sys.argv[sys.argv.index("--admission-set") + 1]
                 if "--admission-set" in sys.argv else "")
MODEL = "bench-model"
BASE_RATE = 15
PHASES = ("base:1:4,2x:2:4,5x:5:4,10x:10:5,20x:20:6,base-again:1:4" if QUICK
          else "base:1:8,2x:2:8,5x:5:8,10x:10:10,20x:20:10,base-again:1:8")
GATEWAY = 19080
ADMIN = 19091
TENANTS = [("acme-critical", "critical", 10, "sk-bench-critical"),
           ("web-standard", "standard", 60, "sk-bench-standard"),
           ("batch-sheddable", "sheddable", 30, "sk-bench-sheddable")]


def engine(sid, region, port, slots=16, capacity_tps=1000, ttft_ms=50, itl_ms=12,
           behaviour="continuous", extra=()):
    """One simulated engine of a fleet: its id, region, port and llm-sim parameters."""
    return {"id": sid, "region": region, "port": port, "slots": slots,
            "capacity_tps": capacity_tps, "ttft_ms": ttft_ms, "itl_ms": itl_ms,
            "behaviour": behaviour, "extra": list(extra)}


def fleet(engines, max_tokens, prompt_bytes=None, declared=None, declared_scale=1.0,
          base_rate=BASE_RATE, name="default"):
    """What a surge runs against: the engines, the tokens each request asks for, the
    prompt sizes (`MIN:MAX` bytes, or None for one short prompt), and each shard's
    `capacity_tps` as the policy declares it (`declared`: id → tokens/s, default the
    engine's `capacity_tps`), times `declared_scale` (to declare it wrong)."""
    declared = declared or {e["id"]: e["capacity_tps"] for e in engines}
    return {"name": name, "engines": engines, "max_tokens": max_tokens,
            "prompt_bytes": prompt_bytes, "base_rate": base_rate,
            "declared": {k: max(1, round(v * declared_scale)) for k, v in declared.items()}}


# The default fleet: four engines in two regions, 16 slots, 1,000 tokens/s, 50 ms TTFT,
# 24 tokens a request.
DEFAULT_FLEET = fleet([engine("use-1", "us-east", 19101), engine("use-2", "us-east", 19102),
                       engine("euw-1", "eu-west", 19201), engine("euw-2", "eu-west", 19202)],
                      max_tokens=24)


def sh(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def start(cmd, cpus=None, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL),
                            preexec_fn=pinned(cpus), **kw)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def engines(fl):
    procs = []
    for e in fl["engines"]:
        port = e["port"]
        procs.append(start([os.path.join(REL, "llm-sim"), "--listen", f"127.0.0.1:{port}",
                            "--control-listen", f"127.0.0.1:{port + 1000}", "--model", MODEL,
                            "--capacity-tps", str(e["capacity_tps"]), "--slots", str(e["slots"]),
                            "--ttft-ms", str(e["ttft_ms"]), "--itl-ms", str(e["itl_ms"]),
                            "--behaviour", e["behaviour"], *e["extra"]], cpus=LOAD_CPUS))
    for e in fl["engines"]:
        wait_http(f"http://127.0.0.1:{e['port']}/health")
    return procs


def policy(directory, fl, admission, declare_slots, admission_set="", cluster=None):
    """The gateway's policy for `fl`: admission on or off, each shard's batch slots
    declared (`max_requests`) or not, extra `[admission]` settings, `[cluster]` on the
    store at port `cluster`."""
    text = [f'[gateway]\nhome_region = "us-east"\nlisten = "127.0.0.1:{GATEWAY}"\n'
            f'admin_listen = "127.0.0.1:{ADMIN}"\n',
            "[timeouts]\nconnect_ms = 500\nfirst_byte_ms = 10000\nidle_ms = 10000\ntotal_ms = 60000\n",
            f"[routing]\ndefault_completion_tokens = {fl['max_tokens']}\n",
            "[health]\nmetrics_interval_ms = 200\n"]
    if cluster:
        text.append(f'[cluster]\nstore = "redis://127.0.0.1:{cluster}"\n')
    if not admission:
        text.append("[admission]\nenabled = false\n")
    elif admission_set:
        text.append("[admission]\n" + "\n".join(x.strip() for x in admission_set.split(";")) + "\n")
    regions = []
    for e in fl["engines"]:
        if e["region"] not in regions:
            regions.append(e["region"])
    for region in regions:
        text.append(f'[[regions]]\nid = "{region}"\n[[pools]]\nid = "pool-{region}"\n'
                    f'region = "{region}"\nengine = "vllm"\nmodels = ["{MODEL}"]\n')
    for e in fl["engines"]:
        text.append(f'[[shards]]\nid = "{e["id"]}"\npool = "pool-{e["region"]}"\n'
                    f'url = "http://127.0.0.1:{e["port"]}"\ncapacity_tps = {fl["declared"][e["id"]]}\n'
                    + (f'max_requests = {e["slots"]}\n' if declare_slots else ""))
    for tid, prio, _, key in TENANTS:
        digest = hashlib.sha256(key.encode()).hexdigest()
        text.append(f'[[tenants]]\nid = "{tid}"\napi_key_sha256 = ["{digest}"]\npriority = "{prio}"\n')
    with open(os.path.join(directory, "policy.toml"), "w") as f:
        f.write("\n".join(text))


def haproxy_conf(path, fl):
    """HAProxy in front of the engines: each told its slots, a 500 ms queue."""
    servers = [f"server {e['id']} 127.0.0.1:{e['port']} maxconn {e['slots']}"
               for e in fl["engines"]]
    write_haproxy(path, "http", ["option http-no-delay", "timeout queue 500ms"], "leastconn",
                  servers)


def write_haproxy(path, mode, defaults, balance, servers):
    """One frontend on the gateway's port, one backend of `servers`."""
    lines = "\n".join(f"    {x}" for x in defaults)
    backend = "\n".join(f"    {x}" for x in servers)
    with open(path, "w") as f:
        f.write(f"""global
    nbthread 1
    maxconn 9000
defaults
    mode {mode}
{lines}
    timeout connect 500ms
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{GATEWAY}
    default_backend servers
backend servers
    balance {balance}
{backend}
""")


def gateway_queued():
    """Requests waiting in the gateway's queue now, and what admission reads (queue target,
    drain rate, base TTFT, arrivals per finish); (None, None) when it does not answer."""
    req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}/admin/status",
                                 headers={"authorization": "Bearer bench"})
    try:
        with urllib.request.urlopen(req, timeout=1) as r:
            a = json.load(r)["admission"]
    except Exception:
        return None, None
    reads = {k: a.get(k) for k in ("queue_target_ms", "drain_tokens_per_s", "base_ttft_ms",
                                   "arrivals_per_finish")}
    return sum(a["queue_depth"].values()), reads


def sample_engines(fl, samples, stop, gateway):
    """Every 100 ms, the requests running and waiting on all engines together, the
    requests they completed and connections they accepted so far (llm-sim's control
    `/stats`), and (`gateway`) the requests waiting in the gateway's queue, with the time
    since the surge started."""
    start = time.time()
    while not stop.is_set():
        queued, reads = gateway_queued() if gateway else (None, None)
        running = waiting = completed = connections = 0
        for e in fl["engines"]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{e['port'] + 1000}/stats", timeout=1) as r:
                    st = json.load(r)
                running += st["running"]
                waiting += st["waiting"]
                completed += st["completed_total"]
                connections += st["connections_total"]
            except Exception:
                pass
        samples.append((time.time() - start, running, waiting, completed, connections, queued,
                        reads))
        stop.wait(0.1)


def surge(fl, phases, gateway):
    tenants = ",".join(f"{t}:{p}:{s}:{k}" for t, p, s, k in TENANTS)
    cmd = [os.path.join(REL, "surge"), "--url", f"http://127.0.0.1:{GATEWAY}",
           "--base-rate", str(fl["base_rate"]), "--phases", phases, "--tenants", tenants,
           "--max-tokens", str(fl["max_tokens"]), "--model", MODEL]
    if fl["prompt_bytes"]:
        cmd += ["--prompt-bytes", fl["prompt_bytes"]]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_engines, args=(fl, samples, stop, gateway), daemon=True)
    sampler.start()
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600,
                             preexec_fn=pinned(LOAD_CPUS))
    finally:
        stop.set()
        sampler.join()
    result = json.loads(out.stdout)
    slots = sum(e["slots"] for e in fl["engines"])
    # The engines' batch use per phase (phases run back to back from the start).
    at = 0.0
    for phase in result["phases"]:
        inside = [s for s in samples if at <= s[0] < at + phase["seconds"]]
        at += phase["seconds"]
        if inside:
            phase["engines_running_mean"] = sum(s[1] for s in inside) / len(inside)
            phase["engines_waiting_mean"] = sum(s[2] for s in inside) / len(inside)
            phase["slot_use"] = phase["engines_running_mean"] / slots
        # While the gateway queues, are the engines' slots full? (The engines' running
        # count against their slots, over the samples that saw someone in the queue.)
        queued = [s for s in inside if s[5]]
        if queued:
            phase["queued_samples"] = len(queued)
            phase["slot_use_while_queued"] = sum(s[1] for s in queued) / len(queued) / slots
        if len(inside) >= 2:
            span = inside[-1][0] - inside[0][0]
            phase["engines_completed_per_s"] = (inside[-1][3] - inside[0][3]) / span
            phase["engines_connections"] = inside[-1][4] - inside[0][4]
    # The raw series, for a closer look: (seconds, running, waiting, completed, connections,
    # queued in the gateway, what admission reads).
    result["engine_samples"] = [[round(x, 3) if isinstance(x, float) else x for x in s]
                                for s in samples]
    return result


def gateway_metrics():
    """The gateway's refusals by priority/reason, and its queue waits (count, and how many
    waited over 5 ms and over 50 ms, from `breakwater_queue_wait_seconds`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5) as r:
        text = r.read().decode()
    counts, waits = {}, {"count": 0, "le_0.005": 0, "le_0.05": 0}
    for line in text.splitlines():
        if not line.startswith(("breakwater_refused_total{", "breakwater_queue_wait_seconds_")):
            continue
        labels, value = line.rsplit(" ", 1)
        fields = dict(kv.split("=", 1) for kv in labels[labels.index("{") + 1:-1].split(","))
        fields = {k: v.strip(chr(34)) for k, v in fields.items()}
        if line.startswith("breakwater_refused_total{"):
            key = f"{fields['priority']}/{fields['reason']}"
            counts[key] = counts.get(key, 0) + int(float(value))
        elif line.startswith("breakwater_queue_wait_seconds_bucket{"):
            if fields["le"] in ("0.005", "0.05"):
                waits["le_" + fields["le"]] += int(float(value))
        elif line.startswith("breakwater_queue_wait_seconds_count{"):
            waits["count"] += int(float(value))
    waits["over_5ms"] = waits["count"] - waits["le_0.005"]
    waits["over_50ms"] = waits["count"] - waits["le_0.05"]
    return counts, waits


def cpu_seconds(pids):
    """utime + stime of the processes `pids`, seconds."""
    return cpu_ticks(pids) / os.sysconf("SC_CLK_TCK")


STORE = 19379  # learned-x3's redis-server
REPLICA_PORTS = [(19081, 19091), (19082, 19093), (19083, 19094)]  # traffic, admin


def replicas(tmp, fl, admission_set, keep):
    """learned-x3: a redis-server, three gateways sharing it, HAProxy (TCP) in front; the
    processes, HAProxy last."""
    procs = [start(["redis-server", "--port", str(STORE), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no"])]
    d = os.path.join(tmp, "learned-x3")
    os.makedirs(d, exist_ok=True)
    policy(d, fl, admission=True, declare_slots=False, admission_set=admission_set,
           cluster=STORE)
    env = dict(os.environ, BREAKWATER_ADMIN_TOKEN="bench", RUST_LOG="warn")
    for i, (port, admin) in enumerate(REPLICA_PORTS):
        log = open(os.path.join(keep or tmp, f"learned-x3-{i}.log"), "w")
        procs.append(start([os.path.join(REL, "breakwater"), "serve", "--policy", d,
                            "--threads", "1", "--listen", f"127.0.0.1:{port}",
                            "--admin-listen", f"127.0.0.1:{admin}"],
                           cpus=PROXY_CPUS, stderr=log, env=env))
        wait_http(f"http://127.0.0.1:{port}/healthz")
    conf = os.path.join(tmp, "haproxy-tcp.cfg")
    write_haproxy(conf, "tcp", [], "roundrobin",
                  [f"server r{i} 127.0.0.1:{p}" for i, (p, _) in enumerate(REPLICA_PORTS)])
    procs.append(start(["haproxy", "-f", conf, "-db"], cpus=PROXY_CPUS))
    time.sleep(0.5)
    return procs


def run_target(name, tmp, fl=DEFAULT_FLEET, phases=PHASES, admission_set=ADMISSION_SET):
    """One target against freshly started engines of `fl`: `haproxy`, `no-admission`,
    `admission` (slots declared), `learned` (nothing about slots declared), or
    `learned-x3` (three learned replicas sharing a store, behind HAProxy in TCP mode)."""
    sims = engines(fl)
    procs = list(sims)
    global ADMIN
    admin_port = ADMIN
    try:
        if name == "learned-x3":
            procs += replicas(tmp, fl, admission_set, os.environ.get("SURGE_LOG_DIR"))
            ADMIN = REPLICA_PORTS[0][1]
        elif name == "haproxy":
            conf = os.path.join(tmp, "haproxy.cfg")
            haproxy_conf(conf, fl)
            procs.append(start(["haproxy", "-f", conf, "-db"], cpus=PROXY_CPUS))
            time.sleep(0.5)
        else:
            d = os.path.join(tmp, name)
            os.makedirs(d, exist_ok=True)
            policy(d, fl, admission=(name != "no-admission"), declare_slots=(name != "learned"),
                   admission_set=admission_set)
            # SURGE_LOG_DIR=DIR keeps each gateway's access log there (JSON lines), for a
            # closer look at one request; it costs the proxy some CPU.
            keep = os.environ.get("SURGE_LOG_DIR")
            log = open(os.path.join(keep or tmp, f"{name}.log"), "w")
            env = dict(os.environ, BREAKWATER_ADMIN_TOKEN="bench",
                       RUST_LOG="warn,access=info" if keep else "warn")
            procs.append(start([os.path.join(REL, "breakwater"), "serve", "--policy", d,
                                "--threads", "1"] + (["--log-format", "json"] if keep else []),
                               cpus=PROXY_CPUS, stderr=log, env=env))
            wait_http(f"http://127.0.0.1:{GATEWAY}/healthz")
        time.sleep(1.0)
        proxy = [procs[-1].pid]
        if name == "learned-x3":
            proxy = [p.pid for p in procs[len(sims):]]  # the store, replicas and HAProxy
        sim_pids = [p.pid for p in sims]
        before = cpu_seconds(proxy), cpu_seconds(sim_pids)
        result = surge(fl, phases, gateway=(name != "haproxy"))
        result["cpu_s"] = {"proxy": cpu_seconds(proxy) - before[0],
                           "engines": cpu_seconds(sim_pids) - before[1]}
        if name != "haproxy":
            result["refused_by_reason"], result["queue_waits"] = gateway_metrics()
            req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}/admin/status",
                                         headers={"authorization": "Bearer bench"})
            with urllib.request.urlopen(req, timeout=5) as r:
                status = json.load(r)
            result["admission_limit_tokens"] = {s["id"]: s["admission_limit_tokens"]
                                                for s in status["shards"]}
            result["learned_slots"] = {s["id"]: s.get("learned_slots") for s in status["shards"]}
            result["drain_tokens_per_s"] = status["admission"]["drain_tokens_per_s"]
        return result
    finally:
        ADMIN = admin_port
        stop(procs)
        time.sleep(0.5)


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def table(results, fl=DEFAULT_FLEET):
    slots = sum(e["slots"] for e in fl["engines"])
    lines = []
    for name, r in results.items():
        lines.append(f"\n**{name}**\n")
        lines.append("| phase | offered | good | good/s sent, delivered | TTFT p50 | TTFT p99 | refused (with Retry-After) "
                     f"| refusal p99 | 5xx | timeouts | cut | critical good | engines: running (of {slots}), waiting "
                     "| engines: completed/s, new connections |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for p in r["phases"]:
            crit = next(t for t in p["tenants"] if t["priority"] == "critical")
            crit_pct = 100.0 * crit["good"] / crit["offered"] if crit["offered"] else None
            lines.append(
                f"| {p['phase']} ({p['rate']:.0f}/s) | {p['offered']:,} | {p['good']:,} | "
                f"{p['good_per_s']:.1f}, {p['good_done_per_s']:.1f} | {fmt(p['ttft_p50_ms'])} ms | {fmt(p['ttft_p99_ms'])} ms | "
                f"{p['refused']:,} ({p['refused_with_retry_after']:,}) | {fmt(p['refusal_p99_ms'], 1)} ms | "
                f"{p['status_5xx'] + p['status_503']} | {p['timeouts']} | {p['cut_streams']} | "
                f"{fmt(crit_pct, 1)} % | {fmt(p.get('engines_running_mean'), 1)}, "
                f"{fmt(p.get('engines_waiting_mean'), 1)} | {fmt(p.get('engines_completed_per_s'), 1)}, "
                f"{fmt(p.get('engines_connections'))} |")
        if "cpu_s" in r:
            lines.append(f"\nCPU during the surge, seconds: proxy {r['cpu_s']['proxy']:.1f}, "
                         f"engines {r['cpu_s']['engines']:.1f}")
        if "refused_by_reason" in r:
            lines.append(f"\nrefusals by priority/reason (the gateway's metrics): {r['refused_by_reason']}")
            lines.append(f"\nlearned admission limits at the end, tokens: {r['admission_limit_tokens']}")
    return "\n".join(lines)


def main():
    only = None
    if "--only" in sys.argv:
        only = sys.argv[sys.argv.index("--only") + 1].split(",")
    targets = [t for t in ("admission", "learned", "no-admission", "haproxy")
               if (only is None and t != "learned") or (only and t in only)]
    if "haproxy" in targets and shutil.which("haproxy") is None:
        sh(["sudo", "apt-get", "install", "-y", "-qq", "haproxy"] if os.geteuid() != 0
           else ["apt-get", "install", "-y", "-qq", "haproxy"])
    sh(["cargo", "build", "--release", "-q", "-p", "breakwater", "-p", "llm-sim",
        "-p", "breakwater-loadgen"], cwd=ROOT)
    os.makedirs(OUT, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in targets:
            results[t] = run_target(t, tmp)
    with open(os.path.join(OUT, "surge.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"# surge: {PHASES}, base {BASE_RATE} req/s, {DEFAULT_FLEET['max_tokens']} tokens per stream"
          + (f"; admission target with [admission] {ADMISSION_SET}" if ADMISSION_SET else "") + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
