"""``enqueue``: validation with line numbers, skip or stop, resume, base64, generated jobs, streaming.

The CLI runs as a real subprocess against the session's Azurite; the reader and the generator are
also checked on their own.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Settings, load_settings
from sidecar.dev.devenv import connection_string
from sidecar.enqueue import EnqueueStopped, JsonlFile, enqueue, generated, lines_of
from sidecar.errors import InvalidJob
from sidecar.jobs import parse_job
from sidecar.progress import Progress, print_bad
from sidecar.prompts import LORAS, NEGATIVE, NOUNS, SCENES, generate_jobs
from sidecar.storage import Storage
from tests.conftest import ROOT, run_cli, settings_env
from tests.helpers import queue_length, visible_messages

SEED_JOB = json.loads((Path(__file__).parent / "data" / "seed_job.json").read_text())


def job(job_id: str, **fields: Any) -> str:
    return json.dumps({**SEED_JOB, "id": job_id, **fields})


# line number -> (text, the field the complaint must name); None: a good line
LINES: list[tuple[str, str | None]] = [
    (job("g1"), None),  # 1
    ("", None),  # 2: blank lines are skipped silently, but still counted
    ("not json {", "message"),  # 3
    (json.dumps({"prompt": "a cat", "colour": "red"}), "colour"),  # 4
    (job("g2"), None),  # 5
    (json.dumps({"prompt": "a cat", "script_name": "x/y.py", "script_args": []}), "script_name"),  # 6
    ("   \t", None),  # 7
    (json.dumps({"prompt": "a cat", "steps": "15"}), "steps"),  # 8: types are strict
    (job("g3"), None),  # 9
    (job("wide", width=1536), "width"),  # 10: above SIDECAR_MAX_WIDTH=1024 (the worker's limits apply)
]
BAD = {number: name for number, (_, name) in enumerate(LINES, start=1) if name}
GOOD = ["g1", "g2", "g3"]


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(text + "\n" for text, _ in LINES))
    return path


@pytest.fixture
def limited(make_settings: Any) -> Settings:
    return make_settings(max_width=1024)  # type: ignore[no-any-return]


async def sent_jobs(settings: Settings) -> list[str]:
    """The texts on the queue now (received and hidden for 30 s)."""
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        return await visible_messages(storage, settings.queue_name[0])
    finally:
        await storage.close()


async def test_bad_lines_are_skipped_with_their_line_numbers(limited: Settings, jobs_file: Path) -> None:
    done = await asyncio.to_thread(run_cli, limited, "enqueue", "--file", str(jobs_file))
    assert done.returncode == 0, done.stderr
    assert "sent 3 jobs" in done.stdout and f"{len(BAD)} bad lines skipped" in done.stdout
    skipped = [line for line in done.stderr.splitlines() if "skipped:" in line]
    assert len(skipped) == len(BAD), done.stderr
    for line, (number, field) in zip(skipped, sorted(BAD.items()), strict=True):
        assert line.startswith(f"enqueue: line {number} skipped: {field}:"), line
    texts = await sent_jobs(limited)
    assert sorted(texts) == sorted(LINES[n - 1][0] for n in (1, 5, 9))  # exactly as written


async def test_stop_on_bad_stops_at_the_first_and_says_where_to_resume(
    limited: Settings, jobs_file: Path
) -> None:
    done = await asyncio.to_thread(run_cli, limited, "enqueue", "--file", str(jobs_file), "--stop-on-bad")
    assert done.returncode == 1
    assert "enqueue: stopped: line 3: message:" in done.stderr
    assert "--start-line 3" in done.stderr
    assert "sent 1 job " in done.stdout
    assert [json.loads(t)["id"] for t in await sent_jobs(limited)] == ["g1"]  # nothing after line 3

    # Resuming after the bad stretch (here: skipping lines 3 to 8) sends the rest, skipping line 10.
    again = await asyncio.to_thread(
        run_cli, limited, "enqueue", "--file", str(jobs_file), "--start-line", "9"
    )
    assert again.returncode == 0, again.stderr
    assert "sent 1 job " in again.stdout and "enqueue: line 10 skipped: width:" in again.stderr
    assert "line 3" not in again.stderr


async def test_base64_messages_decode_to_the_same_jobs(limited: Settings, jobs_file: Path) -> None:
    done = await asyncio.to_thread(run_cli, limited, "enqueue", "--file", str(jobs_file), "--base64")
    assert done.returncode == 0, done.stderr
    texts = await sent_jobs(limited)
    assert len(texts) == 3
    originals = {json.loads(LINES[n - 1][0])["id"]: LINES[n - 1][0] for n in (1, 5, 9)}
    for text in texts:
        assert not text.startswith("{")
        decoded = base64.b64decode(text, validate=True).decode()
        original = originals.pop(json.loads(decoded)["id"])
        assert decoded == original
        assert parse_job(text, "m").spec == parse_job(original, "m").spec  # the worker reads both alike
    assert originals == {}


def test_generated_jobs_are_reproducible_and_look_like_the_seed() -> None:
    first, again = list(generate_jobs(200, seed=7)), list(generate_jobs(200, seed=7))
    other = list(generate_jobs(200, seed=8))
    assert first == again
    assert first != other and {j["prompt"] for j in first} != {j["prompt"] for j in other}
    assert len({j["id"] for j in first}) == 200 and not {j["id"] for j in first} & {j["id"] for j in other}
    assert len({j["prompt"] for j in first}) > 100  # varied
    for spec in first:
        prompt = spec["prompt"]
        assert any(f" {noun} " in prompt for noun in NOUNS), prompt
        assert any(scene in prompt for scene in SCENES), prompt
        assert "<lora:" in prompt and any(prompt.endswith(lora) for lora in LORAS)
        assert not re.search(r"\ba [aeiou]", prompt), prompt  # "an owl", "an astronaut"
        assert spec["negative_prompt"] == NEGATIVE == SEED_JOB["negative_prompt"]
        assert (spec["width"], spec["height"], spec["steps"], spec["cfg_scale"]) == (512, 512, 15, 7)
        assert spec["batch_size"] == 1
        payload = parse_job(json.dumps(spec), "m").txt2img_payload()
        assert payload["sampler_name"] == "Euler a"  # k_euler_a, as the seed wrote it, mapped


async def test_generate_from_the_cli_sends_exactly_those_jobs(settings: Settings) -> None:
    done = await asyncio.to_thread(run_cli, settings, "enqueue", "--generate", "20", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert "sent 20 jobs" in done.stdout
    texts = await sent_jobs(settings)
    assert sorted(texts) == sorted(json.dumps(spec) for spec in generate_jobs(20, 3))
    assert sorted(texts) == sorted(text for _, text in generated(20, 3))


async def test_file_from_stdin(settings: Settings) -> None:
    lines = "".join(job(f"s{i}") + "\n" for i in range(5))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sidecar", "enqueue", "--file", "-"],
        input=lines,
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(t)["id"] for t in await sent_jobs(settings)) == [f"s{i}" for i in range(5)]


def test_reader_numbers_lines_and_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    long_line = json.dumps({"prompt": "x" * 70_000})
    lines = [
        b"\xef\xbb\xbf" + job("bom").encode() + b"\r\n",  # 1: byte order mark, CRLF
        long_line.encode() + b"\n",  # 2: longer than a queue message
        b'{"prompt": "caf\xe9"}\n',  # 3: Latin-1, not UTF-8
        b"\n",  # 4
        job("last").encode(),  # 5: no newline at the end
    ]
    path.write_bytes(b"".join(lines))
    items = list(lines_of(path))
    assert [number for number, _ in items] == [1, 2, 3, 5]
    assert items[0][1] == job("bom") and items[3][1] == job("last")
    assert isinstance(items[1][1], InvalidJob) and "longer than" in str(items[1][1])
    assert isinstance(items[2][1], InvalidJob) and "not UTF-8" in str(items[2][1])
    reader = JsonlFile(path, start_line=3)
    assert [number for number, _ in reader] == [3, 5]
    assert reader.fraction() == 1.0


class FakeQueue:
    """Stands in for the SDK's QueueClient where only enqueue's own cost is measured."""

    def __init__(self) -> None:
        self.count = 0

    async def send_message(self, content: str, time_to_live: int | None = None) -> None:
        self.count += 1
        await asyncio.sleep(0)

    async def close(self) -> None:
        return None


async def test_a_big_file_is_streamed_with_flat_memory(tmp_path: Path) -> None:
    """Steps: 20,000 lines (about 8 MB); enqueue them to a queue client that only counts; the peak of
    memory allocated meanwhile stays far below the file's size."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for _, text in generated(20_000, seed=1):
            handle.write(text + "\n")
    settings = load_settings({"storage_connection_string": connection_string(1, 1), "queue_name": "big"})
    storage = Storage.connect(settings)
    fake = FakeQueue()
    storage._queue_clients["big"] = fake  # type: ignore[assignment]
    try:
        tracemalloc.start()
        report = await enqueue(storage, ["big"], lines_of(path), concurrency=32)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        await storage.close()
    assert report.sent == fake.count == 20_000
    assert path.stat().st_size > 7_000_000
    assert peak < 2_500_000, f"peak {peak} bytes"  # about 1 MB measured: 32 tasks, buffers


async def test_a_failing_send_stops_the_run_and_names_the_line_to_resume_from(settings: Settings) -> None:
    """Steps: the queue does not exist (no ensure), so storage refuses the first send for good; the
    run stops with the report: nothing sent, resume at line 1."""
    storage = Storage.connect(settings)
    try:
        with pytest.raises(EnqueueStopped) as stopped:
            await enqueue(storage, settings.queue_name, generated(50, seed=0), concurrency=4)
    finally:
        await storage.close()
    report = stopped.value.report
    assert report.sent == 0 and report.resume_line == 1
    assert "StorageRefused" in stopped.value.reason and "QueueNotFound" in stopped.value.reason


async def test_interrupt_finishes_sends_in_flight_and_reports(storage: Storage, settings: Settings) -> None:
    stop = asyncio.Event()
    stop.set()  # as if Ctrl-C came at once: nothing is taken
    with pytest.raises(EnqueueStopped) as stopped:
        await enqueue(storage, settings.queue_name, generated(10, seed=0), stop=stop)
    assert stopped.value.report.sent == 0 and stopped.value.report.resume_line == 1
    assert await queue_length(storage, settings.queue_name[0]) == 0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_bar_on_a_terminal_only(storage: Storage, settings: Settings) -> None:
    terminal, log = Terminal(), io.StringIO()
    await enqueue(storage, settings.queue_name, generated(30, seed=0), total=30, progress_stream=terminal)
    await enqueue(storage, settings.queue_name, generated(30, seed=1), total=30, progress_stream=log)
    drawn = terminal.getvalue()
    assert "100%" in drawn and "30 sent" in drawn and "msg/s" in drawn and "ETA" in drawn
    assert drawn.endswith("\n") and "\r" in drawn
    assert log.getvalue() == ""  # a short run off a terminal prints no progress
    assert await queue_length(storage, settings.queue_name[0]) == 60


def test_progress_off_a_terminal_is_plain_lines_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(Progress, "LOG_EVERY", 0.0)
    Progress(None, lambda: 0.25, log).update(100)  # a file a quarter read
    Progress(None, lambda: None, log).update(7)  # stdin: no size, so no share and no ETA
    first, second = log.getvalue().splitlines()
    assert re.fullmatch(r"enqueue:  25%  100 sent  [\d,]+ msg/s  ETA \S+", first), first
    assert re.fullmatch(r"enqueue: 7 sent  [\d,]+ msg/s", second), second
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_progress_of_a_file_on_a_terminal_shows_the_share_read_not_a_guessed_count() -> None:
    terminal = Terminal()
    progress = Progress(None, lambda: 0.5, terminal)
    progress.update(40)
    print_bad(terminal)(41, "prompt: is required")
    progress.close(40)
    drawn = terminal.getvalue()
    assert " 50%  40 sent" in drawn and "/80" not in drawn and "80" not in drawn.split("ETA")[0]
    # the skipped line is printed whole on a line of its own, and the bar is drawn again below it
    skipped, bar = [line.rsplit("\r", 1)[-1] for line in drawn.rstrip("\n").split("\n")]
    assert skipped == "enqueue: line 41 skipped: prompt: is required"
    assert bar.startswith("[############------------]  50%  40 sent")
