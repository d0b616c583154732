"""DreamBooth-LoRA: DreamBooth with prior preservation where only low-rank adapters train
(Hu et al., "LoRA", ICLR 2022; the diffusers ``train_dreambooth_lora.py`` recipe).

Defaults are the diffusers DreamBooth-LoRA example (examples/dreambooth/README.md, "Dreambooth
with LoRA"): rank 4 with ``lora_alpha = rank`` (scale 1), adapters on the UNet attention
projections ``to_q``/``to_k``/``to_v``/``to_out.0``, lr 1e-4 constant without warmup, 500
steps, batch 1, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), grad clip 1.0, A ~ N(0, 1/rank) and
B = 0 (the script's ``init_lora_weights="gaussian"``), text-encoder LoRA off
(``--train_text_encoder``: q/k/v/out_proj of the CLIP attention, same lr). Prior preservation
and generation follow this suite's DreamBooth victim (weight 1.0, 200 class images, 16 images
per prompt, 100 steps, guidance 7.5) so that a suite compares full fine-tuning and LoRA on
one line.

The adapters are implemented here (peft is not a dependency); the stored artifact is
``adapters.safetensors`` with peft/diffusers-style keys (``unet.<module>.lora_A.weight``,
``text_encoder.<module>.lora_B.weight``) plus ``adapters.json`` (rank, alpha, targets).
Generation loads the base model and merges ``W + (alpha/rank)·B·A`` into each target
projection, which gives the same outputs as running the adapters alongside.
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

from .dreambooth import DreamBooth

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
WEIGHTS = "adapters.safetensors"
CONFIG = "adapters.json"


class LoRALinear(torch.nn.Module):
    """``base(x) + scale · B(A(x))`` with the frozen ``base`` and trainable A (rank × in), B (out × rank)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():  # gaussian init of A drawn on CPU from the cell's generator; B = 0
            a = torch.randn(self.lora_A.weight.shape, generator=generator) / rank
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        self.lora_A.to(base.weight.device, torch.float32)
        self.lora_B.to(base.weight.device, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # adapters stay fp32 (as the diffusers script casts trainable params) even on a bf16 base
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale
        return self.base(x) + delta.to(x.dtype)


def target_names(module: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Qualified names of the ``nn.Linear`` submodules whose name ends with one of ``targets``."""
    return [name for name, mod in module.named_modules()
            if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


def _set_submodule(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def add_lora(module: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
             generator: torch.Generator) -> dict[str, LoRALinear]:
    """Wrap every target projection of ``module`` with a LoRA adapter; returns {name: wrapper}."""
    names = target_names(module, targets)
    if not names:
        raise DataError(f"{type(module).__name__} has no linear layer named {', '.join(targets)}: "
                        "LoRA needs a UNet/CLIP with these attention projections")
    wrappers = {}
    for name in names:
        wrappers[name] = LoRALinear(module.get_submodule(name), rank, alpha, generator)
        _set_submodule(module, name, wrappers[name])
    return wrappers


def adapter_state(prefix: str, wrappers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in wrappers.items():
        out[f"{prefix}.{name}.lora_A.weight"] = w.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{prefix}.{name}.lora_B.weight"] = w.lora_B.weight.detach().float().cpu().contiguous()
    return out


@torch.no_grad()
def merge_adapters(module: torch.nn.Module, prefix: str, state: dict[str, torch.Tensor], scale: float) -> int:
    """Add ``scale · B·A`` to each projection named in ``state`` (under ``prefix``); returns the count."""
    names = sorted({k[len(prefix) + 1: -len(".lora_A.weight")] for k in state
                    if k.startswith(prefix + ".") and k.endswith(".lora_A.weight")})
    for name in names:
        linear = module.get_submodule(name)
        a, b = state[f"{prefix}.{name}.lora_A.weight"], state[f"{prefix}.{name}.lora_B.weight"]
        delta = (b.to(linear.weight.device, torch.float32) @ a.to(linear.weight.device, torch.float32)) * scale
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
    return len(names)


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
        """Freeze the base model and wrap its attention projections with adapters (A, B train)."""
        p = self.params
        models.unet.requires_grad_(False)
        models.text_encoder.requires_grad_(False)
        self._adapters = {"unet": add_lora(models.unet, UNET_TARGETS, p.rank, self._alpha, ctx.generator)}
        if p.train_text_encoder:
            self._adapters["text_encoder"] = add_lora(models.text_encoder, TEXT_TARGETS, p.rank, self._alpha,
                                                      ctx.generator)
        trainable = [w for group in self._adapters.values() for m in group.values()
                     for w in (m.lora_A.weight, m.lora_B.weight)]
        for w in trainable:
            w.requires_grad_(True)
        return trainable

    def save_trained(self, models: SDModels, out_dir: Path) -> dict:
        """Only the adapters are stored (a few hundred KB on SD, not the 3.4 GB UNet)."""
        from safetensors.torch import save_file

        p = self.params
        state = {}
        for prefix, group in self._adapters.items():
            state.update(adapter_state(prefix, group))
        save_file(state, str(out_dir / WEIGHTS))
        config = {"rank": p.rank, "alpha": self._alpha, "unet_targets": list(UNET_TARGETS),
                  "text_encoder_targets": list(TEXT_TARGETS) if p.train_text_encoder else []}
        (out_dir / CONFIG).write_text(json.dumps(config, indent=1))
        return {"rank": p.rank, "alpha": self._alpha,
                "adapter_parameters": int(sum(t.numel() for t in state.values()))}

    def load_victim(self, model_dir: Path, ctx: Context) -> SDModels:
        """The base models with the stored adapters merged in (fresh modules)."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        if not (model_dir / WEIGHTS).is_file():
            raise DataError(f"{model_dir} holds no {WEIGHTS}: was it written by the lora personalizer?")
        config = json.loads((model_dir / CONFIG).read_text())
        state = load_file(str(model_dir / WEIGHTS))
        models = ctx.models()
        scale = config["alpha"] / config["rank"]
        merged = merge_adapters(models.unet, "unet", state, scale)
        if merged == 0:
            raise DataError(f"{model_dir / WEIGHTS} has no UNet adapters")
        merge_adapters(models.text_encoder, "text_encoder", state, scale)
        return models
