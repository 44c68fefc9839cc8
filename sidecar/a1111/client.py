"""The A1111 client: readiness, txt2img and interrupt over an injected httpx.AsyncClient.

A1111 answers its GET endpoints while the model is still loading in a background thread, so only a
small warm-up txt2img proves it usable. txt2img calls are served one at a time behind A1111's queue
lock, and a client that gives up does not cancel the generation: a deadline is followed by
``POST /sdapi/v1/interrupt``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import orjson

from sidecar.a1111.formats import FORMAT_REMAKES, PNG_FORMAT, ImageFormat, head_format
from sidecar.a1111.http import Generation, auth_refused, error_detail
from sidecar.errors import (
    A1111AuthRefused,
    A1111CutShort,
    A1111Rejected,
    A1111ServerError,
    A1111Timeout,
    A1111Unavailable,
    A1111WrongFormat,
    TransientError,
)

log = logging.getLogger("sidecar.a1111")  # the name operators filter on, as before the split

WARM_UP = {
    "prompt": "warm-up",
    "steps": 1,
    "width": 64,
    "height": 64,
    "batch_size": 1,
    "n_iter": 1,
    "send_images": False,
    "save_images": False,
}


class _OptionsRefused(Exception):
    """A1111 refused or did not keep the image options the worker set."""


class A1111Client:
    """A1111's ``POST /sdapi/v1/interrupt`` stops whatever generation runs when it arrives, and that one
    still answers 200 with a partly denoised image (its infotext claims every step). Which one that is
    cannot be known from outside: the one that timed out may have just ended and the one queued behind
    it begun. So every interrupt is counted, and a generation in flight while one was sent is answered
    with ``A1111CutShort`` instead of its images: it is generated again, never stored."""

    def __init__(
        self, http: httpx.AsyncClient, image_format: ImageFormat | None = None, image_quality: int = 80
    ) -> None:
        self.http = http
        self.interrupts = 0
        # With a format, A1111's samples_format and jpeg_quality are set at start (before the
        # warm-up) and every image is checked to be in it; None leaves A1111's options alone.
        self.image_format = image_format
        self.image_quality = image_quality

    async def wait_ready(
        self, timeout: float, generation_timeout: float, poll: float = 1.0, report_every: float = 15.0
    ) -> None:
        """Wait until the API answers, then prove the model works with a warm-up generation.

        A1111 answers its GET endpoints while the model still loads, and a first generation may fail
        (out of memory while loading): both are tried again until ``timeout``. A generation left
        running by a previous worker (killed while its job hung) is interrupted first: nobody waits
        for it, and the warm-up would queue behind it. The warm-up itself has the deadline of any
        generation, not the whole start timeout.
        """
        began = time.monotonic()
        deadline = began + timeout
        reported = began
        last = "no answer yet"
        while True:
            try:
                response = await self.http.get("/sdapi/v1/sd-models", timeout=10.0)
                if response.status_code == 401:
                    raise auth_refused(response, self.http.auth is not None)
                if response.status_code == 200:
                    await self.stop_leftover(generation_timeout)
                    if self.image_format is not None:
                        await self.set_image_options()
                    left = max(1.0, deadline - time.monotonic())
                    await self.txt2img(WARM_UP, timeout=min(generation_timeout, left))
                    log.info("A1111 is ready", extra={"stage": "a1111_ready"})
                    return
                last = f"GET /sdapi/v1/sd-models answered {response.status_code}"
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            except TransientError as error:
                last = f"warm-up generation failed: {error}"
            except A1111Rejected as error:
                raise A1111Unavailable(f"A1111 refused the warm-up generation: {error}") from None
            except A1111AuthRefused as error:  # trying again cannot help: one line, at once
                raise A1111Unavailable(str(error)) from None
            except _OptionsRefused as error:
                raise A1111Unavailable(str(error)) from None
            now = time.monotonic()
            if now + poll > deadline:
                raise A1111Unavailable(f"A1111 at {self.http.base_url} not up after {timeout:.0f}s ({last})")
            if now - reported >= report_every:  # a start takes minutes: say what it waits for
                reported = now
                log.info(
                    "waiting for A1111 at %s: %s",
                    self.http.base_url,
                    last,
                    extra={
                        "stage": "a1111_wait",
                        "waited_s": round(now - began, 1),
                        "gives_up_in_s": round(deadline - now),
                    },
                )
            await asyncio.sleep(poll)

    async def set_image_options(self) -> None:
        """Set A1111's global ``samples_format`` and ``jpeg_quality`` (a per-request override cannot
        work: A1111 encodes after restoring the options) and read them back. _OptionsRefused when
        A1111 refuses them or keeps other values; httpx errors pass (A1111 not answering)."""
        image_format = self.image_format or PNG_FORMAT
        wanted = {"samples_format": image_format.option, "jpeg_quality": self.image_quality}
        response = await self.http.post("/sdapi/v1/options", json=wanted, timeout=10.0)
        if response.status_code == 401:
            raise auth_refused(response, self.http.auth is not None)
        if response.status_code != 200:
            raise _OptionsRefused(
                f"A1111 refused to set its image format (POST /sdapi/v1/options {wanted}: "
                f"{response.status_code} {error_detail(response)})"
            )
        response = await self.http.get("/sdapi/v1/options", timeout=10.0)
        if response.status_code == 401:
            raise auth_refused(response, self.http.auth is not None)
        try:
            options = response.json() if response.status_code == 200 else None
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise _OptionsRefused(
                f"A1111's options could not be read back after setting its image format "
                f"(GET /sdapi/v1/options: {response.status_code})"
            )
        kept = {key: options.get(key) for key in wanted}
        if kept != wanted:
            raise _OptionsRefused(f"A1111 did not keep its image format: set {wanted}, read back {kept}")
        log.info(
            "A1111 encodes %s images",
            image_format.name,
            extra={"stage": "a1111_ready", **wanted},
        )

    async def busy(self) -> bool:
        """Is A1111 generating now? (``/sdapi/v1/progress``: ``state.job`` is set while a job runs.)"""
        response = await self.http.get(
            "/sdapi/v1/progress", params={"skip_current_image": "true"}, timeout=10.0
        )
        if response.status_code != 200:
            return False
        try:
            state = response.json().get("state") or {}
        except ValueError:
            return False
        return bool(state.get("job")) or int(state.get("job_count") or 0) > 0

    async def stop_leftover(self, within: float, poll: float = 0.2) -> None:
        """Interrupt a generation nobody waits for and wait (at most ``within`` s) until it has ended."""
        if not await self.busy():
            return
        log.warning(
            "A1111 is generating for nobody (a previous worker's job): interrupting it",
            extra={"stage": "a1111_ready"},
        )
        await self.interrupt()
        ends = time.monotonic() + within
        while await self.busy():
            if time.monotonic() > ends:
                raise A1111Timeout(f"A1111 still generating {within:.0f}s after an interrupt")
            await asyncio.sleep(poll)

    async def txt2img(
        self, payload: dict[str, Any], timeout: float, after: asyncio.Future[Any] | None = None
    ) -> Generation:
        """One generation. With ``after`` (the request ahead of this one at A1111's queue lock), this
        request is sent at once and waits at A1111, and its deadline starts only once ``after`` is done.

        With an image format set, an answer whose images are in another one (someone changed A1111's
        ``samples_format`` behind the worker's back) is thrown away: the option is set again and the
        generation made again, up to FORMAT_REMAKES times, then A1111WrongFormat. Never stored."""
        expected = self.image_format
        if expected is None:
            return await self._txt2img(payload, timeout, after)
        found = "unrecognised"
        for remake in range(FORMAT_REMAKES + 1):
            generation = await self._txt2img(payload, timeout, after)
            wrong = [kind for kind in map(head_format, generation.images) if kind != expected.name]
            if not wrong:
                generation.image_format = expected
                return generation
            found = wrong[0]
            after = None  # what it waited behind is over
            if remake == FORMAT_REMAKES:
                break
            log.warning(
                "A1111 sent %s images where %s was set (its samples_format was changed behind the "
                "worker's back): not stored; setting it again and generating again",
                found,
                expected.name,
                extra={"stage": "generate", "found": found, "expected": expected.name},
            )
            try:
                await self.set_image_options()
            except (_OptionsRefused, httpx.HTTPError) as error:
                log.warning(
                    "setting A1111's image format again failed: %s", error, extra={"stage": "generate"}
                )
        raise A1111WrongFormat(
            f"A1111 sent {found} images where {expected.name} was set, {FORMAT_REMAKES + 1} times, "
            "its samples_format set again each time; none was stored"
        )

    async def _txt2img(
        self, payload: dict[str, Any], timeout: float, after: asyncio.Future[Any] | None
    ) -> Generation:
        started = time.time()
        interrupts = self.interrupts
        # No read timeout of httpx's own: a queued request legitimately waits a whole generation.
        request = asyncio.ensure_future(
            self.http.post("/sdapi/v1/txt2img", json=payload, timeout=httpx.Timeout(None, connect=10.0))
        )
        try:
            if after is not None:
                await asyncio.wait({after, request}, return_when=asyncio.FIRST_COMPLETED)
                started = time.time()  # A1111 turns to this request now
            # A total deadline: a hung A1111 may keep the connection open without sending anything.
            async with asyncio.timeout(timeout):
                response = await request
        except TimeoutError:
            await self.interrupt()
            raise A1111Timeout(
                f"txt2img did not finish within {timeout:.0f}s; A1111 was interrupted"
            ) from None
        except httpx.HTTPError as error:
            raise A1111Unavailable(f"A1111 unreachable: {type(error).__name__} {error}".strip()) from None
        finally:
            request.cancel()
        finished = time.time()
        if self.interrupts != interrupts:
            raise A1111CutShort("A1111 was interrupted while this generation may have been running")
        if response.status_code >= 500:
            raise A1111ServerError(response.status_code, error_detail(response))
        if response.status_code == 401:
            raise auth_refused(response, self.http.auth is not None)
        if response.status_code >= 400:
            raise A1111Rejected(response.status_code, error_detail(response))
        try:
            # orjson: the body is ~600 KB of base64 per image, parsed on the generation path.
            body = orjson.loads(response.content)
            images = body["images"] or []
            info = orjson.loads(body["info"]) if isinstance(body.get("info"), str) else body.get("info") or {}
        except (ValueError, KeyError, TypeError) as error:
            raise A1111ServerError(response.status_code, f"unreadable txt2img response: {error}") from None
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise A1111ServerError(response.status_code, "txt2img response has no list of images")
        return Generation(
            images=images,
            info=info if isinstance(info, dict) else {},
            started=started,
            finished=finished,
            request=payload,
        )

    async def interrupt(self) -> None:
        """Ask A1111 to stop the current generation; best effort."""
        self.interrupts += 1  # before it is sent: it may land before the answer says so
        try:
            await self.http.post("/sdapi/v1/interrupt", timeout=10.0)
        except httpx.HTTPError as error:
            log.warning("interrupt failed: %s", error)
