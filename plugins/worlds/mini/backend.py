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
    #: v3's models by role ("auto" on a v3 backend picks these)
    V3_MODELS: ClassVar[dict[str, str]] = {
        "face-detector": "mini-v3", "face-embedder": "mini-v3", "clip": "mini-v3", "x4-upscaler": "mini-v3",
        "face-restorer": "mini-v3", "pixel-diffusion": "mini-v3"}

    class Params(Params):
        resolution: Literal[64] = 64
        #: the world's version: v2 (protocol 1's world, the default until protocol 2 lands) or v3
        version: Literal["v2", "v3"] = "v2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params.version == "v3":
            self.default_models = self.V3_MODELS  # the instance's: find_model reads it from the backend

    def fingerprint(self) -> str:
        from .models import fingerprint, weights_dir, weights_present

        version = self.params.version
        missing = weights_present(version=version)
        if missing:
            raise WeightsUnavailableError(missing)
        # v2's fingerprint keeps its old form: protocol 1's stage keys stay valid
        prefix = "mini" if version == "v2" else f"mini-{version}"
        return f"{prefix}-{fingerprint(weights_dir(version))}"

    def describe(self) -> str:
        return f"benchbase-mini {self.params.version} (trained 64-px world, weights shipped with benchbase)"

    def load(self, device: torch.device, dtype: torch.dtype) -> SDModels:
        from .models import ensure_folder

        return load_sd(str(ensure_folder("pipeline", self.params.version)), device, dtype, self.params.resolution)
