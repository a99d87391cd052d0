#!/usr/bin/env python3
"""Offline checks of deploy/: what can be verified without a cluster, a registry or a
container engine. Run by the test suite (gateway/tests/deploy.rs); exits non-zero with one
line per problem.

- Kubernetes: every kustomization (the overlays and gpu-probe/) is rendered — resources,
  namespace, labels and strategic-merge patches, the subset of kustomize these manifests
  use — and every rendered object is validated against the Kubernetes schemas with
  `kubernetes-validate --strict` (unknown fields are errors). When `kubectl` is on the PATH
  the rendering is compared with `kubectl kustomize`'s. The ServiceMonitor (a Prometheus
  Operator CRD, for which no schema is bundled) is checked by hand: it selects the admin
  Service and names a port that Service has.
- Compose: the file parses; every build names a Dockerfile and a stage that exist; every
  file mounted from the repository exists; images pulled from registries are pinned.
- systemd: `systemd-analyze verify` on each unit (with its binaries stubbed, since they are
  not installed here) prints nothing.

Building the images is not checked: it needs base images this machine cannot pull.
"""
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

DEPLOY = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DEPLOY)
problems = []


def problem(msg):
    problems.append(msg)


# --- Kubernetes ---------------------------------------------------------------------------

def merge(base, patch):
    """Strategic merge for what the patches use: maps merge, lists of named maps merge by
    name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        for p in patch:
            i = next((i for i, x in enumerate(out) if x["name"] == p["name"]), None)
            if i is None:
                out.append(copy.deepcopy(p))
            else:
                out[i] = merge(out[i], p)
        return out
    return copy.deepcopy(patch)


KNOWN_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}


def render(directory):
    """The objects a kustomization directory yields."""
    path = os.path.join(directory, "kustomization.yaml")
    with open(path) as f:
        k = yaml.safe_load(f)
    for key in set(k) - KNOWN_KUSTOMIZE_KEYS:
        problem(f"{path}: {key}: not a field this check renders")
    objects = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(directory, r))
        if os.path.isdir(p):
            objects += render(p)
        elif os.path.isfile(p):
            with open(p) as f:
                objects += [d for d in yaml.safe_load_all(f) if d]
        else:
            problem(f"{path}: resources: {r} does not exist")
    for patch in k.get("patches", []):
        p = os.path.join(directory, patch["path"])
        with open(p) as f:
            doc = yaml.safe_load(f)
        target = [o for o in objects
                  if o["kind"] == doc["kind"] and o["metadata"]["name"] == doc["metadata"]["name"]]
        if len(target) != 1:
            problem(f"{p}: patches no object ({doc['kind']} {doc['metadata']['name']})")
            continue
        i = objects.index(target[0])
        objects[i] = merge(objects[i], doc)
    for label in k.get("labels", []):
        for o in objects:
            o["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in k:
        for o in objects:
            if o["kind"] != "Namespace":
                o["metadata"]["namespace"] = k["namespace"]
    return objects


def check_kubernetes():
    kdir = os.path.join(DEPLOY, "kubernetes")
    targets = [os.path.join(kdir, "overlays", d) for d in sorted(os.listdir(os.path.join(kdir, "overlays")))]
    targets.append(os.path.join(kdir, "gpu-probe"))
    targets.append(os.path.join(kdir, "engines"))
    validate = shutil.which("kubernetes-validate")
    if validate is None:
        problem("kubernetes-validate is not installed (pip install kubernetes-validate)")
        return
    kubectl = shutil.which("kubectl")
    for t in targets:
        name = os.path.relpath(t, DEPLOY)
        objects = render(t)
        if not objects:
            problem(f"{name}: renders nothing")
        if kubectl:
            out = subprocess.run([kubectl, "kustomize", t], capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                problem(f"{name}: kubectl kustomize: {out.stderr.strip()}")
            else:
                theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
                key = lambda o: (o["kind"], o["metadata"]["name"])
                if sorted(theirs, key=key) != sorted(objects, key=key):
                    problem(f"{name}: this check's rendering differs from kubectl kustomize's")
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i, o in enumerate(objects):
                if o["apiVersion"].startswith("monitoring.coreos.com/"):
                    check_service_monitor(name, o, objects)
                    continue
                p = os.path.join(tmp, f"{i:02d}-{o['kind']}-{o['metadata']['name']}.yaml")
                with open(p, "w") as f:
                    yaml.safe_dump(o, f)
                files.append(p)
            out = subprocess.run([validate, "--strict", "--quiet", *files],
                                 capture_output=True, text=True, timeout=300)
            for line in (out.stdout + out.stderr).splitlines():
                if line.strip():
                    problem(f"{name}: {line.replace(tmp + '/', '')}")
            if out.returncode != 0 and not (out.stdout + out.stderr).strip():
                problem(f"{name}: kubernetes-validate failed")
        check_gateway_wiring(name, objects)


def check_service_monitor(name, sm, objects):
    selector = sm["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service"
                and all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
    if len(services) != 1:
        problem(f"{name}: ServiceMonitor {sm['metadata']['name']} selects {len(services)} Services, not one")
        return
    ports = {p["name"] for p in services[0]["spec"]["ports"]}
    for e in sm["spec"]["endpoints"]:
        if e["port"] not in ports:
            problem(f"{name}: ServiceMonitor endpoint port {e['port']!r} is not a port of {services[0]['metadata']['name']}")


def check_gateway_wiring(name, objects):
    """What the schemas cannot see: each Service, NetworkPolicy and PodDisruptionBudget
    selects the pods of a workload in the set (the gateway's Deployment, the store's
    StatefulSet), the Secrets the workloads read exist, the policy path names this overlay's
    region."""
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
    for o in objects:
        sel = None
        if o["kind"] == "Service":
            sel = o["spec"]["selector"]
        elif o["kind"] == "NetworkPolicy":
            sel = o["spec"]["podSelector"]["matchLabels"]
        elif o["kind"] == "PodDisruptionBudget":
            sel = o["spec"]["selector"]["matchLabels"]
        if sel is not None and not any(all(labels.get(k) == v for k, v in sel.items())
                                       for labels in pod_labels):
            problem(f"{name}: {o['kind']} {o['metadata']['name']} selects no pod of the set")
    for d in workloads:
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not any(o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"] for o in objects):
                    problem(f"{name}: {c['name']} reads Secret {ref['name']}, which is not in the set")
            if c["name"] == "gateway" and name.startswith("kubernetes/overlays/"):
                region = os.path.basename(name)
                if not any(a.endswith(f"/policies/{region}") for a in c.get("args", [])):
                    problem(f"{name}: the gateway's --policy does not name policies/{region}")


# --- Compose ------------------------------------------------------------------------------

def dockerfile_stages(path):
    with open(path) as f:
        return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", f.read(), re.M | re.I))


def check_compose():
    path = os.path.join(DEPLOY, "docker", "compose.yaml")
    base = os.path.dirname(path)
    with open(path) as f:
        compose = yaml.safe_load(f)
    for name, s in compose["services"].items():
        b = s.get("build")
        if b:
            ctx = os.path.normpath(os.path.join(base, b["context"]))
            dockerfile = os.path.join(ctx, b["dockerfile"])
            if not os.path.isfile(dockerfile):
                problem(f"compose: {name}: no Dockerfile at {b['dockerfile']}")
            elif b.get("target") not in dockerfile_stages(dockerfile):
                problem(f"compose: {name}: {b.get('target')!r} is not a stage of {b['dockerfile']}")
        else:
            image = s.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag or tag == "latest":
                problem(f"compose: {name}: image {image!r} is not pinned to a version")
        for v in s.get("volumes", []):
            source = v.split(":", 1)[0]
            if source.startswith(".") and not os.path.exists(os.path.join(base, source)):
                problem(f"compose: {name}: mounts {source}, which does not exist")
        for d in s.get("depends_on", []):
            if d not in compose["services"]:
                problem(f"compose: {name}: depends on unknown service {d}")


# --- systemd ------------------------------------------------------------------------------

def check_systemd():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        problem("systemd-analyze is not installed (Debian package systemd)")
        return
    units = sorted(f for f in os.listdir(os.path.join(DEPLOY, "systemd")) if f.endswith(".service"))
    with tempfile.TemporaryDirectory() as tmp:
        stubs = os.path.join(tmp, "bin")
        os.makedirs(stubs)
        for binary in ("breakwater", "gpu-probe"):
            p = os.path.join(stubs, binary)
            with open(p, "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(p, 0o755)
        copies = []
        for u in units:
            with open(os.path.join(DEPLOY, "systemd", u)) as f:
                text = f.read().replace("/usr/local/bin/", stubs + "/")
            p = os.path.join(tmp, u)
            with open(p, "w") as f:
                f.write(text)
            copies.append(p)
        out = subprocess.run([analyze, "verify", "--man=no", *copies], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
        # Warnings (an unknown key, a bad value) leave the exit code at 0: any output fails.
        for line in (out.stdout + out.stderr).splitlines():
            if line.strip():
                problem(f"systemd: {line.replace(tmp + '/', '')}")
        if out.returncode != 0 and not (out.stdout + out.stderr).strip():
            problem("systemd: systemd-analyze verify failed")


def main():
    check_kubernetes()
    check_compose()
    check_systemd()
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in deploy/", file=sys.stderr)
        sys.exit(1)
    print("deploy/ OK: Kubernetes (schemas, wiring), compose, systemd")


if __name__ == "__main__":
    main()
