"""The components themselves. Images are float32 NCHW RGB in [0, 1]; budgets in 8-bit levels."""

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from benchbase import Attack, Context, Params, Purifier
from benchbase.toolkit import ObjectiveTrace, diffusion_loss, pgd, threat_view


class Checkerboard(Attack):
    """Adds +eps / -eps in a checkerboard of ``cell`` pixels. The core quantises the result
    to 8-bit PNG and clips it to the budget."""

    class Params(Attack.Params):
        eps: float = Field(8.0, ge=0)  # levels; a redefined field repeats its bounds
        cell: int = Field(4, ge=1)

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        h, w = images.shape[-2:]
        ys = torch.arange(h, device=images.device) // self.params.cell
        xs = torch.arange(w, device=images.device) // self.params.cell
        sign = ((ys[:, None] + xs[None, :]) % 2) * 2 - 1
        return (images + sign * self.eps / 255.0).clamp(0, 1)


class DenoisePGD(Attack):
    """PGD ascent of the frozen model's denoising loss under the instance prompt (an AdvDM-style
    protection written with ``benchbase.toolkit``): ``steps`` sign steps of ``step_size`` levels
    inside the ``eps`` ball, from a random start. Adaptive: with ``adaptive = true`` in a suite it
    optimises through the cell's purifier chain and the defense's training prompt."""

    class Params(Attack.Params):
        eps: float = Field(8.0, ge=0)  # levels
        step_size: float = Field(1.0, ge=0)  # levels
        steps: int = Field(50, ge=0)

    supports_adaptive = True

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        threat = threat_view(ctx)  # purifier chain (or None) and the prompts the victim trains with
        models = ctx.models()
        with torch.no_grad():
            cond = models.encode_prompt([threat.prompts.instance] * len(images))

        def loss(x: torch.Tensor) -> torch.Tensor:  # every draw from ctx.generator: reproducible
            z = models.encode_images(x, sample=True, generator=ctx.generator)
            return diffusion_loss(models, z, cond, ctx.generator)

        # the objective at every PGD step, recorded in the protect stage's info for the report
        trace = ObjectiveTrace("denoising loss L_DM of the frozen model", maximize=True)
        adv, _ = pgd(images.to(ctx.device), loss, p.eps, p.step_size, p.steps, generator=ctx.generator,
                     use_random_start=True, transform=threat.purify, progress=ctx.progress, trace=trace)
        trace.record(ctx.info)  # objective, objective_trajectory, objective_points
        return adv.cpu()


class Median(Purifier):
    """size × size median filter (reflect padding); ``size`` must be odd (a window centred on
    each pixel keeps the image size; an even one would not)."""

    class Params(Params):
        size: int = Field(3, ge=1)

        @field_validator("size")
        @classmethod
        def _odd(cls, size: int) -> int:
            if size % 2 == 0:
                raise ValueError(f"must be odd (a {size}×{size} window has no centre pixel and would change "
                                 f"the image size); use {size - 1} or {size + 1}")
            return size

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        k = self.params.size
        padded = F.pad(images, [k // 2] * 4, mode="reflect")
        patches = padded.unfold(2, k, 1).unfold(3, k, 1)
        return patches.reshape(*patches.shape[:4], -1).median(dim=-1).values
