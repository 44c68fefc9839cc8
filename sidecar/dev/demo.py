"""The main job on the embedded default: local Azurite + the A1111 stand-in + the worker over sample jobs.

Everything runs on this machine; the images are copied out of the emulator into a local folder at
the end, since the in-memory emulator forgets them when it stops. That folder is the demo's own (a
marker file says so): each run replaces it, and refuses to touch a folder the demo did not write. A
contact sheet of every image with its job id and prompt (``mosaic.png``) lies next to the job folders.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import shutil
from pathlib import Path

from sidecar.app import run_worker
from sidecar.config import load_settings
from sidecar.dev.devenv import azurite, free_port, standin
from sidecar.dev.mosaic import Tile, write_mosaic
from sidecar.enqueue import enqueue, lines_of
from sidecar.formatting import plural
from sidecar.storage import Storage

# the same jobs as examples/jobs.jsonl, shipped in the package so that an installed demo has them
SAMPLE_JOBS = "sample-jobs.jsonl"
MARKER = ".a1111-sidecar-demo"  # in the output folder: the demo wrote it, and may replace it
MOSAIC = "mosaic.png"
IMAGE_SUFFIXES = ("png", "webp", "jpeg")  # the worker's image blobs: <job_id>/<i>.<format>
PIECES = 'README, "Running the pieces yourself"'


async def demo(jobs: Path | None, out: Path) -> int:
    """Run the demo over ``jobs`` (a JSONL file; None: the bundled sample jobs)."""
    with contextlib.ExitStack() as stack:
        if jobs is None:
            sample = importlib.resources.files(__package__ or "sidecar.dev") / SAMPLE_JOBS
            jobs = stack.enter_context(importlib.resources.as_file(sample))
        elif not jobs.is_file():
            raise SystemExit(f"demo: no job file {jobs}")
        _check_out(out)
        return await _demo(jobs, out)


def _check_out(out: Path) -> None:
    """Stop before anything starts if ``out`` holds files the demo did not write."""
    if out.exists() and not (out / MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(
            f"demo: {out} holds files the demo did not write (no {MARKER} in it): "
            "remove it, or give another folder with --out"
        )


def _fresh_out(out: Path) -> None:
    if (out / MARKER).is_file():
        shutil.rmtree(out)
        print(f"replacing the previous demo output in {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `python -m sidecar demo`, which replaces this folder on each run\n")


async def _demo(jobs: Path, out: Path) -> int:
    print("starting Azurite (storage emulator) and the A1111 stand-in ...")
    async with azurite() as storage_server, standin(seconds_per_image=0.25) as a1111:
        port = free_port()  # not 8000: something else may listen there
        settings = load_settings(
            {
                "storage_connection_string": storage_server.connection_string,
                "a1111_url": a1111.url,
                "queue_name": "jobs",
                "container_name": "images",
                "create_queues": True,  # a fresh emulator of its own: nothing exists yet
                "http_port": port,
                "log_format": "text",
            }
        )
        storage = Storage.connect(settings)
        try:
            await storage.ensure()
            report = await enqueue(storage, settings.queue_name, lines_of(jobs))
            print(f"enqueued {plural(report.sent, 'job')} from {jobs}")
            print(
                f"the worker's endpoints, while it runs: http://127.0.0.1:{port}/healthz, "
                f"http://127.0.0.1:{port}/readyz, http://127.0.0.1:{port}/metrics"
            )
            code = await run_worker(settings, exit_when_empty=True)
            if code != 0:
                print(f"the worker exited with {code}")
                return code
            return await _copy_out(storage, out, settings.container_name)
        finally:
            await storage.close()


async def _copy_out(storage: Storage, out: Path, container: str) -> int:
    _fresh_out(out)
    images: list[tuple[str, int, bytes]] = []
    prompts: dict[str, str] = {}
    print(f"\nimages in blob container '{container}' (Azurite, in memory):")
    async for blob in storage.container.list_blobs():
        target = out / blob.name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = await (await storage.container.download_blob(blob.name)).readall()
        target.write_bytes(data)
        job_id, _, name = blob.name.rpartition("/")
        stem, _, suffix = name.partition(".")
        if suffix in IMAGE_SUFFIXES and stem.isdigit():
            images.append((job_id, int(stem), data))
            print(f"  {blob.name:<44} {len(data) / 1024:7.0f} KB  -> {target}")
        elif name == "job.json":
            record = json.loads(data)
            prompts[job_id] = str(record.get("job", {}).get("prompt", ""))
            print(f"  {blob.name:<44} seeds {record.get('info', {}).get('all_seeds')}")
    print(f"\n{plural(len(images), 'image')} copied to {out.resolve()}")
    if not images:
        return 1
    tiles = [Tile(job_id, index, prompts.get(job_id, ""), data) for job_id, index, data in images]
    columns, rows = write_mosaic(tiles, out / MOSAIC)
    print(f"contact sheet: {out / MOSAIC} ({plural(len(tiles), 'tile')}, {columns} x {rows})")
    print(
        "Azurite and the stand-in stopped with the demo, and the in-memory emulator forgot the blobs; "
        f"to keep them running and look inside (status, Azure Storage Explorer), see {PIECES}."
    )
    return 0
