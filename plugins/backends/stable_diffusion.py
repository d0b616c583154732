"""The ``sd`` backend: real Stable Diffusion through ``benchbase.models.sd.load_sd``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from benchbase.components import Backend, Params
from benchbase.models.sd import SDModels, load_sd


class StableDiffusionBackend(Backend):
    """Stable Diffusion (SD 1.x / 2.x, ε or v prediction) through diffusers.

    ``model`` is a local diffusers folder or a hub id (honours HF_HUB_OFFLINE=1). The
    protocol's base model is SD-2.1-base at 512 px.
    """

    class Params(Params):
        model: str = "stabilityai/stable-diffusion-2-1-base"
        revision: str | None = None
        variant: str | None = None
        resolution: int = Field(512, ge=8, multiple_of=8)  # the VAE downsamples by 8
        scheduler: Literal["default", "ddim", "ddpm"] = "default"

    def fingerprint(self) -> str:
        p = self.params
        ident = {"model": p.model, "revision": p.revision, "variant": p.variant}
        folder = Path(p.model).expanduser()
        if (folder / "model_index.json").is_file():  # a local folder: hash its configs, not its path
            configs = sorted(folder.glob("*/config.json")) + sorted(folder.glob("*/scheduler_config.json"))
            ident["configs"] = hashlib.sha256(b"".join(f.read_bytes() for f in configs)).hexdigest()[:16]
            weights = sorted(folder.glob("*/*.safetensors")) + sorted(folder.glob("*/*.bin"))
            ident["weights"] = [(f.parent.name, f.name, f.stat().st_size) for f in weights]
        return "sd-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"Stable Diffusion {self.params.model} at {self.params.resolution} px"

    def load(self, device: torch.device, dtype: torch.dtype) -> SDModels:
        p = self.params
        return load_sd(p.model, device, dtype, p.resolution, revision=p.revision, variant=p.variant,
                       scheduler=None if p.scheduler == "default" else p.scheduler)

