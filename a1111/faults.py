"""The faults the stand-in injects on request: failures in A1111's error shape, hangs until
interrupted, and crashes (``os._exit(1)`` as a generation starts), as ``POST /standin/faults`` and
the command line set them."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from a1111.shapes import a1111_error


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_next: int = 0
    fail_status: int = 500
    fail_error: str = "OutOfMemoryError"
    fail_message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"
    hang_next: int = 0
    crash_next: bool = False
    crash_after: int | None = None
    crash_on_prompt: str | None = None  # every generation whose prompt contains this text crashes
    # options held at these values (something else on the node keeps setting them): set at once, and
    # POST /sdapi/v1/options answers 200 and leaves them so
    pinned_options: dict[str, Any] = {}

    def take(self, prompt: str | None = None) -> str | None:
        """The fault for the generation that starts now, counting it off."""
        if self.crash_after is not None:
            self.crash_after -= 1
            self.crash_next = self.crash_next or self.crash_after < 0
        if self.crash_next or (self.crash_on_prompt and self.crash_on_prompt in (prompt or "")):
            return "crash"
        for kind in ("fail", "hang"):
            if getattr(self, f"{kind}_next") > 0:
                setattr(self, f"{kind}_next", getattr(self, f"{kind}_next") - 1)
                return kind
        return None

    def failure(self) -> JSONResponse:
        if self.fail_error == "HTTPException":  # A1111 reports an HTTPException's text as "detail"
            return a1111_error(self.fail_status, self.fail_error, detail=self.fail_message)
        return a1111_error(self.fail_status, self.fail_error, errors=self.fail_message)
