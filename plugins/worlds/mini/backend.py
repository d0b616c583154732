"""The ``mini`` backend: the benchbase-mini world's Stable Diffusion, loaded through
``benchbase.models.sd.load_sd`` from a diffusers folder built once from the shipped weights."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from benchbase.components import Backend, Params
from benchbase.errors import WeightsUnavailableError
from benchbase.models.sd import SDModels, load_sd


class MiniBackend(Backend):
    """benchbase-mini: a trained miniature Stable Diffusion (64 px, x4 VAE, 16×16 latents)
    whose weights ship with benchbase (``benchbase_plugins.worlds.mini``; ``benchbase train-mini``
    rebuilds them). Trained on procedural portraits of ``train-*`` identities; the ``mini`` dataset's
    held-out identities were never seen. Metrics and purifiers asking for an ``"auto"`` model
    get the world's own (``default_models``: face detector, face embedder, CLIP, x4 upscaler).
    """

    default_models: ClassVar[dict[str, str]] = {
        "face-detector": "mini", "face-embedder": "mini", "clip": "mini", "x4-upscaler": "mini"}

    class Params(Params):
        resolution: Literal[64] = 64

    def fingerprint(self) -> str:
        from .models import fingerprint, weights_present

        missing = weights_present()
        if missing:
            raise WeightsUnavailableError(missing)
        return f"mini-{fingerprint()}"

    def describe(self) -> str:
        return "benchbase-mini (trained 64-px world, weights shipped with benchbase)"

    def load(self, device: torch.device, dtype: torch.dtype) -> SDModels:
        from .models import ensure_folder

        return load_sd(str(ensure_folder("pipeline")), device, dtype, self.params.resolution)
