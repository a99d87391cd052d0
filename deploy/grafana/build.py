#!/usr/bin/env python3
"""Writes breakwater.json, the Grafana dashboard for Breakwater's Prometheus metrics.

Run it after changing a panel: python3 deploy/grafana/build.py. The JSON is what Grafana
imports or provisions; gateway/tests/metrics.rs checks that every series it queries is one
the gateway exports.
"""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
panels = []
y = 0


def row(title):
    global y
    panels.append({"type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1


def line(cells):
    """One line of panels: (title, unit, [(expr, legend)], kind) each, equal widths."""
    global y
    w = 24 // len(cells)
    for i, (title, unit, targets, kind) in enumerate(cells):
        p = {
            "type": kind,
            "title": title,
            "datasource": DS,
            "gridPos": {"h": 8, "w": w, "x": i * w, "y": y},
            "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + k)}
                        for k, (e, l) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        }
        if kind == "table":
            for t in p["targets"]:
                t["instant"] = True
                t["format"] = "table"
            p["options"] = {"showHeader": True}
        panels.append(p)
    y += 8


def q(quantile, metric, by=""):
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket[{RATE}])))"


row("Fleet")
line([
    ("Requests per second by status", "reqps",
     [(f"sum by (status) (rate(breakwater_requests_total[{RATE}]))", "{{status}}")], "timeseries"),
    ("Refusals per second by reason", "reqps",
     [(f"sum by (reason) (rate(breakwater_refused_total[{RATE}]))", "{{reason}}")], "timeseries"),
    ("Attempts per second by outcome; retries", "reqps",
     [(f"sum by (outcome) (rate(breakwater_upstream_attempts_total[{RATE}]))", "{{outcome}}"),
      (f"rate(breakwater_retries_total[{RATE}])", "retries")], "timeseries"),
])
line([
    ("Time to first token", "s",
     [(q(0.5, "breakwater_time_to_first_byte_seconds"), "p50"),
      (q(0.99, "breakwater_time_to_first_byte_seconds"), "p99")], "timeseries"),
    ("Time per output token (streams)", "s",
     [(q(0.5, "breakwater_time_per_output_token_seconds"), "p50"),
      (q(0.99, "breakwater_time_per_output_token_seconds"), "p99")], "timeseries"),
    ("End-to-end latency; gateway overhead", "s",
     [(q(0.99, "breakwater_request_duration_seconds"), "end to end p99"),
      (q(0.99, "breakwater_gateway_overhead_seconds"), "gateway overhead p99")], "timeseries"),
])
row("Regions and shards")
line([
    ("Requests per second by region", "reqps",
     [(f"sum by (region) (rate(breakwater_requests_total{{region!=\"\"}}[{RATE}]))", "{{region}}")],
     "timeseries"),
    ("Tokens in flight against admission limits, by region", "short",
     [("sum by (region) (breakwater_shard_inflight_tokens)", "{{region}} in flight"),
      ("sum by (region) (breakwater_shard_admission_limit_tokens)", "{{region}} limit")],
     "timeseries"),
    ("Queue depth by priority", "short",
     [("sum by (priority) (breakwater_queue_depth)", "{{priority}}")], "timeseries"),
])
line([
    ("Shard state", "none",
     [("breakwater_shard_state == 1", "")], "table"),
    ("Shards not healthy", "short",
     [("sum by (state) (breakwater_shard_state{state!=\"healthy\"})", "{{state}}")], "timeseries"),
    ("Ejections and drains by shard", "short",
     [("breakwater_shard_ejections", "{{shard}} ejections"),
      ("breakwater_shard_drained", "{{shard}} drained")], "timeseries"),
])
row("Tenants")
line([
    ("Requests per second by tenant", "reqps",
     [(f"sum by (tenant) (rate(breakwater_requests_total[{RATE}]))", "{{tenant}}")], "timeseries"),
    ("Tokens per second by tenant", "short",
     [(f"sum by (tenant) (rate(breakwater_prompt_tokens_total[{RATE}]))", "{{tenant}} prompt"),
      (f"sum by (tenant) (rate(breakwater_completion_tokens_total[{RATE}]))", "{{tenant}} completion")],
     "timeseries"),
    ("Admitted and refused by priority", "reqps",
     [(f"sum by (priority) (rate(breakwater_admitted_total[{RATE}]))", "{{priority}} admitted"),
      (f"sum by (priority) (rate(breakwater_refused_total[{RATE}]))", "{{priority}} refused")],
     "timeseries"),
])
row("GPUs")
line([
    ("GPU memory used", "percentunit",
     [("1 - breakwater_gpu_memory_free_bytes / breakwater_gpu_memory_total_bytes", "{{shard}}")],
     "timeseries"),
    ("GPU utilisation", "percentunit",
     [("breakwater_gpu_utilization_ratio", "{{shard}}")], "timeseries"),
    ("GPU temperature", "celsius",
     [("breakwater_gpu_temperature_celsius", "{{shard}}")], "timeseries"),
    ("GPU verdict", "none",
     [("breakwater_gpu_verdict == 1", "")], "table"),
])
row("Policy")
line([
    ("Policy reloads by result", "short",
     [(f"sum by (result) (increase(breakwater_policy_reloads_total[1h]))", "{{result}}")],
     "timeseries"),
    ("Policy revision and build", "none",
     [("breakwater_policy_info == 1", ""), ("breakwater_build_info", "")], "table"),
])

dashboard = {
    "title": "Breakwater",
    "uid": "breakwater",
    "description": "Breakwater LLM gateway: fleet, regions and shards, tenants, GPUs, policy.",
    "tags": ["breakwater", "llm", "gateway"],
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "timezone": "",
    "templating": {"list": [{
        "name": "datasource", "label": "Prometheus", "type": "datasource",
        "query": "prometheus", "current": {}, "hide": 0,
    }]},
    "annotations": {"list": []},
    "panels": [dict(p, id=i + 1) for i, p in enumerate(panels)],
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "breakwater.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(out)
