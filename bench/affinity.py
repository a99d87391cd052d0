#!/usr/bin/env python3
"""Breakwater cache-affinity benchmark: multi-turn chat sessions with long shared system
prompts against a four-shard pool, affinity off vs session vs prefix, in one run; then the
prefix run again while one shard dies mid-run.

Usage:  python3 bench/affinity.py [--quick]

The fleet: four llm-sim engines in one pool, each with a prefix cache (the simulator skips
the prefill of the cached part of a prompt and reports vLLM's prefix_cache_queries/hits),
bounded by a KV cache of 98,304 tokens (about a third of all the sessions' contexts),
1,000 tokens/s of decode (prefill ten times faster), 64 batch slots, 20 ms base TTFT. Every
variant gets freshly started engines (empty caches).

The sessions: 32 concurrent conversations, each opening with one of four system prompts
(about 6 KB each, shared by eight sessions), then a document of its own (about 8 KB, pasted
in the first user message: a contract, a log, retrieved context, as agent traffic has), and
running 10 turns (6 with --quick) of a short question (about 300 bytes) and a streamed
answer of 24 tokens, whose text joins the history as
the assistant's message, as a chat client does. Each session sends `prompt_cache_key` (its
own id), which `session` affinity routes by; `prefix` affinity hashes the messages.

Admission is off: the benchmark isolates routing (with it on, these 2,000-4,000-token
prompts against 1,000 tokens/s of declared capacity per shard would be refused and queued
by design, and the refusals would dominate every variant alike).

Reported per variant: TTFT p50/p99 (client-measured, to the first `data:` event), the
engines' prefix hit rate (cached prompt tokens / prompt tokens), the load spread (max over
mean of the shards' in-flight tokens, sampled from /admin/status every 100 ms while work is
in flight, averaged), requests failed, and the affinity outcomes the gateway counted.

The death run: prefix affinity, and after a quarter of the run one shard's port closes
(llm-sim `down`: connections refused, open ones cut). Reported: requests that failed —
split into streams cut after their answer had started (no proxy can hide those; the client
gets the error event) and any other failure (which must be 0) — and how fast the dead
shard's sessions moved: the time from the death to each of their next successful answers.

Results: bench/out/affinity.json and a Markdown table on stdout. Every run is bounded.
"""
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
PROD = os.path.join(ROOT, "target", "production")
OUT = os.path.join(ROOT, "bench", "out")
QUICK = "--quick" in sys.argv
SESSIONS = 32
TURNS = 6 if QUICK else 10
SYSTEM_PROMPTS = 4
SHARD_PORTS = [18800 + i for i in range(4)]
CONTROL_PORTS = [18810 + i for i in range(4)]
GATEWAY = 18830
ADMIN = 18831
TOKEN = "bench-admin-token"
MODEL = "bench-chat"
# Each engine's KV cache, tokens: room for about a third of all the sessions' contexts, so
# an engine cannot keep every conversation it has seen (as a GPU's cache cannot), and
# keeping each conversation on one engine is what makes its prefix stay cached.
KV_TOKENS = 98_304

procs = []


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def stop(p):
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    procs.remove(p)


def get_json(url, token=None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def post_json(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()


def system_prompt(i):
    rng = random.Random(i)
    words = ["harbour", "tide", "swell", "breakwater", "pier", "quay", "current", "buoy",
             "pilot", "berth", "dredge", "mooring", "ballast", "keel", "lee", "fetch"]
    text = " ".join(rng.choice(words) for _ in range(900))
    return f"You are assistant {i} of the port authority. Rules: {text}"


def user_message(session, turn):
    """A short question; the first turn also pastes the session's own document (about
    8 KB: a contract, a log, retrieved context), which every later turn builds on."""
    rng = random.Random(session * 1000 + turn)
    words = ["why", "how", "when", "does", "the", "swell", "reach", "the", "inner", "basin",
             "at", "spring", "tide", "clause", "berth", "fee", "vessel", "draught"]
    question = f"Session {session}, question {turn}: " + " ".join(rng.choice(words) for _ in range(50))
    if turn > 0:
        return question
    document = " ".join(rng.choice(words) for _ in range(1600))
    return f"Here is the document for this session:\n{document}\n\n{question}"


def start_fleet():
    sims = []
    for port, control in zip(SHARD_PORTS, CONTROL_PORTS):
        sims.append(start([os.path.join(REL, "llm-sim"), "--listen", f"127.0.0.1:{port}",
                           "--control-listen", f"127.0.0.1:{control}", "--model", MODEL,
                           "--capacity-tps", "1000", "--slots", "64", "--ttft-ms", "20",
                           "--itl-ms", "10", "--kv-capacity-tokens", str(KV_TOKENS)]))
    for port in SHARD_PORTS:
        wait_http(f"http://127.0.0.1:{port}/health")
    return sims


def start_gateway(affinity, tmp):
    d = os.path.join(tmp, f"policy-{affinity}")
    os.makedirs(d, exist_ok=True)
    shards = "\n".join(
        f'[[shards]]\nid = "s{i + 1}"\npool = "p"\nurl = "http://127.0.0.1:{port}"\ncapacity_tps = 1000\n'
        for i, port in enumerate(SHARD_PORTS))
    with open(os.path.join(d, "policy.toml"), "w") as f:
        f.write(f"""
[gateway]
home_region = "local"
[[regions]]
id = "local"
[[pools]]
id = "p"
region = "local"
engine = "vllm"
models = ["{MODEL}"]
affinity = "{affinity}"
[health]
check_interval_ms = 1000
check_timeout_ms = 500
[admission]
enabled = false
{shards}
""")
    gw = start([os.path.join(PROD, "breakwater"), "serve", "--policy", d, "--listen",
                f"127.0.0.1:{GATEWAY}", "--admin-listen", f"127.0.0.1:{ADMIN}", "--threads", "2"],
               env=dict(os.environ, RUST_LOG="warn", BREAKWATER_ADMIN_TOKEN=TOKEN))
    wait_http(f"http://127.0.0.1:{GATEWAY}/v1/models")
    return gw


class Results:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = []
        self.ok = 0
        self.cut_after_output = 0
        self.failed = 0
        self.answers = []  # (session, shard, finished_at)
        self.statuses = {}  # status of the failures that had one


def one_turn(conn, session, messages, res):
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 24, "stream": True,
                       "prompt_cache_key": f"session-{session}"})
    started = time.time()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    shard = resp.getheader("x-breakwater-shard")
    if resp.status != 200:
        resp.read()
        with res.lock:
            res.failed += 1
            res.statuses[resp.status] = res.statuses.get(resp.status, 0) + 1
        return None
    ttft = None
    text = []
    error = False
    done = False
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        if ttft is None:
            ttft = time.time() - started
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            error = True
            continue
        for c in chunk.get("choices", []):
            text.append(c.get("delta", {}).get("content") or "")
    with res.lock:
        if done and not error:
            res.ok += 1
            res.ttft.append(ttft)
            res.answers.append((session, shard, time.time()))
        elif ttft is not None:
            res.cut_after_output += 1
        else:
            res.failed += 1
    return "".join(text) if done and not error else None


def session_loop(session, res, deadline):
    conn = http.client.HTTPConnection("127.0.0.1", GATEWAY, timeout=30)
    messages = [{"role": "system", "content": system_prompt(session % SYSTEM_PROMPTS)}]
    for turn in range(TURNS):
        if time.time() > deadline:
            break
        messages.append({"role": "user", "content": user_message(session, turn)})
        try:
            answer = one_turn(conn, session, messages, res)
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", GATEWAY, timeout=30)
            with res.lock:
                res.failed += 1
            answer = None
        # A client keeps the answer it got (or, after a failure, asks again next turn).
        messages.append({"role": "assistant", "content": answer or ""})
    conn.close()


def sample_spread(stop_at, samples, stop_flag):
    while time.time() < stop_at and not stop_flag.is_set():
        try:
            st = get_json(f"http://127.0.0.1:{ADMIN}/admin/status", TOKEN)
            loads = [s["inflight_tokens"] for s in st["shards"] if s["state"] != "ejected"]
            mean = sum(loads) / len(loads) if loads else 0
            if mean > 0:
                samples.append(max(loads) / mean)
        except Exception:
            pass
        time.sleep(0.1)


def run(affinity, tmp, kill_at=None):
    sims = start_fleet()
    gw = start_gateway(affinity, tmp)
    res = Results()
    deadline = time.time() + 120
    samples, stop_flag = [], threading.Event()
    sampler = threading.Thread(target=sample_spread, args=(deadline, samples, stop_flag))
    sampler.start()
    threads = [threading.Thread(target=session_loop, args=(s, res, deadline)) for s in range(SESSIONS)]
    started = time.time()
    for t in threads:
        t.start()
        time.sleep(0.02)
    killed = None
    if kill_at is not None:
        time.sleep(kill_at)
        killed = ("s1", time.time())
        post_json(f"http://127.0.0.1:{CONTROL_PORTS[0]}/fault", {"mode": "down"})
    for t in threads:
        t.join(timeout=130)
    elapsed = time.time() - started
    stop_flag.set()
    sampler.join()
    stats = [get_json(f"http://127.0.0.1:{c}/stats") for c in CONTROL_PORTS]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5).read().decode()
    outcomes = {}
    for line in metrics.splitlines():
        if line.startswith("breakwater_affinity_total{"):
            o = line.split('outcome="')[1].split('"')[0]
            outcomes[o] = outcomes.get(o, 0) + int(float(line.rsplit(" ", 1)[1]))
    queries = sum(s["prefix_cache_queries_total"] for s in stats)
    hits = sum(s["prefix_cache_hits_total"] for s in stats)
    ttft = sorted(res.ttft)
    out = {
        "affinity": affinity,
        "requests_ok": res.ok,
        "failed": res.failed,
        "cut_after_output": res.cut_after_output,
        "failure_statuses": res.statuses,
        "ttft_p50_ms": 1000 * ttft[len(ttft) // 2] if ttft else None,
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] if ttft else None,
        "prefix_hit_rate": hits / queries if queries else 0.0,
        "load_spread": statistics.mean(samples) if samples else None,
        "requests_per_shard": [s["requests_total"] for s in stats],
        "affinity_outcomes": outcomes,
        "elapsed_s": elapsed,
    }
    if killed:
        # Sessions that had an answer from the dead shard before it died, and how long
        # after the death each got its next answer from another shard.
        _, at = killed
        before = {s for (s, shard, t) in res.answers if shard == "s1" and t < at}
        moved = {}
        for (s, shard, t) in sorted(res.answers, key=lambda a: a[2]):
            if s in before and t > at and s not in moved:
                moved[s] = t - at
        waits = sorted(moved.values())
        out["dead_shard_sessions"] = len(before)
        out["moved_sessions"] = len(moved)
        out["moved_p50_s"] = waits[len(waits) // 2] if waits else None
        out["moved_max_s"] = waits[-1] if waits else None
        out["answers_from_dead_after_death"] = sum(
            1 for (s, shard, t) in res.answers if shard == "s1" and t > at + 0.5)
    stop(gw)
    for s in sims:
        stop(s)
    time.sleep(0.3)
    return out


def fmt(v, digits=1):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def main():
    os.makedirs(OUT, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "llm-sim"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--profile", "production", "-q", "-p", "breakwater",
                    "--bin", "breakwater"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="bw-affinity-")
    results = []
    for affinity in ("none", "session", "prefix"):
        print(f"affinity = {affinity}", file=sys.stderr)
        results.append(run(affinity, tmp))
    print("prefix, one shard dies", file=sys.stderr)
    first = results[2]["elapsed_s"]
    death = run("prefix", tmp, kill_at=first / 4)
    with open(os.path.join(OUT, "affinity.json"), "w") as f:
        json.dump({"variants": results, "death": death}, f, indent=2)
    base = results[0]
    print(f"{SESSIONS} sessions x {TURNS} turns, {SYSTEM_PROMPTS} shared system prompts, 4 shards.\n")
    print("| affinity | TTFT p50 ms | TTFT p99 ms | p50 vs off | prefix hit rate | load spread (max/mean) | spread vs off | failed | outcomes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = base["ttft_p50_ms"] / r["ttft_p50_ms"] if r["ttft_p50_ms"] else None
        spread = r["load_spread"] / base["load_spread"] if r["load_spread"] and base["load_spread"] else None
        print(f"| {r['affinity']} | {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | "
              f"{fmt(ratio, 2)}x lower | {fmt(r['prefix_hit_rate'] * 100)} % | {fmt(r['load_spread'], 2)} | "
              f"{fmt(spread, 2)} | {r['failed'] + r['cut_after_output']} | {r['affinity_outcomes']} |")
    d = death
    print(f"\nOne shard dies after {first / 4:.1f} s (prefix affinity): {d['requests_ok']} answered, "
          f"{d['failed']} failed without output, {d['cut_after_output']} streams cut after their "
          f"answer had started; of the {d['dead_shard_sessions']} sessions on the dead shard, "
          f"{d['moved_sessions']} got their next answer elsewhere, p50 {fmt(d['moved_p50_s'], 2)} s "
          f"and at most {fmt(d['moved_max_s'], 2)} s after the death; answers from the dead shard "
          f"more than 0.5 s after: {d['answers_from_dead_after_death']}. Outcomes: {d['affinity_outcomes']}.")


try:
    main()
finally:
    for p in list(procs):
        try:
            p.kill()
        except Exception:
            pass
