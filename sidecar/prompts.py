"""Benchmark-style jobs like the seed run's: a style, a concrete noun, a scene, a LoRA tag; the seed
job's negative prompt and settings (512x512, ``k_euler_a``, which the worker maps to "Euler a", 15
steps, CFG 7, one image). Each job also gets an image seed, so a rerun renders the same images.

Reproducible: the same ``seed`` gives the same jobs, with ids ``job-<seed>-<index>``, so producers that
split the work by seed never collide. 6 styles x 40 nouns x 16 scenes x 4 LoRAs make 15,360 prompts;
with the image seed, every job of a 10 M run differs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

NOUNS = (
    "red bicycle",
    "lighthouse",
    "teapot",
    "vintage typewriter",
    "fox",
    "sailboat",
    "oak tree",
    "robot",
    "steam locomotive",
    "owl",
    "violin",
    "castle",
    "hot air balloon",
    "cactus",
    "astronaut",
    "koi fish",
    "motorcycle",
    "windmill",
    "grand piano",
    "tiger",
    "paper lantern",
    "treehouse",
    "submarine",
    "cathedral",
    "pocket watch",
    "hummingbird",
    "wooden cabin",
    "dragon",
    "food truck",
    "jellyfish",
    "tram",
    "sunflower",
    "samurai helmet",
    "camper van",
    "polar bear",
    "chess set",
    "telescope",
    "greenhouse",
    "parrot",
    "bridge",
)
SCENES = (
    "in a misty forest at dawn",
    "on a rainy city street at night",
    "on a sunny beach",
    "in a snowy mountain village",
    "in a neon-lit alley",
    "in a quiet library",
    "under a starry sky",
    "in a desert at sunset",
    "in a flower meadow",
    "inside a cozy kitchen",
    "on a foggy harbor",
    "in an autumn park",
    "floating in outer space",
    "in an underwater cave",
    "on a rooftop garden",
    "in a busy market",
)
STYLES = (
    "photograph, 35mm, highly detailed",
    "oil painting, impressionist",
    "watercolor illustration",
    "digital art, concept art",
    "studio lighting, product photo",
    "cinematic still, volumetric light",
)
LORAS = (
    "<lora:add_detail:0.6>",
    "<lora:epi_noiseoffset:0.8>",
    "<lora:film_grain:0.5>",
    "<lora:more_details:0.7>",
)
NEGATIVE = "blurry, low quality, lowres, bad anatomy, deformed, watermark, text, signature, jpeg artifacts"


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def generate_jobs(count: int, seed: int = 0, prefix: str = "job") -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for index in range(count):
        style, noun, scene, lora = (
            rng.choice(STYLES),
            rng.choice(NOUNS),
            rng.choice(SCENES),
            rng.choice(LORAS),
        )
        prompt = f"{style}, {_article(noun)} {noun} {scene} {lora}"
        yield {
            "id": f"{prefix}-{seed}-{index:08d}",
            "prompt": prompt,
            "negative_prompt": NEGATIVE,
            "seed": rng.randrange(0, 2**32),
            "sampler_name": "k_euler_a",
            "steps": 15,
            "cfg_scale": 7,
            "width": 512,
            "height": 512,
            "batch_size": 1,
        }
