"""Offline random-weight stand-ins for the models metrics and purifiers ask for (tests, smoke runs).

- a tiny x4 upscaler (``StableDiffusionUpscalePipeline`` with the real pipeline's structure:
  4-channel latents at the low-res size, a 7-channel UNet conditioned on the noise level
  through class embeddings, a x4 VAE, CLIP text encoder, DDIM + low-res DDPM schedulers);
- a tiny unconditional pixel model (``UNet2DModel`` + ``DDPMScheduler``, linear β 1e-4 → 0.02,
  1000 steps: the guided-diffusion schedule);
- a tiny open_clip model registered with ``open_clip.add_model_config``;
- a tiny LPIPS-shaped perceptual distance (random conv features, LPIPS's normalisation).

Each is built deterministically from a seed; the diffusers models are saved once as a folder
under ``$BENCHBASE_CACHE/tiny/`` and loaded back through the same loader real weights take.
The tiny world registers them under the name ``tiny`` for the roles ``x4-upscaler``,
``pixel-diffusion``, ``clip`` and ``lpips`` (the functions at the end, in each role's shape).
Random weights: outputs test the code paths, not purification quality.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from benchbase.models.offline import build_clip_tokenizer, build_folder_once, cache_root

TINY_PURIFIER_FORMAT = 1  # bump when a construction below changes (invalidates cached folders)


def _ensure_folder(name: str, seed: int, build: Callable[[Path], None]) -> Path:
    folder = cache_root() / "tiny" / f"{name}-v{TINY_PURIFIER_FORMAT}-seed{seed}"

    def seeded_build(tmp: Path) -> None:
        torch.manual_seed(seed)  # module constructors draw from the global generator
        build(tmp)

    return build_folder_once(folder, seeded_build, {"name": name, "seed": seed, "format": TINY_PURIFIER_FORMAT})


def _fork_rng():
    return torch.random.fork_rng(devices=[])


# ---------------------------------------------------------------------------------------
# x4 upscaler
# ---------------------------------------------------------------------------------------


def build_tiny_upscaler(folder: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32, num_class_embeds=1000,  # noise-level conditioning
    )
    vae = AutoencoderKL(  # three blocks: x4 down/upsampling, as the real upscaler's VAE
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.08333,
    )
    tok_dir = folder / "_tok"
    tokenizer = build_clip_tokenizer(tok_dir)
    shutil.rmtree(tok_dir, ignore_errors=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    ))
    # the real upscaler: v-prediction DDIM over scaled-linear betas, DDPM for the low-res noise
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    low_res_scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res_scheduler, scheduler=scheduler,
                                          max_noise_level=350)
    pipe.save_pretrained(folder)


def tiny_upscaler_folder(seed: int = 0) -> Path:
    with _fork_rng():
        return _ensure_folder("x4-upscaler", seed, build_tiny_upscaler)


# ---------------------------------------------------------------------------------------
# unconditional pixel diffusion model
# ---------------------------------------------------------------------------------------


def build_tiny_pixel_model(folder: Path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                              beta_schedule="linear", clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)


def tiny_pixel_model_folder(seed: int = 0) -> Path:
    with _fork_rng():
        return _ensure_folder("pixel-ddpm", seed, build_tiny_pixel_model)


def build_tiny_adm_model(folder: Path) -> None:
    """guided-diffusion's ADM architecture in miniature (resnet up/down blocks, scale-shift norm,
    multi-head attention, 6 output channels: ε and the learned variance interpolation), with
    guided-diffusion's schedule and learned-range variance."""
    from diffusers import DDPMPipeline, UNet2DModel

    from benchbase_plugins.purifiers._guided_diffusion import scheduler, unet_config

    config = unet_config(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
                         num_head_channels=16, learn_sigma=True, image_size=32)
    DDPMPipeline(unet=UNet2DModel(**config), scheduler=scheduler()).save_pretrained(folder)


def tiny_adm_model_folder(seed: int = 0) -> Path:
    with _fork_rng():
        return _ensure_folder("pixel-adm", seed, build_tiny_adm_model)


# ---------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------

TINY_CLIP_NAME = "benchbase-tiny-clip"
TINY_CLIP_CONFIG = {  # 64-d embedding, 64-px input, two-layer towers, open_clip's BPE
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> None:
    import open_clip

    if TINY_CLIP_NAME in open_clip.list_models():
        return
    folder = cache_root() / "tiny" / f"open-clip-config-v{TINY_PURIFIER_FORMAT}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_CLIP_NAME}.json"
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(TINY_CLIP_CONFIG, fh)
        os.replace(tmp, path)
    open_clip.add_model_config(path)


@lru_cache(maxsize=2)
def build_tiny_clip(seed: int = 0):
    """(model, preprocess, tokenizer) of the tiny open_clip model with seeded random weights
    (the global RNG is left untouched)."""
    import open_clip

    register_tiny_clip()
    with _fork_rng(), _quiet_root_warnings():
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY_CLIP_NAME)


@contextlib.contextmanager
def _quiet_root_warnings():
    """open_clip warns on the root logger that a model without pretrained weights is random: for
    this stand-in that is the point, and to a user the line reads like a failure."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------
# LPIPS-shaped perceptual distance
# ---------------------------------------------------------------------------------------


class TinyLPIPS(torch.nn.Module):
    """LPIPS's computation (unit-normalised channel features at several depths, squared
    difference, non-negative linear weights, spatial mean, summed over layers) over a
    random-weight conv net. Input in [-1, 1], as LPIPS expects."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with _fork_rng():
            torch.manual_seed(seed)
            chans = [3, 8, 16, 32]
            self.blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), torch.nn.ReLU())
                for i, (a, b) in enumerate(itertools.pairwise(chans))
            )
            self.lins = torch.nn.ParameterList(torch.nn.Parameter(torch.rand(c) / c) for c in chans[1:])
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for block, lin in zip(self.blocks, self.lins):
            a, b = block(a), block(b)
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((na - nb).pow(2) * lin.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total


# ---------------------------------------------------------------------------------------
# the roles' shapes (benchbase.roles), as the tiny world registers them
# ---------------------------------------------------------------------------------------


def upscaler_folder(name: str) -> str:
    """``x4-upscaler``: the tiny upscaler's folder."""
    return str(tiny_upscaler_folder())


def pixel_model_folder(name: str) -> str:
    """``pixel-diffusion``: the tiny pixel model's folder."""
    return str(tiny_pixel_model_folder())


def adm_model_folder(name: str) -> str:
    """``pixel-diffusion``: the tiny guided-diffusion-architecture model's folder."""
    return str(tiny_adm_model_folder())


def load_lpips(name: str, device: torch.device) -> TinyLPIPS:
    """``lpips``: the tiny LPIPS-shaped distance."""
    return TinyLPIPS().to(device)


class TinyClip:
    """``clip``: the tiny open_clip model (``pretrained`` is ignored: the weights are seeded)."""

    @staticmethod
    def available(name: str, pretrained: str | None) -> str | None:
        return None

    @staticmethod
    def load(name: str, pretrained: str | None):
        return build_tiny_clip()
