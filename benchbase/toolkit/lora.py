"""LoRA adapters (Hu et al., "LoRA", ICLR 2022) through peft, as diffusers' DreamBooth-LoRA
example attaches them (``examples/dreambooth/train_dreambooth_lora.py``: ``LoraConfig`` with
``init_lora_weights="gaussian"``, ``lora_alpha = rank``, ``unet.add_adapter(config)``,
``get_peft_model_state_dict``, ``save_lora_weights``).

What benchbase adds on top of peft:

- **seeded initialisation**: peft draws A from the global RNG; here A comes from the stage's
  generator, so a cell's adapters do not depend on what ran before it in the process;
- **fp32 adapters on a low-precision base** (``dtype=torch.float32``), as the script's
  ``cast_training_params``;
- **an fp32 merge** for generation (``merge_lora``): W ← W + scale·B·A computed in float32 and
  cast once to the weight's dtype;
- reading both the diffusers file (``pytorch_lora_weights.safetensors``) and peft-style keys.

The forward pass is peft's ``lora.Linear``: ``base(x) + scale·B(A(x))``, scale = alpha / rank.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch

from benchbase.errors import DataError

#: the attention projections diffusers' DreamBooth-LoRA script adapts in a UNet
#: (it also lists ``add_k_proj``/``add_v_proj``, which Stable Diffusion's UNet does not have)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: the CLIP text encoder's attention projections (the script's ``--train_text_encoder``)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: the file diffusers writes and ``pipeline.load_lora_weights(folder)`` reads
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

Init = Literal["gaussian", "kaiming"]


def add_lora(
    module: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: tuple[str, ...] = UNET_TARGETS,
    init: Init = "gaussian",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> list[tuple[str, torch.nn.Parameter]]:
    """Attach rank-``rank`` LoRA adapters to every ``nn.Linear`` of ``module`` whose qualified
    name is, or ends with, one of ``targets``; returns the adapters' (name, parameter) pairs,
    A then B per layer, in module order. The base weights are frozen, the adapters trainable.

    ``alpha``: scale = alpha / rank (None: alpha = rank, scale 1, as the diffusers script).
    ``init``: ``"gaussian"`` — A ~ N(0, 1/rank²) per entry (std 1/rank), B = 0 (the script's
    ``init_lora_weights="gaussian"``), A drawn from ``generator`` on the CPU, layer by layer;
    ``"kaiming"`` — peft's default (A Kaiming-uniform as ``nn.Linear``, B = 0), drawn from the
    global RNG seeded once from ``generator``. ``dtype``: the adapters' dtype (None: the base
    layer's; ``torch.float32`` keeps them in full precision on a bf16/fp16 base).
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = target_names(module, targets)
    if not names:
        raise DataError(f"{type(module).__name__} has no linear layer named {', '.join(targets)}: "
                        "LoRA needs a UNet/CLIP with these attention projections")
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=0.0,
                        init_lora_weights="gaussian" if init == "gaussian" else True,
                        target_modules=list(targets))
    # peft draws its own initialisation from the global RNG; keep the caller's RNG untouched
    fork = torch.random.fork_rng(devices=[]) if generator is not None else nullcontext()
    with fork:
        if init == "kaiming" and generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        if _is_diffusers_model(module):
            module.add_adapter(config)  # what the DreamBooth-LoRA script calls on the UNet
        else:
            # the text encoder: transformers' add_adapter wraps this same call (and demands a
            # newer peft than some platforms ship), so call peft directly
            inject_adapter_in_model(config, module)
    params = lora_parameters(module)
    with torch.no_grad():
        if dtype is not None:
            for _, p in params:
                p.data = p.data.to(dtype)
        if init == "gaussian" and generator is not None:
            for name, p in params:
                if ".lora_A." in name:
                    p.copy_(torch.randn(p.shape, generator=generator) / rank)
    for _, p in params:
        p.requires_grad_(True)
    return params


def _is_diffusers_model(module: torch.nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(module, ModelMixin)


def target_names(module: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Qualified names of the ``nn.Linear`` submodules whose name is, or ends with, a target."""
    return [name for name, mod in module.named_modules()
            if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


def lora_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs of the LoRA adapters attached to ``module``."""
    return [(n, p) for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of ``module`` as peft saves them (``<layer>.lora_A.weight``,
    ``<layer>.lora_B.weight``), float32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def save_lora(folder: Path, rank: int, alpha: float, unet: torch.nn.Module,
              text_encoder: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Write the adapters of ``unet`` (and ``text_encoder``) to ``folder/pytorch_lora_weights.safetensors``
    as diffusers' script does, with rank and alpha as adapter metadata, so that
    ``StableDiffusionPipeline.load_lora_weights(folder)`` loads them. Returns the peft state
    dicts, keys prefixed ``unet.`` / ``text_encoder.``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers

    states = {"unet": lora_state_dict(unet)}
    if text_encoder is not None:
        states["text_encoder"] = lora_state_dict(text_encoder)

    def meta(targets):
        return {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}

    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(states["unet"]),
        text_encoder_lora_layers=(convert_state_dict_to_diffusers(states["text_encoder"])
                                  if text_encoder is not None else None),
        unet_lora_adapter_metadata=meta(UNET_TARGETS),
        text_encoder_lora_adapter_metadata=meta(TEXT_ENCODER_TARGETS) if text_encoder is not None else None,
    )
    return {f"{prefix}.{k}": v for prefix, state in states.items() for k, v in state.items()}


# the A/B suffixes of the key layouts in use: peft, diffusers (UNet), diffusers (text encoder)
_KEY = re.compile(r"^(?P<prefix>unet|text_encoder)\.(?P<layer>.+?)\."
                  r"(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
                  r"(?:\.default)?\.weight$")


def split_lora_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{"unet"|"text_encoder": {layer: (A, B)}}`` from a state dict in the peft or the
    diffusers layout (keys prefixed ``unet.`` / ``text_encoder.``)."""
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            raise DataError(f"not a LoRA weight of a UNet or text encoder: {key!r}")
        ab = "A" if m["kind"] in ("lora_A", "lora.down", "lora_linear_layer.down") else "B"
        parts.setdefault(m["prefix"], {}).setdefault(m["layer"], {})[ab] = value
    out = {}
    for prefix, layers in parts.items():
        for layer, ab in layers.items():
            if set(ab) != {"A", "B"}:
                raise DataError(f"LoRA layer {prefix}.{layer} has no {'B' if 'A' in ab else 'A'} matrix")
        out[prefix] = {layer: (ab["A"], ab["B"]) for layer, ab in layers.items()}
    return out


@torch.no_grad()
def merge_lora(module: torch.nn.Module, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> int:
    """W ← W + scale·B·A for each ``{layer: (A, B)}`` of ``module``, computed in float32 and cast
    once to the weight's dtype; returns the number of layers merged. Generating with merged
    weights gives the outputs of running the adapters alongside, without their cost."""
    for name, (a, b) in layers.items():
        try:
            linear = module.get_submodule(name)
        except AttributeError:
            raise DataError(f"LoRA layer {name!r} does not exist in {type(module).__name__}: "
                            "were these adapters trained on another model?") from None
        delta = (b.to(linear.weight.device, torch.float32) @ a.to(linear.weight.device, torch.float32)) * scale
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
    return len(layers)
