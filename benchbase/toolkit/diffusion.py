"""The one noising path: forward diffusion q(z_t | z_0) and the UNet's training objective.

DreamBooth, LoRA, the surrogate-training attacks, the frozen-model attacks and
``SDModels.diffusion_loss`` all noise latents here, so they agree on the draw order (noise,
then timesteps), the target (ε, or v on v-prediction models) and the precision (the UNet runs
in its own dtype, prediction and target are compared in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchbase.models.sd import SDModels


@dataclass
class Denoised:
    """One noising + UNet prediction: ``pred`` and ``target`` (float32; ε or v), the noisy
    latents ``noisy`` = z_t, the timesteps ``t`` and the ``noise`` ε that made z_t."""

    pred: torch.Tensor
    target: torch.Tensor
    noisy: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:  # out["pred"] as well as out.pred
        return getattr(self, key)

    def mse(self, reduction: str = "mean") -> torch.Tensor:
        """L_DM = ‖pred − target‖²: the mean, or one mean per image (``reduction="none"``)."""
        err = (self.pred - self.target).pow(2)
        if reduction == "none":
            return err.flatten(1).mean(dim=1)
        return err.mean()


def draw_noise(latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """ε ~ N(0, I) of the latents' shape, drawn in float32 on the CPU generator (device-independent)."""
    return torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)


def denoise(
    models: "SDModels",
    unet: torch.nn.Module | None,
    latents: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> Denoised:
    """Noise ``latents`` (scaled VAE latents) at ``timesteps`` (default: t ~ U{0..T−1} per image)
    with ``noise`` (default: fresh ε), and predict with ``unet`` (None: the models' own UNet;
    a surrogate passes its trainable one) conditioned on ``cond``. Random draws, in order:
    noise, then timesteps."""
    unet = unet if unet is not None else models.unet
    if noise is None:
        noise = draw_noise(latents, generator)
    if timesteps is None:
        timesteps = models.sample_timesteps(latents.shape[0], generator)
    timesteps = timesteps.to(latents.device)
    sched = models.noise_scheduler
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = unet(noisy.to(unet.dtype), timesteps, cond.to(unet.dtype)).sample.float()
    if models.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps).float()
    else:
        target = noise.float()
    return Denoised(pred, target, noisy, timesteps, noise)


def diffusion_loss(
    models: "SDModels",
    latents: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    unet: torch.nn.Module | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_DM of :func:`denoise`: the MSE between the prediction and its target (a scalar, or one
    value per image with ``reduction="none"``)."""
    return denoise(models, unet, latents, cond, generator, timesteps, noise).mse(reduction)
