"""The README's "Running the pieces yourself" block, run as written (the port variables set to free
ports) in one shell, as a person would type it in one terminal; the sample jobs go through."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from sidecar.config import load_settings
from sidecar.dev.devenv import free_port
from sidecar.storage import Storage
from tests.conftest import ROOT
from tests.helpers import wait_until

SECTION = "## Running the pieces yourself"
PORT_EXPORT = re.compile(r"^export (?:[A-Z_]+=\d+ ?)+$")


def readme_block() -> list[str]:
    """The lines of the first ``sh`` block of the section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    block = re.search(r"^```sh\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert block, f"no sh block in {SECTION!r}"
    return block.group(1).splitlines()


def with_free_ports(lines: list[str]) -> tuple[list[str], dict[str, int]]:
    ports: dict[str, int] = {}
    out = []
    for line in lines:
        if PORT_EXPORT.match(line):
            for name, _ in re.findall(r"([A-Z_]+)=(\d+)", line):
                ports[name] = free_port()
            line = "export " + " ".join(f"{name}={ports[name]}" for name in re.findall(r"([A-Z_]+)=", line))
        out.append(line)
    return out, ports


def test_the_block_sets_every_port_in_variables() -> None:
    lines = readme_block()
    _, ports = with_free_ports(lines)
    assert {"AZURITE_BLOB_PORT", "AZURITE_QUEUE_PORT", "STANDIN_PORT", "SIDECAR_HTTP_PORT"} <= set(ports)
    assert lines[0] == ". .venv/bin/activate"
    # no port written out anywhere else: the test could not move it
    for line in lines:
        if not PORT_EXPORT.match(line):
            assert not re.search(r":\d{4,5}\b|--\w*[pP]ort \d", line), line


@pytest.mark.timeout(300)
async def test_the_pieces_run_as_the_readme_says(tmp_path: Path) -> None:
    if not (ROOT / ".venv" / "bin" / "activate").is_file() or not (ROOT / "node_modules").is_dir():
        pytest.skip("needs .venv and node_modules (make setup)")
    lines, ports = with_free_ports(readme_block())
    jobs = [line for line in (ROOT / "examples" / "jobs.jsonl").read_text().splitlines() if line.strip()]
    script = tmp_path / "pieces.sh"
    script.write_text("set -e\n" + "\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    log = (tmp_path / "pieces.log").open("w")
    shell = await asyncio.to_thread(
        subprocess.Popen,
        ["bash", str(script)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
        f"BlobEndpoint=http://127.0.0.1:{ports['AZURITE_BLOB_PORT']}/devstoreaccount1;"
        f"QueueEndpoint=http://127.0.0.1:{ports['AZURITE_QUEUE_PORT']}/devstoreaccount1;"
    )
    storage = Storage.connect(load_settings({"storage_connection_string": connection}))

    async def all_stored() -> bool:
        try:
            names = {blob.name async for blob in storage.container.list_blobs()}
        except Exception:
            return False
        return sum(name.endswith("/job.json") for name in names) == len(jobs)

    try:
        code = await asyncio.to_thread(shell.wait, 120)  # it returns after status; the rest runs on
        output = (tmp_path / "pieces.log").read_text()
        assert code == 0, output
        assert re.search(r"^sent \d+ jobs? to jobs ", output, re.MULTILINE), output
        assert "a1111-sidecar status" in output
        await wait_until(all_stored, timeout=120, what="the README's jobs stored")
    finally:
        await storage.close()
        await stop_group(shell.pid)
        log.close()


async def stop_group(group: int, timeout: float = 40) -> None:
    """SIGTERM to what the block left running (the worker drains), SIGKILL to what is left after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sig: int = signal.SIGTERM
    while True:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        sig = 0
        if loop.time() > deadline:
            os.killpg(group, signal.SIGKILL)
            return
        await asyncio.sleep(0.2)
