"""The ``tiny`` backend: a random-weight Stable-Diffusion-shaped model built offline from
configs (``models.py``), loaded through ``benchbase.models.sd.load_sd`` as real weights are."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from benchbase.components import Backend, Params
from benchbase.models.sd import SDModels, load_sd


class TinyBackend(Backend):
    """Random-weight Stable-Diffusion-shaped model built offline from configs.

    The numbers it produces test the machinery (stages, caching, budgets), not protection.
    ``"auto"`` models are the tiny world's random stand-ins where it has one (CLIP, x4 upscaler,
    pixel diffusion model, LPIPS); faces use the real defaults (MTCNN, dlib).
    """

    random_weights = True
    default_models: ClassVar[dict[str, str]] = {
        "clip": "tiny", "x4-upscaler": "tiny", "pixel-diffusion": "tiny", "lpips": "tiny"}

    class Params(Params):
        preset: Literal["tiny", "small"] = "tiny"
        seed: int = Field(0, ge=0)
        resolution: int = Field(64, ge=8, multiple_of=8)
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def _config(self) -> dict:
        from .models import tiny_config

        p = self.params
        return tiny_config(p.preset, p.seed, p.resolution, p.prediction_type)

    def fingerprint(self) -> str:
        from .models import fingerprint

        return f"tiny-{fingerprint(self._config())}"

    def describe(self) -> str:
        p = self.params
        return (f"benchbase tiny backend, preset {p.preset!r}, RANDOM weights (seed {p.seed}), "
                f"{p.resolution} px, {p.prediction_type}")

    def folder(self) -> Path:
        from .models import ensure_tiny_folder

        p = self.params
        return ensure_tiny_folder(p.preset, p.seed, p.resolution, p.prediction_type)

    def load(self, device: torch.device, dtype: torch.dtype) -> SDModels:
        return load_sd(str(self.folder()), device, dtype, self.params.resolution)
