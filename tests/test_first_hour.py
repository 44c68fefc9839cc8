"""A newcomer's first hour: the demo beside something on port 8000, its contact sheet and its output
folder; a typo in a queue's name being an error; usage errors, a closed pipe, plurals; generated ids
that differ between runs. The CLI runs as real subprocesses against the session's Azurite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from PIL import Image, ImageStat

from sidecar.config import Settings
from sidecar.dev.demo import MARKER, MOSAIC
from sidecar.dev.mosaic import sheet_size, tile_box
from sidecar.status import Shard, Snapshot, render
from sidecar.storage import Storage
from tests.conftest import ROOT, run_cli, settings_env
from tests.helpers import queue_texts

SAMPLE = ROOT / "sidecar" / "dev" / "sample-jobs.jsonl"


def _demo(jobs: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--jobs", str(jobs), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@contextlib.contextmanager
def _port_8000_taken() -> Any:
    """Listen on 8000 for the test's length (if something else already does, it is taken anyway)."""
    sock = socket.socket()
    try:
        with contextlib.suppress(OSError):
            sock.bind(("0.0.0.0", 8000))
            sock.listen()
        yield
    finally:
        sock.close()


def _sample_lines(*numbers: int) -> list[str]:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    return [lines[n] for n in numbers]


@pytest.mark.timeout(400)
def test_the_demo_beside_port_8000_makes_a_contact_sheet_and_replaces_its_own_output(
    tmp_path: Path, azurite_server: Any
) -> None:
    """Steps: port 8000 taken, the demo over two sample jobs (one of them with two images): it ends 0,
    says where the worker's endpoints are (not 8000), and writes a mosaic with one tile per image;
    a second run over another job replaces the folder (no stale job folder); a folder the demo did
    not write is refused, untouched."""
    out = tmp_path / "out"
    first = tmp_path / "first.jsonl"
    lines = _sample_lines(0, 1)
    first.write_text("\n".join(lines) + "\n")
    with _port_8000_taken():
        done = _demo(first, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (port,) = set(re.findall(r"http://127\.0\.0\.1:(\d+)/healthz", done.stdout))
    assert int(port) != 8000
    # no Azurite address that is dead once the demo ends; it says how to keep one instead
    assert "devstoreaccount1" not in done.stdout
    assert "Running the pieces yourself" in done.stdout

    ids = [json.loads(line)["id"] for line in lines]
    images = sorted(out.glob("*/*.png"))
    expected = sum(json.loads(line).get("batch_size", 1) for line in lines)
    assert len(images) == expected and {p.parent.name for p in images} == set(ids)
    assert f"({expected} tiles," in done.stdout
    with Image.open(out / MOSAIC) as sheet:
        assert sheet.size == sheet_size(len(images))
        for position in range(len(images)):  # every tile holds an image: not one flat colour
            tile = sheet.crop(tile_box(position, len(images))).convert("L")
            assert ImageStat.Stat(tile).stddev[0] > 10, position

    second = tmp_path / "second.jsonl"
    (line,) = _sample_lines(2)
    second.write_text(line + "\n")
    again = _demo(second, out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"replacing the previous demo output in {out}" in again.stdout
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [json.loads(line)["id"]]
    assert (out / MARKER).is_file() and (out / MOSAIC).is_file()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = _demo(second, foreign)
    assert refused.returncode != 0 and "did not write" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# --- a queue that does not exist -------------------------------------------------------------------


def _strict(make_settings: Any, **overrides: Any) -> Settings:
    settings: Settings = make_settings(create_queues=False, **overrides)
    return settings


async def _exists(settings: Settings, queue: str) -> bool:
    storage = Storage.connect(settings)
    try:
        await storage.queue(queue).get_queue_properties()
        return True
    except ResourceNotFoundError:
        return False
    finally:
        await storage.close()


async def test_enqueue_to_a_missing_queue_is_an_error_unless_asked_to_create_it(make_settings: Any) -> None:
    settings = _strict(make_settings)
    queue = settings.queue_name[0]
    refused = await asyncio.to_thread(run_cli, settings, "enqueue", "--generate", "2")
    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()
    assert f"queue {queue} does not exist" in line and "--create-queues" in line
    assert not await _exists(settings, queue)

    made = await asyncio.to_thread(run_cli, settings, "enqueue", "--generate", "2", "--create-queues")
    assert made.returncode == 0, made.stderr
    assert await _exists(settings, queue)
    # the queue exists now: no flag needed
    again = await asyncio.to_thread(run_cli, settings, "enqueue", "--generate", "1")
    assert again.returncode == 0, again.stderr


async def test_the_worker_on_a_missing_queue_exits_1_naming_it(make_settings: Any, tmp_path: Path) -> None:
    settings = _strict(make_settings)
    queue = settings.queue_name[0]
    done = await asyncio.to_thread(run_cli, settings, "run", "--exit-when-empty")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    errors = [entry["msg"] for entry in lines if entry.get("level") in ("error", "ERROR")]
    assert any(f"queue {queue}," in text and "not exist" in text for text in errors), done.stderr
    assert not await _exists(settings, queue)

    made = await asyncio.to_thread(run_cli, settings, "run", "--exit-when-empty", "--create-queues")
    assert made.returncode == 0, made.stderr
    assert await _exists(settings, queue) and await _exists(settings, settings.poison_queue_for(queue))


async def test_status_names_a_missing_shard_and_never_totals_it_as_empty(make_settings: Any) -> None:
    """Steps: two shards, only the first made (with a job on it); ``status`` and ``status --json``
    exit 1 with a line naming the other; the JSON total is null, the missing one listed."""
    tag = uuid.uuid4().hex[:8]
    made, typo = f"made-{tag}", f"mde-{tag}"
    settings = _strict(make_settings, queue_name=f"{made},{typo}")
    setup = await asyncio.to_thread(
        run_cli, _strict(make_settings, queue_name=made), "enqueue", "--generate", "1", "--create-queues"
    )
    assert setup.returncode == 0, setup.stderr

    shown = await asyncio.to_thread(run_cli, settings, "status")
    assert shown.returncode == 1
    (line,) = shown.stderr.splitlines()
    assert f"queue {typo} " in line and f"queue {made} " not in line and "not exist" in line
    assert re.search(rf"^  {typo}\s+missing\s+missing$", shown.stdout, re.MULTILINE), shown.stdout
    assert re.search(r"^  all 2 shards\s+missing\s+missing$", shown.stdout, re.MULTILINE), shown.stdout

    as_json = await asyncio.to_thread(run_cli, settings, "status", "--json")
    assert as_json.returncode == 1
    data = json.loads(as_json.stdout)
    assert data["depth"] is None
    assert f"queue {typo}" in data["missing"] and f"queue {typo}-poison" in data["missing"]
    assert not any(name.startswith(f"queue {made}") for name in data["missing"])
    depths = {shard["queue"]: shard["depth"] for shard in data["shards"]}
    assert depths[typo] is None and depths[made] == 1


# --- usage, pipes, plurals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["enqueue"], "give exactly one of --file or --generate"),
        (["enqueue", "--generate", "0"], "--generate must be at least 1"),
        (["enqueue", "--file", "x.jsonl", "--seed", "3"], "--seed goes with --generate"),
        (["run", "--wait-invisible", "5"], "--wait-invisible takes seconds"),
        (["grant", "--days", "0"], "--days must be"),
        (["status", "--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2_with_the_commands_usage(args: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    usage = "usage: a1111-sidecar" + ("" if "--no-such-flag" in args else f" {args[0]}")
    assert done.stderr.startswith(usage), done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr


async def test_a_closed_pipe_ends_status_quietly(settings: Settings, storage: Storage) -> None:
    """``status | head -1`` with the reader gone before status writes: no traceback, no
    BrokenPipeError, not even the interpreter's "Exception ignored" at exit."""
    process = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "sidecar", "status"],
        env=settings_env(settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before status has read storage
    with process.stderr:
        err = (await asyncio.to_thread(process.stderr.read)).decode()
    code = await asyncio.to_thread(process.wait, 60)
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert code == 1


async def test_counts_are_singular_for_one(settings: Settings) -> None:
    done = await asyncio.to_thread(run_cli, settings, "enqueue", "--generate", "1", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^sent 1 job to .*; 0 bad lines skipped", done.stdout, re.MULTILINE), done.stdout
    shard = Shard("jobs", 1, "jobs-poison", 0)
    one = Snapshot(0.0, [shard], container="images", stored_jobs=1, stored_images=1, scan_limit=10)
    one.finished_last_minute = 1
    text = render(one)
    assert "1 job, 1 image," in text and "last minute: 1 job\n" in text + "\n"
    two = Snapshot(0.0, [shard], container="images", stored_jobs=2, stored_images=3, scan_limit=10)
    assert "2 jobs, 3 images," in render(two)


# --- generated ids ---------------------------------------------------------------------------------


async def _generated_ids(settings: Settings, *args: str) -> list[str]:
    done = await asyncio.to_thread(run_cli, settings, "enqueue", "--generate", "5", *args)
    assert done.returncode == 0, done.stderr
    assert "generated with --seed" in done.stdout
    return [json.loads(text)["id"] for text in await _texts(settings)]


async def _texts(settings: Settings) -> list[str]:
    storage = Storage.connect(settings)
    try:
        return await queue_texts(storage, settings.queue_name[0])
    finally:
        await storage.close()


async def test_generated_ids_differ_between_runs_unless_the_seed_is_given(make_settings: Any) -> None:
    runs = make_settings()
    await _generated_ids(runs)
    ids = await _generated_ids(runs)
    assert len(ids) == 10 and len(set(ids)) == 10

    seeded = make_settings(queue_name=f"seeded-{uuid.uuid4().hex[:8]}")
    first = await _generated_ids(seeded, "--seed", "7")
    both = await _generated_ids(seeded, "--seed", "7")
    assert len(first) == 5 and sorted(both) == sorted(first + first)
