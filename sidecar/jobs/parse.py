"""From queue message text to a ``Job``: decoding, validation, the limits; or InvalidJob naming the
field and the reason.

A message is UTF-8 JSON, raw or base64-encoded (the way Azure Functions producers write it); ``{`` is
not a base64 character, so the two never collide.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pydantic import ValidationError

from sidecar.errors import InvalidJob
from sidecar.jobs.job import Job
from sidecar.jobs.limits import Limits, check_limits
from sidecar.jobs.spec import NAME_PATTERN, JobSpec, valid_job_id

MAX_MESSAGE_BYTES = 64 * 1024


def decode_message(text: str) -> bytes:
    """The JSON bytes of a message, raw or base64-encoded."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidJob("message", f"is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    stripped = raw.strip()
    if stripped.startswith(b"{"):
        return stripped
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidJob("message", "is not a JSON object, raw or base64-encoded") from None
    if not decoded.strip().startswith(b"{"):
        raise InvalidJob("message", "base64 text does not decode to a JSON object")
    return decoded.strip()


def _first_error(error: ValidationError) -> InvalidJob:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"]) or "message"
    kind = first["type"]
    if kind == "extra_forbidden" and first["loc"] and first["loc"][-1] == "":
        return InvalidJob("message", "has an empty key")
    if kind == "extra_forbidden":
        return InvalidJob(loc, "is not an allowed field")
    if kind == "finite_number":
        shown = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(str(first.get("input")), "that")
        return InvalidJob(loc, f"must be a finite number, not {shown}")
    if kind == "missing":
        return InvalidJob(loc, "is required")
    if kind == "json_invalid":
        return InvalidJob("message", f"is not valid JSON ({first['msg']})")
    if kind == "model_type":
        return InvalidJob(loc, "must be a JSON object")
    if kind == "string_pattern_mismatch":
        pattern = str((first.get("ctx") or {}).get("pattern", ""))
        if pattern == NAME_PATTERN.pattern:
            return InvalidJob(loc, "must be a name, not a path (no '/', '\\', '..' or control characters)")
        return InvalidJob(loc, "contains control characters")
    return InvalidJob(loc, str(first["msg"]).removeprefix("Value error, "))


def job_id_hint(text: str) -> str | None:
    """The producer's job id of a message that failed validation, when one can be read safely.

    Anything can be in such a message (1,000 levels of nesting make ``json`` raise RecursionError):
    no error of reading it may escape, the hint is only a courtesy."""
    try:
        data = json.loads(decode_message(text))
        job_id = data.get("id") if isinstance(data, dict) else None
    except Exception:
        return None
    if isinstance(job_id, str) and valid_job_id(job_id):
        return job_id
    return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidJob(
                key or "message", "appears twice in the message" if key else "has two empty keys"
            )
        seen[key] = value
    return seen


def parse_job(text: str, message_id: str, limits: Limits | None = None) -> Job:
    """Turn a queue message into a Job, or raise InvalidJob naming the field and the reason."""
    data = decode_message(text)
    try:
        spec = JobSpec.model_validate_json(data)
    except ValidationError as error:
        raise _first_error(error) from None
    check_limits(spec, limits or Limits())
    # A duplicate key is a producer's bug: which of the two did it mean? (The model read the last.)
    received = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    job_id = spec.id or message_id
    if not valid_job_id(job_id):
        raise InvalidJob("id", "the message id cannot serve as a job id")
    return Job(id=job_id, spec=spec, received=received)
