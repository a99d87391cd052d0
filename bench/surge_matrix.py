#!/usr/bin/env python3
"""The surge benchmark over a matrix of fleets: engines that behave differently, one run.

Usage:  python3 bench/surge_matrix.py [--quick] [--pin] [--profiles a,b,...]
                                      [--targets learned,admission,haproxy,no-admission,learned-x3]
                                      [--admission-set 'KEY = VALUE; ...']

Admission that was tuned on one engine model can leave slots idle on another. Each profile
below is a fleet of llm-sim engines of one or more behaviours (`--behaviour`: continuous
batching, FIFO slots with a fixed decode rate, decode that slows with the batch, serial
prefill with long prompts, a KV cache that preempts), spanning 4–64 slots, 8–256 tokens,
5–50 ms per token and 20–500 ms base TTFT, one pool of mixed shards, and `capacity_tps`
declared right, at half and at twice the truth. Per profile, each target against freshly
started engines, the same arrivals (seeded Poisson; base a tenth of the fleet's capacity,
then 10x ≈ capacity, 20x = 2x capacity, base again; critical 10 %, standard 60 %,
sheddable 30 %):

  learned       Breakwater, nothing about slots declared (the default policy)
  admission     Breakwater with each shard's slots declared (`max_requests`)
  haproxy       HAProxy, leastconn, maxconn = each engine's slots, timeout queue 500 ms
  no-admission  Breakwater with admission off: the negative control
  learned-x3    three "learned" replicas sharing a redis-server (`[cluster]`) behind HAProxy
                in TCP mode (only when asked for with --targets)

Per target and phase: goodput sent and delivered (bench/surge.py's two counts), admitted
TTFT, refusal latency and `Retry-After`, critical good, 5xx / timeouts / cut streams, the
engines' slot use (running ÷ slots) overall and while the gateway's queue held someone,
and the gateway's queue waits. Results: bench/out/surge_matrix.json and Markdown on stdout.
Every run is bounded (each surge by its phases, each request by the client timeout).
"""
import json
import os
import shutil
import sys
import tempfile

import surge
from surge import engine, fleet

QUICK = "--quick" in sys.argv
# Extra `[admission]` settings for the Breakwater targets, to try one in the same run.
ADMISSION_SET = sys.argv[sys.argv.index("--admission-set") + 1] if "--admission-set" in sys.argv else ""
PHASES = ("base:1:3,10x:10:6,20x:20:6,base-again:1:4" if QUICK
          else "base:1:4,10x:10:10,20x:20:10,base-again:1:5")


def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1].split(",") if flag in sys.argv else None


def four(make, **kw):
    """Four engines of one kind in two regions (two each)."""
    return [make("use-1", "us-east", 19101, **kw), make("use-2", "us-east", 19102, **kw),
            make("euw-1", "eu-west", 19201, **kw), make("euw-2", "eu-west", 19202, **kw)]


def two(make, **kw):
    """Two engines, one per region."""
    return [make("use-1", "us-east", 19101, **kw), make("euw-1", "eu-west", 19201, **kw)]


def requests_per_s(e, tokens, prompt_tokens):
    """What one engine completes at full load, requests/s (computed from its model)."""
    b = e["behaviour"]
    slots = e["slots"]
    extra = dict(zip(e["extra"][::2], e["extra"][1::2]))
    if b == "kv-preempt":
        kv = float(extra.get("--kv-capacity-tokens", 65536))
        slots = min(slots, max(1, int(kv // (prompt_tokens + tokens))))
    itl = e["itl_ms"] / 1000
    if b == "fifo":
        step = itl
    elif b == "slowing-decode":
        step = itl * (1 + float(extra.get("--decode-slowdown", 2.0)))
    else:
        step = max(slots / e["capacity_tps"], itl)
    prefill_rate = e["capacity_tps"] * 10
    if b == "prefill-heavy":
        prefill_rate = float(extra.get("--prefill-tps", 2 * e["capacity_tps"]))
    duration = e["ttft_ms"] / 1000 + tokens * step + prompt_tokens / prefill_rate
    rate = slots / duration
    if b == "prefill-heavy":  # one prompt at a time
        rate = min(rate, prefill_rate / max(prompt_tokens, 1))
    return rate


def profile(name, engines, tokens, prompt_bytes=None, scale=1.0):
    """A fleet whose base rate is a tenth of its computed capacity and whose declared
    `capacity_tps` is the truth (prompt + completion tokens per second) times `scale`."""
    if prompt_bytes:
        lo, hi = map(int, prompt_bytes.split(":"))
        prompt_tokens = (lo + hi) / 2 / 3.6 + 6
    else:
        prompt_tokens = 13  # the short fixed prompt, with the chat template's tokens
    rates = {e["id"]: requests_per_s(e, tokens, prompt_tokens) for e in engines}
    truth = {k: r * (prompt_tokens + tokens) for k, r in rates.items()}
    fl = fleet(engines, tokens, prompt_bytes, declared=truth, declared_scale=scale,
               base_rate=round(sum(rates.values()) / 10, 2), name=name)
    fl["capacity_rps"] = sum(rates.values())
    return fl


def profiles():
    e = engine
    return [
        # The fleet a new user met: FIFO slots, 16 each, 50 ms TTFT, 20 tokens at 20 ms.
        profile("fifo-16", four(e, behaviour="fifo", slots=16, ttft_ms=50, itl_ms=20), 20),
        profile("fifo-16, capacity_tps half", four(e, behaviour="fifo", slots=16, ttft_ms=50,
                                                    itl_ms=20), 20, scale=0.5),
        profile("fifo-16, capacity_tps double", four(e, behaviour="fifo", slots=16, ttft_ms=50,
                                                      itl_ms=20), 20, scale=2.0),
        # Few slots, slow first token, slow tokens, short answers.
        profile("fifo-4, 500 ms TTFT", four(e, behaviour="fifo", slots=4, ttft_ms=500,
                                            itl_ms=50), 8),
        # Continuous batching, wide batch, the batch shares the decode rate.
        profile("continuous-64", two(e, behaviour="continuous", slots=64, capacity_tps=2000,
                                     ttft_ms=20, itl_ms=5), 64),
        # Decode slows as the batch grows (3x at a full batch).
        profile("slowing-decode-32", four(e, behaviour="slowing-decode", slots=32, ttft_ms=100,
                                          itl_ms=10, extra=["--decode-slowdown", "2"]), 24),
        # Long prompts prefilled one at a time: the first token waits on other prompts.
        profile("prefill-heavy", four(e, behaviour="prefill-heavy", slots=16, ttft_ms=50,
                                      itl_ms=15, extra=["--prefill-tps", "20000"]), 16,
                prompt_bytes="2000:8000"),
        # The KV cache, not the slots, bounds the batch: about 24 of 48 fit.
        profile("kv-preempt", two(e, behaviour="kv-preempt", slots=48, capacity_tps=2000,
                                  ttft_ms=20, itl_ms=5,
                                  extra=["--kv-capacity-tokens", "2900"]), 64),
        # One pool per region of mixed shards: FIFO 16 and 8 slots, a slowing 32-slot one,
        # continuous batching with 256 output tokens' worth of room.
        profile("mixed pool", [
            e("use-1", "us-east", 19101, behaviour="fifo", slots=16, ttft_ms=50, itl_ms=20),
            e("use-2", "us-east", 19102, behaviour="slowing-decode", slots=32, ttft_ms=100,
              itl_ms=10, extra=["--decode-slowdown", "2"]),
            e("euw-1", "eu-west", 19201, behaviour="fifo", slots=8, ttft_ms=30, itl_ms=20),
            e("euw-2", "eu-west", 19202, behaviour="continuous", slots=32, capacity_tps=1500,
              ttft_ms=50, itl_ms=10),
        ], 20),
    ]


def summary(rows):
    lines = ["| profile | phase | target | good/s sent, delivered | ÷ HAProxy (sent, delivered) "
             "| admitted TTFT p50 (base) | refusal p99, with Retry-After | critical good "
             "| 5xx, timeouts, cut | slot use, while queued | queue waits > 5 ms | base again p50 after 2 s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for prof, results in rows:
        hp = results.get("haproxy")
        for phase_i, phase_name in ((1, "10x"), (2, "20x")):
            base = None
            for target, r in results.items():
                b = r["phases"][0].get("ttft_p50_ms")
                base = b if target == "haproxy" and b else base
            for target, r in results.items():
                p = r["phases"][phase_i]
                after = r["phases"][3]
                crit = next(t for t in p["tenants"] if t["priority"] == "critical")
                ratio = "–"
                if hp and target != "haproxy":
                    h = hp["phases"][phase_i]
                    ratio = (f"{p['good_per_s'] / max(h['good_per_s'], 1e-9):.2f}, "
                             f"{p['good_done_per_s'] / max(h['good_done_per_s'], 1e-9):.2f}")
                waits = r.get("queue_waits")
                lines.append(
                    f"| {prof['name']} | {phase_name} | {target} | {p['good_per_s']:.1f}, "
                    f"{p['good_done_per_s']:.1f} | {ratio} | {surge.fmt(p['ttft_p50_ms'])} ms "
                    f"({surge.fmt(r['phases'][0]['ttft_p50_ms'])}) | "
                    f"{surge.fmt(p['refusal_p99_ms'], 1)} ms, {p['refused_with_retry_after']}/{p['refused']} | "
                    f"{100.0 * crit['good'] / max(crit['offered'], 1):.1f} % | "
                    f"{p['status_5xx'] + p['status_503']}, {p['timeouts']}, {p['cut_streams']} | "
                    f"{surge.fmt(100 * p.get('slot_use', 0))} %, "
                    f"{surge.fmt(100 * p['slot_use_while_queued']) + ' %' if 'slot_use_while_queued' in p else '–'} | "
                    f"{waits['over_5ms'] if waits else '–'} | "
                    f"{surge.fmt(after.get('ttft_after_2s_p50_ms'))} ms |")
    return "\n".join(lines)


def main():
    only = arg("--profiles")
    targets = arg("--targets") or ["learned", "admission", "haproxy", "no-admission"]
    chosen = [p for p in profiles() if only is None or p["name"].split(",")[0] in only
              or p["name"] in only]
    for tool, package, wanted in (("haproxy", "haproxy", {"haproxy", "learned-x3"}),
                                  ("redis-server", "redis-server", {"learned-x3"})):
        if wanted & set(targets) and shutil.which(tool) is None:
            install = ["apt-get", "install", "-y", "-qq", package]
            surge.sh(install if os.geteuid() == 0 else ["sudo"] + install)
    surge.sh(["cargo", "build", "--release", "-q", "-p", "breakwater", "-p", "llm-sim",
              "-p", "breakwater-loadgen"], cwd=surge.ROOT)
    os.makedirs(surge.OUT, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prof in chosen:
            print(f"# profile {prof['name']}: about {prof['capacity_rps']:.0f} requests/s, "
                  f"base {prof['base_rate']}/s, declared {prof['declared']}", file=sys.stderr,
                  flush=True)
            results = {t: surge.run_target(t, tmp, prof, PHASES, admission_set=ADMISSION_SET)
                       for t in targets}
            rows.append((prof, results))
            with open(os.path.join(surge.OUT, "surge_matrix.json"), "w") as f:
                json.dump([{"profile": p, "results": r} for p, r in rows], f, indent=1)
    print(f"# surge matrix: {PHASES}\n")
    for prof, _ in rows:
        print(f"- {prof['name']}: {len(prof['engines'])} engines, about "
              f"{prof['capacity_rps']:.0f} requests/s computed, base {prof['base_rate']}/s, "
              f"{prof['max_tokens']} tokens, declared capacity_tps {prof['declared']}")
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
