#!/usr/bin/env bash
# Offline checks of the shipping files: the Dockerfiles (hadolint), docker-compose.yml (the Compose
# spec's JSON schema, built into check-jsonschema), the Kubernetes manifests and the SaladCloud
# container group (structure and probes), and the A1111 start script (sh -n). No Docker engine and
# no network needed; tests/test_shipping.py runs it and adds cross-file checks.
#
#   scripts/check-shipping.sh [ROOT]    ROOT: the tree to check (default: this repository)
#
# Tools come from the project's .venv when it has them (pip install -e '.[dev]'), else from PATH.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=$(cd "${1:-$repo}" && pwd)

tool() {
    local name
    for name in "$@"; do
        if [ -x "$repo/.venv/bin/$name" ]; then
            printf '%s\n' "$repo/.venv/bin/$name"
            return 0
        fi
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    echo "check-shipping: $1 not found (pip install -e '.[dev]')" >&2
    return 1
}

hadolint=$(tool hadolint)
check_jsonschema=$(tool check-jsonschema)
python=$(tool python python3)

# Every check must work offline: point all proxies at a closed port, so a tool that tries to download
# something (a schema, say) fails here loudly instead of depending on the network by accident.
export HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 ALL_PROXY=http://127.0.0.1:9
export http_proxy=$HTTP_PROXY https_proxy=$HTTPS_PROXY all_proxy=$ALL_PROXY NO_PROXY= no_proxy=

failed=0
step() {
    local name=$1
    shift
    if "$@"; then
        echo "ok    $name"
    else
        echo "FAIL  $name" >&2
        failed=1
    fi
}

step "hadolint: Dockerfile, deploy/docker/Dockerfile.models" \
    "$hadolint" --no-color "$root/Dockerfile" "$root/deploy/docker/Dockerfile.models"

step "compose spec: docker-compose.yml" \
    "$check_jsonschema" --builtin-schema vendor.compose-spec "$root/docker-compose.yml"

step "sh -n: a1111/start-webui.sh" sh -n "$root/a1111/start-webui.sh"

step "manifests: deploy/kubernetes/*.yaml, deploy/salad/container-group.json" \
    "$python" - "$root" <<'PY'
import json
import sys
from pathlib import Path

import yaml

root = Path(sys.argv[1])
problems: list[str] = []


def need(condition: object, message: str) -> bool:
    if not condition:
        problems.append(message)
    return bool(condition)


def env_value(env: list[dict], name: str, default: str) -> str:
    for item in env:
        if item.get("name") == name and "value" in item:
            return str(item["value"])
    return default


# Kubernetes: every document is an object with apiVersion, kind and metadata.name.
documents: list[tuple[str, dict]] = []
files = sorted((root / "deploy" / "kubernetes").glob("*.yaml"))
need(files, "deploy/kubernetes has no *.yaml")
for path in files:
    where = path.relative_to(root)
    try:
        loaded = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    except yaml.YAMLError as error:
        problems.append(f"{where}: not YAML: {error}")
        continue
    need(loaded, f"{where}: no documents")
    for index, doc in enumerate(loaded):
        label = f"{where}[{index}]"
        if not need(isinstance(doc, dict), f"{label}: not a mapping"):
            continue
        for key in ("apiVersion", "kind"):
            need(isinstance(doc.get(key), str) and doc[key], f"{label}: no {key}")
        metadata = doc.get("metadata")
        need(isinstance(metadata, dict) and isinstance(metadata.get("name"), str) and metadata["name"],
             f"{label}: no metadata.name")
        documents.append((label, doc))

deployments = [(label, doc) for label, doc in documents if doc.get("kind") == "Deployment"]
need(deployments, "deploy/kubernetes: no Deployment")
for label, doc in deployments:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    containers = pod.get("containers") or []
    need(containers, f"{label}: no containers")
    for container in containers:
        name = f"{label} container {container.get('name')!r}"
        env = container.get("env") or []
        port = int(env_value(env, "SIDECAR_HTTP_PORT", "8000"))
        grace = float(env_value(env, "SIDECAR_SHUTDOWN_GRACE", "30"))
        expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        for probe, path in expected.items():
            get = (container.get(probe) or {}).get("httpGet")
            if not need(isinstance(get, dict), f"{name}: no {probe} with httpGet"):
                continue
            need(get.get("path") == path, f"{name}: {probe} path is {get.get('path')!r}, not {path}")
            probe_port = ports.get(get.get("port"), get.get("port"))
            need(probe_port == port, f"{name}: {probe} port {get.get('port')!r} is not SIDECAR_HTTP_PORT {port}")
        limits = (container.get("resources") or {}).get("limits") or {}
        need(str(limits.get("nvidia.com/gpu")) == "1", f"{name}: resources.limits nvidia.com/gpu is not 1")
        need(pod.get("terminationGracePeriodSeconds", 30) > grace,
             f"{label}: terminationGracePeriodSeconds must exceed SIDECAR_SHUTDOWN_GRACE ({grace:g})")

deployment_names = {doc["metadata"]["name"] for _, doc in deployments}
scaled = [(label, doc) for label, doc in documents if doc.get("kind") == "ScaledObject"]
need(scaled, "deploy/kubernetes: no KEDA ScaledObject")
for label, doc in scaled:
    spec = doc.get("spec") or {}
    target = (spec.get("scaleTargetRef") or {}).get("name")
    need(target in deployment_names, f"{label}: scaleTargetRef {target!r} is not a Deployment here")
    triggers = [t for t in spec.get("triggers") or [] if t.get("type") == "azure-queue"]
    need(triggers, f"{label}: no azure-queue trigger")
    for trigger in triggers:
        metadata = trigger.get("metadata") or {}
        need(metadata.get("queueName"), f"{label}: azure-queue trigger without queueName")
        need(metadata.get("connectionFromEnv") or trigger.get("authenticationRef"),
             f"{label}: azure-queue trigger without connectionFromEnv or authenticationRef")

# SaladCloud container group (the public API's create request).
salad_path = root / "deploy" / "salad" / "container-group.json"
try:
    group = json.loads(salad_path.read_text(encoding="utf-8"))
except (OSError, ValueError) as error:
    problems.append(f"deploy/salad/container-group.json: {error}")
    group = None
if group is not None:
    container = group.get("container") or {}
    resources = container.get("resources") or {}
    need(group.get("name"), "salad: no name")
    need(container.get("image"), "salad: no container.image")
    for key in ("cpu", "memory"):
        need(isinstance(resources.get(key), int), f"salad: container.resources.{key} is not an integer")
    need(isinstance(resources.get("gpu_classes"), list) and resources["gpu_classes"],
         "salad: container.resources.gpu_classes is empty")
    need(isinstance(container.get("environment_variables"), dict), "salad: no container.environment_variables")
    need(isinstance(group.get("replicas"), int), "salad: no replicas")
    need(group.get("restart_policy") in {"always", "on_failure", "never"}, "salad: bad restart_policy")
    port = int((container.get("environment_variables") or {}).get("SIDECAR_HTTP_PORT", "8000"))
    for probe, path in {"startup_probe": "/readyz", "readiness_probe": "/readyz",
                        "liveness_probe": "/healthz"}.items():
        http = (group.get(probe) or {}).get("http")
        if not need(isinstance(http, dict), f"salad: no {probe} with http"):
            continue
        need(http.get("path") == path, f"salad: {probe} path is {http.get('path')!r}, not {path}")
        need(http.get("port") == port, f"salad: {probe} port {http.get('port')!r} is not SIDECAR_HTTP_PORT {port}")
        for key in ("initial_delay_seconds", "period_seconds", "timeout_seconds", "success_threshold",
                    "failure_threshold"):
            need(isinstance(group[probe].get(key), int), f"salad: {probe}.{key} is not an integer")

for problem in problems:
    print(f"  {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY

if [ "$failed" -ne 0 ]; then
    echo "check-shipping: FAILED" >&2
    exit 1
fi
echo "check-shipping: all passed"
