"""The configurable bounds of a job: sizes (with the upscaled size of a hires fix), steps, images."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.errors import InvalidJob
from sidecar.jobs.spec import JobSpec


@dataclass(frozen=True)
class Limits:
    """The configurable bounds of a job (SIDECAR_MAX_WIDTH, ...)."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 8


def check_limits(spec: JobSpec, limits: Limits) -> None:
    """The size, step and image limits; with ``enable_hr`` also the upscaled size A1111 would make."""
    for field, value, top in (
        ("width", spec.width, limits.max_width),
        ("height", spec.height, limits.max_height),
        ("hr_resize_x", spec.hr_resize_x, limits.max_width),
        ("hr_resize_y", spec.hr_resize_y, limits.max_height),
    ):
        if value is not None and value > top:
            raise InvalidJob(field, f"{value} is above the limit of {top}")
        if value and value % 8:
            raise InvalidJob(field, f"{value} is not a multiple of 8")
    for field, value in (("steps", spec.steps), ("hr_second_pass_steps", spec.hr_second_pass_steps)):
        if value is not None and value > limits.max_steps:
            raise InvalidJob(field, f"{value} is above the limit of {limits.max_steps}")
    if spec.enable_hr:
        width, height = spec.width or 512, spec.height or 512
        if spec.hr_resize_x or spec.hr_resize_y:
            # A1111 keeps the aspect ratio when only one of them is set
            out_w = spec.hr_resize_x or math.ceil(width * spec.hr_resize_y / height)  # type: ignore[operator]
            out_h = spec.hr_resize_y or math.ceil(height * spec.hr_resize_x / width)  # type: ignore[operator]
            # name the field the producer set (the one over the limit when both are)
            over_x = spec.hr_resize_x and (out_w > limits.max_width or not spec.hr_resize_y)
            field = "hr_resize_x" if over_x else "hr_resize_y"
        else:
            scale = 2.0 if spec.hr_scale is None else spec.hr_scale  # A1111's default
            out_w, out_h = int(width * scale), int(height * scale)
            field = "hr_scale"
        if out_w > limits.max_width or out_h > limits.max_height:
            raise InvalidJob(
                field,
                f"the upscaled image would be {out_w}x{out_h}; the limit is "
                f"{limits.max_width}x{limits.max_height}",
            )
    images = (spec.batch_size or 1) * (spec.n_iter or 1)
    if images > limits.max_images:
        raise InvalidJob("batch_size", f"batch_size*n_iter is {images}; the limit is {limits.max_images}")
