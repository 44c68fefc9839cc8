"""The wire shapes of A1111 v1.10.1's API: the txt2img request as its pydantic v1 model parses it, the
422 bodies pydantic v1 writes, and the error body of A1111's ``api_middleware``.

A1111 runs FastAPI 0.94 on pydantic 1.10, which coerces where pydantic 2 refuses (``1.5`` for an int
is 1, ``true`` for a str is "True", ``"yes"`` for a bool is True) and words its errors differently.
The fields below validate the way v1 did and raise errors already in v1's words, and
``v1_errors`` turns what FastAPI reports into the body v1 would have produced, e.g.
``{"detail":[{"loc":["body","steps"],"msg":"value is not a valid integer","type":"type_error.integer"}]}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

_TRUE = {1, "1", "on", "t", "true", "y", "yes"}
_FALSE = {0, "0", "off", "f", "false", "n", "no"}


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value)  # v1: floats truncate, bools and numeric strings convert
    except (TypeError, ValueError, OverflowError):
        raise _fail("type_error.integer", "value is not a valid integer") from None


def _to_float(value: Any) -> float:
    if isinstance(value, float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _fail("type_error.float", "value is not a valid float") from None


def _to_bool(value: Any) -> bool:
    if value is True or value is False:
        return value
    if isinstance(value, str):
        value = value.lower()
    try:
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    except TypeError:  # unhashable: a list or an object
        pass
    raise _fail("type_error.bool", "value could not be parsed to a boolean")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):  # bool is an int: True becomes "True", as v1 does
        return str(value)
    raise _fail("type_error.str", "str type expected")


def _to_list(value: Any) -> list[Any]:
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    raise _fail("type_error.list", "value is not a valid list")


def _to_dict(value: Any) -> dict[Any, Any]:
    if isinstance(value, dict):
        return value
    try:
        return dict(value)  # v1 also takes a list of pairs
    except (TypeError, ValueError):
        raise _fail("type_error.dict", "value is not a valid dict") from None


def _v1(convert: Callable[[Any], Any], optional: bool = True) -> BeforeValidator:
    def validate(value: Any) -> Any:
        if value is None:
            if optional:
                return None
            raise _fail("type_error.none.not_allowed", "none is not an allowed value")
        return convert(value)

    return BeforeValidator(validate)


Int = Annotated[int | None, _v1(_to_int)]
Float = Annotated[float | None, _v1(_to_float)]
Bool = Annotated[bool | None, _v1(_to_bool)]
Str = Annotated[str | None, _v1(_to_str)]
StrItem = Annotated[str, _v1(_to_str, optional=False)]
StrList = Annotated[list[StrItem] | None, _v1(_to_list)]
Dict = Annotated[dict[str, Any] | None, _v1(_to_dict)]


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: its fields in its order, its defaults, extras ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: Str = ""
    negative_prompt: Str = ""
    styles: StrList = None
    seed: Int = -1
    subseed: Int = -1
    subseed_strength: Float = 0  # an int default: A1111 echoes 0, not 0.0
    seed_resize_from_h: Int = -1
    seed_resize_from_w: Int = -1
    sampler_name: Str = None
    scheduler: Str = None
    batch_size: Int = 1
    n_iter: Int = 1
    steps: Int = 50
    cfg_scale: Float = 7.0
    width: Int = 512
    height: Int = 512
    restore_faces: Bool = None
    tiling: Bool = None
    do_not_save_samples: Bool = False
    do_not_save_grid: Bool = False
    eta: Float = None
    denoising_strength: Float = None
    s_min_uncond: Float = None
    s_churn: Float = None
    s_tmax: Float = None
    s_tmin: Float = None
    s_noise: Float = None
    override_settings: Dict = None
    override_settings_restore_afterwards: Bool = True
    refiner_checkpoint: Str = None
    refiner_switch_at: Float = None
    disable_extra_networks: Bool = False
    firstpass_image: Str = None
    comments: Dict = None
    enable_hr: Bool = False
    firstphase_width: Int = 0
    firstphase_height: Int = 0
    hr_scale: Float = 2.0
    hr_upscaler: Str = None
    hr_second_pass_steps: Int = 0
    hr_resize_x: Int = 0
    hr_resize_y: Int = 0
    hr_checkpoint_name: Str = None
    hr_sampler_name: Str = None
    hr_scheduler: Str = None
    hr_prompt: Str = ""
    hr_negative_prompt: Str = ""
    force_task_id: Str = None
    sampler_index: Annotated[str, _v1(_to_str, optional=False)] = "Euler"
    script_name: Str = None
    script_args: Annotated[list[Any], _v1(_to_list, optional=False)] = []
    send_images: Annotated[bool, _v1(_to_bool, optional=False)] = True
    save_images: Annotated[bool, _v1(_to_bool, optional=False)] = False
    alwayson_scripts: Annotated[dict[str, Any], _v1(_to_dict, optional=False)] = {}
    infotext: Str = None


def v1_errors(errors: Iterable[Any], body: Any) -> list[dict[str, Any]]:
    """FastAPI's (pydantic 2) validation errors as pydantic 1.10 under FastAPI 0.94 reported them."""
    out: list[dict[str, Any]] = []
    for error in errors:
        loc, kind = list(error["loc"]), str(error["type"])
        if kind == "json_invalid":
            out.append(_json_error(loc, body))
        elif kind == "missing":
            out.append({"loc": loc, "msg": "field required", "type": "value_error.missing"})
        elif kind in {"model_attributes_type", "model_type", "dict_type"}:
            out.append({"loc": loc, "msg": "value is not a valid dict", "type": "type_error.dict"})
        else:  # ours, already in v1's words
            out.append({"loc": loc, "msg": str(error["msg"]), "type": kind})
    return out


def _json_error(loc: list[Any], doc: Any) -> dict[str, Any]:
    """value_error.jsondecode, with json.JSONDecodeError's fields as v1 put them in ctx."""
    try:
        json.loads(doc)
    except json.JSONDecodeError as error:
        ctx = {"msg": error.msg, "doc": error.doc, "pos": error.pos, "lineno": error.lineno}
        ctx["colno"] = error.colno
        return {"loc": ["body", error.pos], "msg": str(error), "type": "value_error.jsondecode", "ctx": ctx}
    except (TypeError, ValueError):
        pass
    return {"loc": loc, "msg": "Invalid JSON", "type": "value_error.jsondecode"}


def a1111_error(status: int, error: str, detail: str = "", errors: str = "") -> JSONResponse:
    """The body A1111's api_middleware builds from an exception that escapes an endpoint.

    ``errors`` is ``str(exception)``: empty for an HTTPException under A1111's pinned Starlette 0.26.
    """
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": errors}, status_code=status)


class A1111Failure(Exception):
    """An exception A1111 would raise inside process_images: answered as a 500 in api_middleware's shape."""

    def __init__(self, error: str, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.error, self.message, self.status = error, message, status

    def response(self) -> JSONResponse:
        return a1111_error(self.status, self.error, errors=self.message)


def quote(value: Any) -> Any:
    """infotext_utils.quote: values with separators in them are written as JSON strings."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else value


def merge_style(style_prompt: str, prompt: str) -> str:
    """styles.merge_prompts: a style with {prompt} wraps the prompt, any other is appended with ", "."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)
