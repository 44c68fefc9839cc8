"""What a user installs: the wheel is lean, the worker runs without the ``tools`` extra, and the
layering the import-linter contracts write down is complete and would catch a wrong-way import.

The wheel is built from a copy of the sources (the working tree is left alone) and installed, with
only the runtime part of requirements.lock, into a fresh virtual environment: no fastapi, uvicorn,
Pillow, matplotlib or psutil there. From it, ``bench`` and ``demo`` answer with one line naming the
extra, and ``a1111-sidecar run`` does real jobs against the session's Azurite and stand-in.
"""

from __future__ import annotations

import asyncio
import email.parser
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import sidecar
from sidecar.config import Settings
from sidecar.storage import Storage
from tests.conftest import ROOT, settings_env
from tests.helpers import blob_names

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRA = "tools"
# what the worker must not pull in: the stand-in's web server and PNGs, the benchmark's chart and stats
NOT_AT_RUN_TIME = {"fastapi", "uvicorn", "httptools", "pillow", "matplotlib", "psutil"}
NOT_IMPORTABLE = ("fastapi", "uvicorn", "httptools", "PIL", "matplotlib", "psutil")
ONE_LINE = {
    command: f"{command} needs the \"{EXTRA}\" extra: pip install 'a1111-sidecar[{EXTRA}]'"
    for command in ("bench", "demo")
}


def _pip(python: Path | str, *args: str, timeout: float = 400) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of what the Dockerfile builds it from."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("sidecar", "a1111"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    _pip(sys.executable, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(source))
    (built,) = dist.glob("a1111_sidecar-*.whl")
    return built


def requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode("utf-8"))
    return [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.timeout(600)
def test_the_wheel_needs_only_what_the_worker_needs(wheel: Path) -> None:
    requirements = requires(wheel)
    unconditional = {canonical(r.name) for r in requirements if r.marker is None}
    assert not unconditional & NOT_AT_RUN_TIME, sorted(unconditional & NOT_AT_RUN_TIME)
    assert {"azure-storage-queue", "httpx", "pydantic", "tqdm"} <= unconditional
    in_extra = {
        canonical(r.name)
        for r in requirements
        if r.marker is not None and r.marker.evaluate({"extra": EXTRA})
    }
    assert NOT_AT_RUN_TIME <= in_extra
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    # the demo's default jobs travel with the package, the same as the checkout's examples/
    sample = archive_text(wheel, "sidecar/dev/sample-jobs.jsonl")
    assert sample == (ROOT / "examples" / "jobs.jsonl").read_text(encoding="utf-8")
    assert {"sidecar/dev/bench.py", "a1111/standin.py"} <= names
    assert not any(name.startswith("tests/") for name in names)


def archive_text(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode("utf-8")


@dataclass
class LeanVenv:
    root: Path
    python: Path
    script: Path  # the a1111-sidecar console script


@pytest.fixture(scope="module")
def lean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> LeanVenv:
    """A fresh venv with the runtime part of requirements.lock (hashes checked) and the wheel."""
    root = tmp_path_factory.mktemp("lean") / "venv"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    runtime = root.parent / "runtime.lock"
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "docker" / "runtime-requirements.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    runtime.write_text(done.stdout, encoding="utf-8")
    _pip(python, "install", "--quiet", "--require-hashes", "--only-binary=:all:", "-r", str(runtime))
    _pip(python, "install", "--quiet", "--no-deps", str(wheel))
    return LeanVenv(root, python, root / "bin" / "a1111-sidecar")


def lean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """No PYTHONPATH, so the installed package is what runs, never this checkout."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.timeout(600)
def test_the_lean_install_has_none_of_the_extra(lean_venv: LeanVenv) -> None:
    probe = (
        "import importlib.util, json, sys, sidecar; "
        "print(json.dumps([sidecar.__file__, [m for m in sys.argv[1:] if importlib.util.find_spec(m)]]))"
    )
    done = subprocess.run(
        [str(lean_venv.python), "-c", probe, *NOT_IMPORTABLE, "tqdm", "azure.storage.queue"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=lean_env(),
        cwd=lean_venv.root,
    )
    where, found = json.loads(done.stdout)
    assert Path(where).is_relative_to(lean_venv.root)  # the installed package, not this checkout
    assert found == ["tqdm", "azure.storage.queue"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("command", ["bench", "demo"])
def test_dev_commands_without_the_extra_name_it_in_one_line(
    lean_venv: LeanVenv, command: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(lean_venv.script), command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=lean_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [ONE_LINE[command]], done.stderr
    assert done.stdout == ""


@pytest.mark.timeout(600)
async def test_the_worker_runs_from_the_lean_install(
    lean_venv: LeanVenv, settings: Settings, storage: Storage, tmp_path: Path
) -> None:
    """Steps: two jobs on the test's queue; ``a1111-sidecar run --max-jobs 2`` from the lean venv,
    against the session's Azurite and stand-in. Both jobs are stored and the queue is empty."""
    queue = storage.queue(settings.queue_name[0])
    for index in range(2):
        job = {
            "id": f"lean-{index}",
            "prompt": "a lighthouse on a cliff",
            "steps": 2,
            "width": 64,
            "height": 64,
        }
        await queue.send_message(json.dumps(job))
    process = await asyncio.create_subprocess_exec(
        str(lean_venv.script),
        "run",
        "--max-jobs",
        "2",
        env=lean_env(settings_env(settings)),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    names = await blob_names(storage)
    assert {"lean-0/job.json", "lean-0/0.png", "lean-1/job.json", "lean-1/0.png"} <= set(names)
    assert not await queue.peek_messages()


# ---------------------------------------------------------------------------------- import-linter


def contract(contract_id: str) -> dict[str, object]:
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    found: dict[str, object] = next(c for c in contracts if c["id"] == contract_id)
    return found


def test_every_product_module_is_under_the_forbidden_contract() -> None:
    children = {name for _, name, _ in pkgutil.iter_modules(sidecar.__path__)}
    sources = contract("product-without-dev")["source_modules"]
    assert isinstance(sources, list)
    assert set(sources) == {f"sidecar.{name}" for name in children - {"dev", "__main__"}}
    layers = contract("layers")
    assert layers["exhaustive"] is True  # a new module must be given its layer


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=tree,
        env={**lean_env(), "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the dev tools import errors too: a cycle as well
        ("sidecar/errors.py", "import sidecar.dev.devenv", {"product-without-dev", "layers", "no-cycles"}),
        ("sidecar/status.py", "import a1111.standin", {"product-without-dev"}),
        ("sidecar/cli/commands.py", "import a1111.standin", {"product-without-dev"}),  # dev only, for the CLI
        ("sidecar/config.py", "import sidecar.worker", {"layers", "no-cycles"}),
    ],
)
def test_the_contracts_catch_a_wrong_way_import(
    tmp_path: Path, module: str, line: str, broken: set[str]
) -> None:
    for package in ("sidecar", "a1111"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a", encoding="utf-8") as handle:
        handle.write(f"\n{line}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout
    names = {str(c["id"]): str(c["name"]) for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
    for contract_id, name in names.items():
        verdict = "BROKEN" if contract_id in broken else "KEPT"
        assert f"{name} {verdict}" in done.stdout, (contract_id, done.stdout[-3000:])
