"""Jobs: from queue message text to the txt2img request A1111 gets.

Pure functions and pydantic models, no I/O. A message is UTF-8 JSON, raw or base64-encoded (the way
Azure Functions producers write it); ``{`` is not a base64 character, so the two never collide. Only
the txt2img fields a producer may set are accepted: anything that could run scripts or touch the
node's files, and any unknown field, is refused with the field's name and the reason.

The modules: ``spec`` (the message's model, names and job ids), ``limits`` (the configurable
bounds), ``job`` (a valid job and its txt2img payload, legacy sampler names) and ``parse`` (text to
a job).
"""

from sidecar.jobs.job import LEGACY_SAMPLERS, Job
from sidecar.jobs.limits import Limits, check_limits
from sidecar.jobs.parse import MAX_MESSAGE_BYTES, decode_message, job_id_hint, parse_job
from sidecar.jobs.spec import JOB_ID_PATTERN, JobSpec, ModelOverrides, Name, Seed, Text, valid_job_id

__all__ = [
    "JOB_ID_PATTERN",
    "LEGACY_SAMPLERS",
    "MAX_MESSAGE_BYTES",
    "Job",
    "JobSpec",
    "Limits",
    "ModelOverrides",
    "Name",
    "Seed",
    "Text",
    "check_limits",
    "decode_message",
    "job_id_hint",
    "parse_job",
    "valid_job_id",
]
