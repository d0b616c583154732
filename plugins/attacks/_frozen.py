"""Helpers shared by the attacks on a FROZEN Stable Diffusion model: AdvDM, Mist, PhotoGuard, SDS.

What lives here is what the four have in common and no other family needs: the two losses
of the Mist/Diff-Protect line (semantic = denoising loss, textural = latent distance to a
target image), the bundled default target image, and chunking a batch for memory. PGD and the
adaptive (threat-aware) view of the input come from ``benchbase.toolkit``.

Per-image sums: the official scripts (``mist_v3.py``, Diff-Protect ``diff_mist.py``) attack
one image at a time. Every module on the path (VAE, UNet: GroupNorm, no batch statistics)
treats the images of a batch independently, so summing per-image losses gives each image
exactly the gradient of its own single-image run. Averaging over the batch instead would
scale the semantic term by 1/B and change Mist's fused balance ``L_T - rate·L_S``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchbase.errors import ConfigError

#: The bundled default target image for Mist's textural loss and SDST (see docs/attacks-frozen.md).
BUNDLED_TARGET = Path(__file__).with_name("mist_target.png")


def make_target_pattern(size: int = 512, period: int = 32) -> np.ndarray:
    """The bundled target: a high-contrast periodic texture, (size, size, 3) uint8.

    The official target (Mist's ``MIST.png``) is a repetitive black-on-white pattern; the
    textural loss pulls the image latent towards the latent of such a texture so a model
    fine-tuned on protected images reproduces it. This procedural stand-in has the same
    character: black/white tiles of ``period`` px, each holding a diagonal bar and a ring
    (edges in every orientation, strong in all four latent channels). Regenerate the PNG
    with ``python -m benchbase_plugins.attacks._frozen``.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = (xx % period) / period, (yy % period) / period  # position inside the tile, [0, 1)
    bar = np.abs(u - v) < 0.18  # diagonal bar
    r = np.hypot(u - 0.5, v - 0.5)
    ring = (r > 0.28) & (r < 0.40)
    checker = ((xx // period + yy // period) % 2).astype(bool)  # alternate tile polarity
    ink = (bar | ring) ^ checker
    img = np.where(ink, 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def load_target(path: str | None, resolution: int) -> torch.Tensor:
    """Target image as (1, 3, R, R) in [0, 1] on the 8-bit grid.

    Mist and Diff-Protect resize the target straight to the input size (bicubic, no crop);
    ``None`` loads the bundled pattern.
    """
    from PIL import Image

    from benchbase.images import open_rgb, pil_to_tensor

    src = BUNDLED_TARGET if path is None else Path(path).expanduser()
    if path is not None and not src.is_file():
        raise ConfigError(f"target image {str(src)!r} does not exist")
    img = open_rgb(src)
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return pil_to_tensor(img).unsqueeze(0)


def chunks(n: int, batch_size: int | None) -> list[slice]:
    """Slices of a batch of ``n`` images, ``batch_size`` at a time (None: all at once)."""
    size = n if not batch_size else max(1, batch_size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def semantic_loss(models, x01: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
                  timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """L_S: ε-MSE (v-MSE on v-prediction models) of the frozen UNet on a posterior sample,
    t ~ U{0..T-1} per image, fresh noise; summed over images (each term a per-image mean)."""
    z = models.encode_images(x01, sample=True, generator=generator)
    per_image = models.diffusion_loss(z, cond.expand(len(z), -1, -1), generator=generator,
                                      timesteps=timesteps, noise=noise, reduction="none")
    return per_image.sum()


def textural_loss(models, x01: torch.Tensor, target_latent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L_T = ‖z(x) − z_target‖² with SUM reduction, z(x) a posterior sample (Mist ``fn``)."""
    z = models.encode_images(x01, sample=True, generator=generator).float()
    return (z - target_latent.float().expand_as(z)).pow(2).sum()


def target_latent(models, target01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A posterior sample of the target's latent, without grad: Mist and Diff-Protect re-encode
    the target at every loss evaluation, so each step sees a fresh sample."""
    with torch.no_grad():
        return models.encode_images(target01, sample=True, generator=generator).detach()


def frozen_setup(ctx, prompt: str, gradient_checkpointing: bool = False):
    """The frozen surrogate every loss attack starts from: fresh models (memory options on)
    and the prompt's text embedding, computed once without grad."""
    models = ctx.models()
    enable_memory_options(models, gradient_checkpointing)
    with torch.no_grad():
        cond = models.encode_prompt([prompt])
    return models, cond


def enable_memory_options(models, gradient_checkpointing: bool) -> None:
    """UNet gradient checkpointing (for full-size models on one GPU); a no-op otherwise."""
    if gradient_checkpointing and hasattr(models.unet, "enable_gradient_checkpointing"):
        models.unet.enable_gradient_checkpointing()


if __name__ == "__main__":  # regenerate the bundled target image
    from PIL import Image

    Image.fromarray(make_target_pattern()).save(BUNDLED_TARGET, optimize=True)
    print(f"wrote {BUNDLED_TARGET} ({BUNDLED_TARGET.stat().st_size} bytes)")
