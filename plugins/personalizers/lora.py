"""DreamBooth-LoRA: DreamBooth with prior preservation where only low-rank adapters train
(Hu et al., "LoRA", ICLR 2022; the diffusers ``train_dreambooth_lora.py`` recipe).

Defaults are the diffusers DreamBooth-LoRA example (examples/dreambooth/README.md, "Dreambooth
with LoRA"): rank 4 with ``lora_alpha = rank`` (scale 1), adapters on the UNet attention
projections ``to_q``/``to_k``/``to_v``/``to_out.0``, lr 1e-4 constant without warmup, 500
steps, batch 1, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), grad clip 1.0, A ~ N(0, 1/rank²) and
B = 0 (the script's ``init_lora_weights="gaussian"``), text-encoder LoRA off
(``--train_text_encoder``: q/k/v/out_proj of the CLIP attention, same lr). Prior preservation
and generation follow this suite's DreamBooth victim (weight 1.0, 200 class images, 16 images
per prompt, 100 steps, guidance 7.5) so that a suite compares full fine-tuning and LoRA on
one line.

The adapters are peft's, attached as the script attaches them (``benchbase.toolkit.lora``),
in float32 on any base precision, with A drawn from the cell's generator. The stored artifact
is what the script saves: ``pytorch_lora_weights.safetensors`` (diffusers layout, rank and
alpha in its metadata; ``StableDiffusionPipeline.load_lora_weights(folder)`` loads it) plus
``adapters.json`` (rank, alpha, targets). Generation loads the base model and merges
``W + (alpha/rank)·B·A`` into each target projection in float32, which gives the outputs of
running the adapters alongside.

Version 2 (peft) trains the same adapters as version 1 (hand-written layers: same init draws,
scale, targets and order) up to float rounding: peft adds the base and adapter branches in
another order, so gradients differ in the last bits (≈1e-10) and generated pixels by ≈1e-5
after a few steps; the stored file moved from ``adapters.safetensors`` to diffusers' layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from benchbase.components import Context
from benchbase.errors import DataError
from benchbase.models.sd import SDModels
from benchbase.toolkit.lora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    WEIGHTS_NAME,
    add_lora,
    merge_lora,
    save_lora,
    split_lora_state,
)

from .dreambooth import DreamBooth

CONFIG = "adapters.json"


class DreamBoothLoRA(DreamBooth):
    """DreamBooth-LoRA (diffusers ``train_dreambooth_lora.py`` recipe: rank 4, alpha 4, lr 1e-4,
    500 steps, UNet attention q/k/v/out; optional text-encoder LoRA), with DreamBooth's prior
    preservation and generation protocol. Only adapter weights train and only they are stored."""

    class Params(DreamBooth.Params):
        max_train_steps: int = Field(500, ge=0)
        learning_rate: float = Field(1e-4, gt=0)
        #: text-encoder LoRA on q/k/v/out_proj (diffusers ``--train_text_encoder``; off by default)
        train_text_encoder: bool = False
        #: the diffusers script uses torch AdamW unless ``--use_8bit_adam``
        optimizer: Literal["auto", "adamw", "adamw8bit"] = "adamw"
        rank: int = Field(4, ge=1)
        #: ``None``: alpha = rank (the diffusers script), i.e. scale 1
        alpha: float | None = Field(None, gt=0)

    @property
    def _alpha(self) -> float:
        return float(self.params.alpha if self.params.alpha is not None else self.params.rank)

    def setup_trainable(self, models: SDModels, ctx: Context) -> list[torch.nn.Parameter]:
        """Freeze the base model and attach adapters to its attention projections (A, B train)."""
        p = self.params
        models.unet.requires_grad_(False)
        models.text_encoder.requires_grad_(False)
        # adapters in float32 on any base (the script's cast_training_params), A from the cell's generator
        trainable = add_lora(models.unet, p.rank, self._alpha, UNET_TARGETS, "gaussian", ctx.generator,
                             dtype=torch.float32)
        if p.train_text_encoder:
            trainable += add_lora(models.text_encoder, p.rank, self._alpha, TEXT_ENCODER_TARGETS, "gaussian",
                                  ctx.generator, dtype=torch.float32)
        return [w for _, w in trainable]

    def save_trained(self, models: SDModels, out_dir: Path) -> dict:
        """Only the adapters are stored (a few hundred KB on SD, not the 3.4 GB UNet)."""
        p = self.params
        state = save_lora(out_dir, p.rank, self._alpha, models.unet,
                          models.text_encoder if p.train_text_encoder else None)
        config = {"rank": p.rank, "alpha": self._alpha, "unet_targets": list(UNET_TARGETS),
                  "text_encoder_targets": list(TEXT_ENCODER_TARGETS) if p.train_text_encoder else []}
        (out_dir / CONFIG).write_text(json.dumps(config, indent=1))
        return {"rank": p.rank, "alpha": self._alpha,
                "adapter_parameters": int(sum(t.numel() for t in state.values()))}

    def load_victim(self, model_dir: Path, ctx: Context) -> SDModels:
        """The base models with the stored adapters merged in (fresh modules)."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        weights = model_dir / WEIGHTS_NAME
        if not weights.is_file() or not (model_dir / CONFIG).is_file():
            raise DataError(f"{model_dir} holds no {WEIGHTS_NAME} and {CONFIG}: was it written by the lora "
                            "personalizer?")
        config = json.loads((model_dir / CONFIG).read_text())
        layers = split_lora_state(load_file(str(weights)))
        if not layers.get("unet"):
            raise DataError(f"{weights} has no UNet adapters")
        models = ctx.models()
        scale = config["alpha"] / config["rank"]
        merge_lora(models.unet, layers["unet"], scale)
        merge_lora(models.text_encoder, layers.get("text_encoder", {}), scale)
        return models
