"""Purifiers built on the Stable Diffusion x4 upscaler (super-resolution, and Noisy Upscaling of Hönig et al., arXiv 2406.12027).

The sampler below is the loop of diffusers' ``StableDiffusionUpscalePipeline`` (same
random draws in the same order, so it reproduces the pipeline for a seed; a test checks
this) with two additions the purifiers need: the UNet may be conditioned on a noise level
other than the one added to the low-res image (Noisy Upscaling's ``noise_level_sub``,
which otherwise needs a diffusers fork), and the last steps may keep a gradient.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from benchbase.components import Context, Params, Purifier
from benchbase.images import from_uint8, quantize, to_uint8

from ._common import (
    load_pretrained,
    quiet_diffusers,
    randn,
    resize,
    scaled,
    straight_through,
)

UPSCALER = "stabilityai/stable-diffusion-x4-upscaler"


def load_upscaler(model: str, device: torch.device, dtype: torch.dtype, ctx: Context | None = None):
    """The x4 upscaler pipeline of the ``x4-upscaler`` model ``model``: a local folder, a hub id,
    or a model a plugin registers (``benchbase ls models``; ``"auto"``: the backend's default)."""
    from diffusers import StableDiffusionUpscalePipeline

    from benchbase.plugins import find_model

    entry = find_model("x4-upscaler", model, ctx)
    model = entry.load()(entry.name)

    def load(path: str, local_only: bool):
        with quiet_diffusers():
            return StableDiffusionUpscalePipeline.from_pretrained(path, dtype=dtype, local_files_only=local_only)

    pipe = load_pretrained("SD x4 upscaler", model, load, hint=" (`benchbase ls models` lists the registered ones)")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe


def encode_text(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.device))[0]


def upscale(pipe, low: torch.Tensor, ctx: Context, prompt: str, negative_prompt: str, steps: int,
            guidance: float, noise_level: int, added_noise_level: int | None = None,
            tracked_steps: int = 0, progress_desc: str | None = None) -> torch.Tensor:
    """x4 upscale of [0,1] images. The UNet is conditioned on ``noise_level``; the low-res image
    gets noise at ``added_noise_level`` (default: the same, as the pipeline). Gradients flow
    through the low-res conditioning of the last ``tracked_steps`` steps and the decoder."""
    device, dtype = pipe.device, pipe.unet.dtype
    n = low.shape[0]
    added = noise_level if added_noise_level is None else added_noise_level
    cfg = guidance > 1.0
    with torch.no_grad():
        emb = encode_text(pipe, [prompt] * n)
        if cfg:
            emb = torch.cat([encode_text(pipe, [negative_prompt] * n), emb])
    image = low.to(device, dtype) * 2 - 1
    noise = randn(image.shape, ctx, dtype)
    # always, as the pipeline (and the noise_level_sub fork) do: at level 0 the low-res scheduler
    # still adds noise of std sqrt(1 - alphas_cumprod[0])
    image = pipe.low_res_scheduler.add_noise(image, noise, torch.tensor([added], device=device))
    scheduler = copy.deepcopy(pipe.scheduler)  # schedulers keep state; never share the pipeline's
    scheduler.set_timesteps(steps, device=device)
    latents = randn((n, pipe.vae.config.latent_channels, *image.shape[-2:]), ctx, dtype) * scheduler.init_noise_sigma
    labels = torch.full((2 * n if cfg else n,), noise_level, dtype=torch.long, device=device)
    cond_image = torch.cat([image] * 2) if cfg else image
    timesteps = scheduler.timesteps
    iterator = enumerate(timesteps)
    if progress_desc:
        iterator = ctx.progress(iterator, desc=progress_desc, total=len(timesteps), leave=False)
    for i, t in iterator:
        track = torch.is_grad_enabled() and i >= len(timesteps) - tracked_steps
        with torch.set_grad_enabled(track):
            inp = torch.cat([latents] * 2) if cfg else latents
            inp = torch.cat([scheduler.scale_model_input(inp, t), cond_image], dim=1)
            pred = pipe.unet(inp, t, encoder_hidden_states=emb, class_labels=labels).sample
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
            latents = scheduler.step(pred, t, latents).prev_sample
    track = torch.is_grad_enabled() and tracked_steps > 0
    with torch.set_grad_enabled(track):
        out = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return ((out.float() + 1) / 2).clamp(0, 1)


def pil_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """PIL bicubic resize on the 8-bit images (what the reference scripts do)."""
    out = [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in to_uint8(images)]
    return from_uint8(np.stack(out)).to(images.device, images.dtype)


class _Upscaler(Purifier):
    model_roles: ClassVar[dict[str, str]] = {"model": "x4-upscaler"}
    """Shared machinery: optional bottleneck, the x4 upscaler, resize back to the input size."""

    class Params(Params):
        model: str = UPSCALER
        prompt: str = "A photo of a person"
        negative_prompt: str = ""
        num_inference_steps: int = Field(75, ge=1)
        guidance_scale: float = Field(9.0, ge=0)
        noise_level: int = Field(20, ge=0, le=350)
        low_res: int | None = Field(128, ge=4)
        scale_with_resolution: bool = True
        batch_size: int = Field(4, ge=1)
        gradient: Literal["bpda", "truncated"] = "bpda"
        truncated_steps: int = Field(1, ge=1)

    _pipe = None
    _pipe_key = None

    def release(self) -> None:
        self._pipe = self._pipe_key = None

    def pipeline(self, ctx: Context):
        key = (self.params.model, str(ctx.device), ctx.dtype)
        if self._pipe_key != key:  # loading the upscaler is slow; keep it for the next batch
            self._pipe, self._pipe_key = load_upscaler(self.params.model, ctx.device, ctx.dtype, ctx), key
        return self._pipe

    def low_res_side(self, side: int) -> int | None:
        p = self.params
        if p.low_res is None:
            return None
        return max(4, round(scaled(p.low_res, side))) if p.scale_with_resolution else p.low_res

    def added_noise_level(self) -> int | None:
        return None

    def prepare(self, images: torch.Tensor, ctx: Context, grad: bool) -> torch.Tensor:
        """The low-res input of the upscaler (8-bit PIL bicubic; float torch for the gradient)."""
        side = self.low_res_side(images.shape[-1])
        if side is None:
            return images
        low = pil_resize(images.detach(), side)
        return straight_through(low, resize(images, side)) if grad else low

    def _run(self, images: torch.Tensor, ctx: Context, tracked: int) -> torch.Tensor:
        p = self.params
        pipe = self.pipeline(ctx)
        h, w = images.shape[-2:]
        low = self.prepare(images, ctx, grad=tracked > 0)
        outs = []
        for start in range(0, len(low), p.batch_size):
            up = upscale(pipe, low[start:start + p.batch_size], ctx, p.prompt, p.negative_prompt,
                         p.num_inference_steps, p.guidance_scale, p.noise_level, self.added_noise_level(),
                         tracked_steps=tracked, progress_desc=f"{self.name or 'upscale'} sampling")
            outs.append(resize(up, (h, w)).clamp(0, 1) if tracked else resize(up, (h, w)))
        return torch.cat(outs).to(images.device, images.dtype).clamp(0, 1)

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        with torch.no_grad():
            return self._run(images, ctx, tracked=0)

    def differentiable_view(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        """BPDA by default; ``gradient = "truncated"`` keeps the real output and back-propagates
        through the bottleneck and the last ``truncated_steps`` sampler steps."""
        if self.params.gradient == "bpda":
            return super().differentiable_view(images, ctx)
        with torch.enable_grad():
            return self._run(images, ctx, tracked=self.params.truncated_steps)


class SuperResolution(_Upscaler):
    """``sr``: DiffShortcut ``defenses/sr.py`` — PIL bicubic down to 128 px, then the SD x4
    upscaler (``stabilityai/stable-diffusion-x4-upscaler``) with prompt "A photo of a person",
    75 steps, guidance 9, noise_level 20, its shipped scheduler; 512 px out. Seeded from
    ``ctx.generator`` (the reference is unseeded). ``low_res`` is stated at 512 px and scales
    with the image side; ``model`` takes a registered ``x4-upscaler`` (``benchbase ls models``)."""


class NoisyUpscale(_Upscaler):
    """``noisy-upscale``: Noisy Upscaling (Hönig et al., robust-style-mimicry). Gaussian noise
    σ = 0.1 on [0,1] (clipped, saved as 8-bit), then the x4 upscaler conditioned on noise
    level 320 while adding no further noise to the low-res image (the fork's
    ``noise_level_sub = 320``), 75 steps, guidance 9, fixed prompt "A photo of a person"
    (the BLIP-2 caption of the original is not reproduced); the 4x output is resized back to
    the input size (bicubic). ``low_res = None`` (default) feeds the full-size image, as the
    reference does."""

    class Params(_Upscaler.Params):
        sigma: float = Field(0.1, ge=0)
        noise_level: int = Field(320, ge=0, le=350)
        noise_level_sub: int = Field(320, ge=0, le=350)
        low_res: int | None = Field(None, ge=4)

    def added_noise_level(self) -> int:
        return max(0, self.params.noise_level - self.params.noise_level_sub)

    def prepare(self, images: torch.Tensor, ctx: Context, grad: bool) -> torch.Tensor:
        noise = randn(images.shape, ctx, images.dtype) * self.params.sigma
        noisy = images + noise
        # skimage.util.random_noise clips; noise.py saves uint8 before upscale.py reads it
        noisy = straight_through(quantize(noisy.detach().clamp(0, 1)).to(images), noisy) if grad \
            else quantize(noisy.clamp(0, 1)).to(images)
        return super().prepare(noisy, ctx, grad)
