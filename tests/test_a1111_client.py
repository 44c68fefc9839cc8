"""The A1111 client on its own: what it says while it waits for A1111 to come up."""

from __future__ import annotations

import logging
import socket

import pytest

from sidecar.a1111 import A1111Client, http_client
from sidecar.errors import A1111Unavailable


async def test_waiting_for_a1111_says_every_so_often_what_it_waits_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A start takes minutes: a line every ``report_every`` s with what the last try got, not silence."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.INFO, logger="sidecar.a1111")
    async with http_client(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(A1111Unavailable, match=f"127.0.0.1:{port} not up after 2s"):
            await A1111Client(http).wait_ready(2.0, 5.0, poll=0.05, report_every=0.5)
    waits = [r for r in caplog.records if r.getMessage().startswith("waiting for A1111 at")]
    assert 2 <= len(waits) <= 4, [r.getMessage() for r in waits]
    assert all(f"Cannot connect to host 127.0.0.1:{port}" in r.getMessage() for r in waits)
    waited = [r.__dict__["waited_s"] for r in waits]
    assert waited == sorted(waited) and waited[0] >= 0.5
    assert all(r.__dict__["stage"] == "a1111_wait" for r in waits)
