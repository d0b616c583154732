"""AdvDM(+) / AdvDM(−): PGD on the denoising loss of the FROZEN base model (Liang et al., ICML'23;
released as xavihart/Diff-Protect ``code/diff_mist.py`` mode ``advdm``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from benchbase.components import Attack, Context
from benchbase.toolkit import ObjectiveTrace, pgd, threat_view
from benchbase_plugins.attacks._frozen import chunks, frozen_setup, semantic_loss


class AdvDM(Attack):
    """AdvDM (Liang et al., "Adversarial Example Does Good", ICML'23, arXiv 2302.04578).

    ``max_{‖δ‖∞≤ε} E_{t,ε} L_DM(x + δ; θ_base, c)`` on the frozen backend model, with a fresh
    posterior sample, per-image ``t ~ U{0..T-1}`` and fresh noise at every step. Defaults are
    Diff-Protect's ``advdm`` mode (``code/diff_mist.py``, advertorch L∞ PGD): ε 16 levels,
    α 1 level, 100 steps, uniform random start in ±ε, prompt "a photo". ``sign = "-"`` is
    Diff-Protect's AdvDM(−), which *minimises* the loss. Mist's ``semantic`` mode is the
    same attack with the prompt "a painting".
    """

    class Params(Attack.Params):
        eps: float = Field(16.0, ge=0)  # levels (Diff-Protect epsilon=16 in [-1,1] units of 2/255)
        step_size: float = Field(1.0, ge=0)  # levels
        steps: int = Field(100, ge=0)
        sign: Literal["+", "-"] = "+"
        prompt: str = "a photo"
        random_start: bool = True
        batch_size: int | None = Field(None, ge=1)  # images per PGD batch (None: all); results are per-image
        gradient_checkpointing: bool = False  # UNet checkpointing for full-size models

    supports_adaptive: ClassVar[bool] = True

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        models, cond = frozen_setup(ctx, p.prompt, p.gradient_checkpointing)
        view = threat_view(ctx).purify  # None unless adaptive with a purifier chain

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            return semantic_loss(models, x, cond, ctx.generator)

        out, trace = [], []
        for part in chunks(len(images), p.batch_size):
            adv, losses = pgd(images[part].to(ctx.device), loss_fn, p.eps, p.step_size, p.steps,
                              generator=ctx.generator, use_random_start=p.random_start,
                              maximize=p.sign == "+", transform=view, progress=ctx.progress)
            out.append(adv)
            trace.append([loss / len(adv) for loss in losses])  # the loss is a per-image sum
        objective = ObjectiveTrace("denoising loss L_DM of the frozen model, per image", maximize=p.sign == "+")
        objective.extend_mean(trace, weights=[len(a) for a in out])  # over the chunks: the batch's mean
        objective.record(ctx.info)
        ctx.info.update(prompt=p.prompt, adaptive=view is not None,
                        loss_per_image_first=[t[0] for t in trace if t],
                        loss_per_image_last=[t[-1] for t in trace if t])
        return torch.cat(out)
