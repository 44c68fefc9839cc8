"""The stand-in's command line: ``python -m a1111.standin --port 7860 --seconds-per-image 0.25 ...``."""

from __future__ import annotations

import argparse

from a1111.assets import AssetSpec, default_specs, parse_list
from a1111.auth import parse_api_auth
from a1111.generation import Settings


def parse_args(argv: list[str] | None = None) -> Settings:
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None) -> tuple[Settings, str | None]:
    """The stand-in's settings and its ``--api-auth`` value."""
    parser = argparse.ArgumentParser(prog="python -m a1111.standin", description="A1111 API stand-in")
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=7860)
    add("--seconds-per-image", type=float, default=0.25, help="GPU time per image and sampling pass")
    add("--seconds-per-step", type=float, default=0.0, help="added per image and sampling step")
    add("--startup-delay", type=float, default=0.0, help="seconds until txt2img may start")
    add("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add("--strict-samplers", action="store_true", help="404 on unknown samplers (A1111 <= 1.8)")
    add("--fail-next", type=int, default=0, help="fail the next N txt2img calls")
    add("--hang-next", type=int, default=0, help="hang the next N txt2img calls until interrupted")
    add("--crash-after", type=int, default=None, help="exit(1) on the (N+1)-th txt2img call")
    add(
        "--crash-on-prompt",
        default=None,
        metavar="TEXT",
        help="exit(1) on every txt2img whose prompt has TEXT",
    )
    add("--models-dir", default="/stable-diffusion-webui/models", help="where the model files 'are'")
    lists = {kind: ",".join(s.name for s in default_specs() if s.kind == kind) for kind in ("lora", "vae")}
    add("--checkpoints", default=None, help="name[=sha256],... (the first is loaded; default: SD 1.5, SDXL)")
    add("--loras", default=lists["lora"], help="name[=alias],... ('' for none)")
    add("--vaes", default=lists["vae"], help="file[=sha256],... ('' for none)")
    add("--upscalers", default=None, help="name[=path or URL],... besides None/Lanczos/Nearest")
    add("--style", action="append", default=[], metavar="NAME=PROMPT", help="a prompt style (repeatable)")
    add("--no-hashing", action="store_true", help="A1111's --no-hashing: no sha256, no [hash] in titles")
    add("--face-restoration", action="store_true", help="the face-restoration weights are on disk")
    add("--download-seconds", type=float, default=10.0, help="one try to fetch missing weights")
    add("--downloads", choices=["fail", "succeed"], default="fail", help="how such a try ends")
    add(
        "--model-load-seconds",
        "--model-switch-seconds",
        dest="model_load_seconds",
        type=float,
        default=0.0,
        help="loading a checkpoint in place of the loaded one (an override; the default one again for the "
        "job after an override, as A1111 restores only the option); default 0, free as tests want it; "
        "assume 3-5 s for SD 1.5 and 10-20 s for SDXL from a local SSD on a consumer GPU",
    )
    add(
        "--lora-seconds",
        type=float,
        default=0.0,
        help="applying a changed LoRA set (names and weights, none included) to the loaded weights; "
        "default 0; assume 0.2-0.5 s on a consumer GPU (first use of a file adds its read)",
    )
    add("--api-auth", default=None, metavar="USER:PASSWORD[,...]", help="HTTP Basic on /sdapi/v1, as A1111")
    args = vars(parser.parse_args(argv))
    api_auth = args.pop("api_auth")
    if api_auth is not None:
        try:
            parse_api_auth(api_auth)
        except ValueError:
            parser.error("--api-auth takes user:password pairs separated by ','")
    defaults = default_specs()
    assets = parse_list("checkpoint", args.pop("checkpoints") or "")
    assets = assets or [s for s in defaults if s.kind == "checkpoint"]
    assets += parse_list("lora", args.pop("loras")) + parse_list("vae", args.pop("vaes"))
    upscalers = args.pop("upscalers")
    if upscalers is None:
        assets += [s for s in defaults if s.kind == "upscaler"]
    else:
        assets += parse_list("upscaler", upscalers)
    for style in args.pop("style"):
        name, _, prompt = style.partition("=")
        assets.append(AssetSpec(kind="style", name=name, prompt=prompt))
    args["hashing"] = not args.pop("no_hashing")
    return Settings(**args, assets=assets), api_auth
