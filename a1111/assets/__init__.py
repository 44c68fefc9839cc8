"""What the stand-in's A1111 "has on disk": checkpoints, LoRAs, VAEs, upscalers, prompt styles and the
face-restoration weights, and how A1111 v1.10.1 finds each of them by name.

Assets added with ``pending`` are files copied onto the node while A1111 runs: they are on disk but
not in A1111's lists until the list is rescanned (``POST /sdapi/v1/refresh-loras``,
``/refresh-checkpoints``, ``/refresh-vae``). A1111 also rescans the LoRA folder by itself when a
prompt names a LoRA it does not know (networks.load_networks), so such a LoRA is found by txt2img
before any refresh. Upscalers and styles have no refresh endpoint in A1111; here they appear at once.

The modules: ``files`` (the assets themselves), ``specs`` (how they are named from outside) and
``store`` (the folders and A1111's lookups).
"""

from a1111.assets.files import KINDS, Asset, Checkpoint, Kind, Lora, Style, Upscaler, Vae, made_up_sha256
from a1111.assets.specs import AssetRef, AssetSpec, AssetsUpdate, default_specs, parse_list
from a1111.assets.store import AssetStore

__all__ = [
    "KINDS",
    "Asset",
    "AssetRef",
    "AssetSpec",
    "AssetStore",
    "AssetsUpdate",
    "Checkpoint",
    "Kind",
    "Lora",
    "Style",
    "Upscaler",
    "Vae",
    "default_specs",
    "made_up_sha256",
    "parse_list",
]
