"""What this node's A1111 has, and whether a job can run on it as asked.

A1111 v1.10.1 runs a job whose assets it lacks without a word: a missing LoRA is skipped, an unknown
checkpoint in ``override_settings`` runs the loaded model, an unknown VAE or style is ignored, an
unknown sampler runs "DPM++ 2M" (the recording in tests/data/a1111-v1.10.1 shows each). Others
fail the job (an unknown ``hr_checkpoint_name`` or ``hr_upscaler``, a bad ``hr_sampler_name``), and
some make it fetch weights from the internet on every image (``restore_faces`` without the
face-restoration weights, an upscaler whose ``model_path`` is still a URL). ``Catalog.check`` finds
all of these before the job is sent, from A1111's own lists, matched the way A1111 matches them:

* LoRA: ``<lora:name...>`` and ``<lyco:name...>`` tags (extra_networks' ``<(\\w+):([^>]+)>``, the name
  is the first ``:`` item) against each LoRA's ``name`` and ``alias``, exactly; an alias two LoRAs
  share (and "none") only by name. A1111 reads tags in ``prompt``, the style prompts the job names,
  and with ``enable_hr`` in ``hr_prompt``; it never activates LoRAs in negative prompts, so those
  are checked only with ``check_negative_prompts``.
* ``override_settings.sd_model_checkpoint``: exactly one of a checkpoint's ids, as
  ``checkpoint_aliases`` holds them: title, name (file name relative to the models folder, with
  extension), ``model_name``, the file name without extension, ``name [hash]`` for both names,
  the short hash, the full sha256 (the old 8-digit hash A1111 also takes is not in its API).
* ``hr_checkpoint_name`` (with ``enable_hr``): ``get_closet_checkpoint_match``: those ids, else any
  substring of a title (the shortest title wins), else the same with a trailing ``[...]`` removed.
* ``override_settings.sd_vae``: "Automatic", "None" or a ``/sd-vae`` model_name.
* samplers and schedulers: names only (the API does not take aliases such as ``k_euler_a``); a
  sampler may end in a scheduler's label, name or alias ("DPM++ 2M Karras"); ``hr_sampler_name``
  must be a bare name. Schedulers by name or label.
* ``hr_upscaler`` (with ``enable_hr``): a latent mode or an ``/upscalers`` name; one whose
  ``model_path`` is an http(s) URL has no weights on disk (a download). ``styles``: ``/prompt-styles``.

A miss of something a node can gain while it runs (a LoRA, checkpoint or VAE copied onto it; a
download finished) makes the catalog rescan before it answers: ``POST /sdapi/v1/refresh-loras``,
``/refresh-checkpoints`` or ``/refresh-vae`` (A1111 has no refresh for upscalers and styles: their
lists are only read again), at most once per ``refresh_interval`` for each. ``/refresh-checkpoints``
and ``/refresh-vae`` wait for A1111's queue lock, i.e. behind the generations running or queued.

The modules: ``snapshot`` (A1111's lists at one moment, read from its answers), ``checks`` (a
payload against a snapshot, no I/O) and ``catalog`` (``Catalog``: reading, checking, rescanning).
"""

from sidecar.assets.catalog import Catalog
from sidecar.assets.checks import Problem, ProblemKind, find_problems, lora_names
from sidecar.assets.snapshot import LATENT_UPSCALE_MODES, Checkpoint, Snapshot, read_list
from sidecar.errors import CatalogError  # re-exported: defined in the error tree

__all__ = [
    "LATENT_UPSCALE_MODES",
    "Catalog",
    "CatalogError",
    "Checkpoint",
    "Problem",
    "ProblemKind",
    "Snapshot",
    "find_problems",
    "lora_names",
    "read_list",
]
