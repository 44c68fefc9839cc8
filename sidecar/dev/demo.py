"""The main job on the embedded default: local Azurite + the A1111 stand-in + the worker over sample jobs.

Everything runs on this machine; the images are copied out of the emulator into a local folder at
the end, since the in-memory emulator forgets them when it stops.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
from pathlib import Path

from sidecar.app import run_worker
from sidecar.config import load_settings
from sidecar.dev.devenv import azurite, standin
from sidecar.enqueue import enqueue, lines_of
from sidecar.storage import Storage

# the same jobs as examples/jobs.jsonl, shipped in the package so that an installed demo has them
SAMPLE_JOBS = "sample-jobs.jsonl"


async def demo(jobs: Path | None, out: Path) -> int:
    """Run the demo over ``jobs`` (a JSONL file; None: the bundled sample jobs)."""
    with contextlib.ExitStack() as stack:
        if jobs is None:
            sample = importlib.resources.files(__package__ or "sidecar.dev") / SAMPLE_JOBS
            jobs = stack.enter_context(importlib.resources.as_file(sample))
        elif not jobs.is_file():
            raise SystemExit(f"demo: no job file {jobs}")
        return await _demo(jobs, out)


async def _demo(jobs: Path, out: Path) -> int:
    print("starting Azurite (storage emulator) and the A1111 stand-in ...")
    async with azurite() as storage_server, standin(seconds_per_image=0.25) as a1111:
        settings = load_settings(
            {
                "storage_connection_string": storage_server.connection_string,
                "a1111_url": a1111.url,
                "queue_name": "jobs",
                "container_name": "images",
                "log_format": "text",
            }
        )
        storage = Storage.connect(settings)
        try:
            await storage.ensure()
            report = await enqueue(storage, settings.queue_name, lines_of(jobs))
            print(f"enqueued {report.sent} sample job(s) from {jobs}")
            code = await run_worker(settings, exit_when_empty=True)
            if code != 0:
                print(f"the worker exited with {code}")
                return code
            return await _copy_out(storage, out, settings.container_name)
        finally:
            await storage.close()


async def _copy_out(storage: Storage, out: Path, container: str) -> int:
    count = 0
    print(f"\nimages in blob container '{container}' at {storage.container.url}:")
    async for blob in storage.container.list_blobs():
        target = out / blob.name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = await (await storage.container.download_blob(blob.name)).readall()
        target.write_bytes(data)
        if blob.name.endswith(".png"):
            count += 1
            print(f"  {blob.name:<44} {len(data) / 1024:7.0f} KB  -> {target}")
        elif blob.name.endswith("job.json"):
            seeds = json.loads(data).get("info", {}).get("all_seeds")
            print(f"  {blob.name:<44} seeds {seeds}")
    print(f"\n{count} image(s) copied to {out.resolve()}")
    return 0 if count else 1
