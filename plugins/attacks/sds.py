"""SDS(+), SDS(−) and SDST(−): score-distillation protection (Xue et al., ICLR'24; xavihart/Diff-Protect
``code/attacks.py`` ``pgd_sds``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from benchbase.components import Attack, Context
from benchbase.toolkit import ObjectiveTrace, denoise, project, random_start, threat_view
from benchbase_plugins.attacks._frozen import (
    chunks,
    frozen_setup,
    load_target,
    target_latent,
    textural_loss,
)


class SDS(Attack):
    """SDS protection (Xue et al., "Toward Effective Protection Against Diffusion Based Mimicry
    through Score Distillation", ICLR'24; xavihart/Diff-Protect ``code/attacks.py::pgd_sds``).

    The gradient of the denoising loss with the UNet Jacobian dropped, as in score
    distillation: ``g_x = (∂z/∂x)ᵀ (ε̂ − ε)``, where ``ε̂ = ε_θ(z_t, t, c)`` runs under
    ``no_grad`` and only the VAE encoder is differentiated. One UNet forward and no UNet
    backward per step, which is what makes it cheap. Update ``x ← Π(x + g·α·sign(g_x))``
    with ``g = +1`` for SDS(+) and ``g = −1`` for SDS(−) (the default and the paper's
    recommendation). ``target = True`` is SDST: the step is
    ``α·sign(g·rate·g_x − ∇‖z(x) − z(target)‖²_sum)`` with ``rate = 5``.

    Defaults (``configs/attack/base.yaml``): ε 16 levels, α 1 level, 100 steps, no random
    start, constant step, prompt "a photo", SD1.4-style posterior sample.
    """

    class Params(Attack.Params):
        eps: float = Field(16.0, ge=0)
        step_size: float = Field(1.0, ge=0)
        steps: int = Field(100, ge=0)
        sign: Literal["+", "-"] = "-"
        prompt: str = "a photo"
        target: bool = False  # SDST (using_target)
        target_rate: float = Field(5.0, ge=0)  # weight of the SDS term against the textural term in SDST
        target_image: str | None = None  # None: the bundled pattern (docs/attacks-frozen.md)
        random_start: bool = False
        # The released pgd_sds backpropagates through the same posterior sample it noised; an
        # earlier variant (commented out there) re-encoded the image for the backward pass.
        resample_for_backward: bool = False
        batch_size: int | None = Field(None, ge=1)

    supports_adaptive: ClassVar[bool] = True

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        models, cond = frozen_setup(ctx, p.prompt)
        view = threat_view(ctx)  # the purifier chain when adaptive, else the identity
        target = load_target(p.target_image, images.shape[-1]).to(ctx.device) if p.target else None
        g_dir = 1.0 if p.sign == "+" else -1.0
        eps, alpha = p.eps / 255.0, p.step_size / 255.0

        out, norms, runs = [], [], []
        for part in chunks(len(images), p.batch_size):
            x0 = images[part].to(ctx.device)
            x = x0.clone()
            if p.random_start:
                x = random_start(x0, eps, ctx.generator)
            runs.append([])
            for _ in ctx.progress(range(p.steps), desc="sds", leave=False):
                g_x, norm, mse = self._sds_grad(models, view, x, cond, ctx.generator, p.resample_for_backward)
                norms.append(norm)
                runs[-1].append(mse)
                direction = g_dir * g_x
                if target is not None:
                    xt = x.detach().requires_grad_(True)
                    z_tgt = target_latent(models, target, ctx.generator)
                    g_tex = torch.autograd.grad(textural_loss(models, view(xt), z_tgt, ctx.generator), xt)[0]
                    direction = direction * p.target_rate - g_tex
                x = project(x.detach() + alpha * direction.sign(), x0, eps)
            out.append(x.detach())
        # what the SDS step follows: the denoising loss (its gradient with the UNet Jacobian dropped)
        objective = ObjectiveTrace(f"SDS{'T' if p.target else ''}({p.sign}): denoising loss L_DM at each step's draw",
                                   maximize=p.sign == "+")
        objective.extend_mean(runs, weights=[len(a) for a in out])
        objective.record(ctx.info)
        ctx.info.update(prompt=p.prompt,
                        adaptive=ctx.threat is not None and bool(ctx.threat.purifiers),
                        residual_norm_first=norms[0] if norms else None,
                        residual_norm_last=norms[-1] if norms else None)
        return torch.cat(out)

    @staticmethod
    def _sds_grad(models, view, x, cond, generator, resample: bool) -> tuple[torch.Tensor, float, float]:
        """(∂z/∂x)ᵀ(ε̂ − ε) for one random t per image; the UNet runs without grad. Also returns
        ‖ε̂ − ε‖ and the mean squared residual (the denoising loss at this draw)."""
        x = x.detach().requires_grad_(True)
        z = models.encode_images(view(x), sample=True, generator=generator)
        n = len(z)
        with torch.no_grad():
            # v-prediction models: the residual against the v target (Diff-Protect is ε-only)
            out = denoise(models, None, z.detach(), cond.expand(n, -1, -1), generator)
            residual = (out.pred - out.target).to(z.dtype)
        if resample:
            z = models.encode_images(view(x), sample=True, generator=generator)
        (g_x,) = torch.autograd.grad(z, x, grad_outputs=residual)
        return g_x, float(residual.float().norm()), float(residual.float().pow(2).mean())
