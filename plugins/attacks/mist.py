"""Mist: semantic / textural / fused protection on the FROZEN model (psyker-team/mist ``mist_v3.py``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from benchbase.components import Attack, Context
from benchbase.toolkit import ObjectiveTrace, pgd, threat_view
from benchbase_plugins.attacks._frozen import (
    chunks,
    frozen_setup,
    load_target,
    semantic_loss,
    target_latent,
    textural_loss,
)


class Mist(Attack):
    """Mist (Liang et al., ICML'23; Mist report arXiv 2305.12683), psyker-team/mist ``mist_v3.py``.

    Targeted L∞ PGD (advertorch, uniform random start in ±ε, constant step) that *minimises*:

    - ``semantic``: ``−L_S``, the denoising loss of the frozen model (= AdvDM);
    - ``textural``: ``L_T = ‖z(x) − z(target)‖²`` (sum), pulling the latent to a target texture;
    - ``fused`` (default): ``L_T − rate·L_S`` with ``rate = 1e4`` (the CLI's ``--rate 1`` is the
      exponent: 10^(1+3)).

    The modes are named, never numbered: the official README and code disagree on 0/1.
    ``z(·)`` is a fresh posterior sample at every evaluation (x and target alike); the
    semantic term uses its own sample, as ``mist_v3`` encodes twice. Defaults: ε 16 levels,
    α 1 level, 100 steps, prompt "a painting" ("a photo" for ``object`` targets, the
    ``object`` flag of the script), target image = the bundled pattern ``mist_target.png``
    (the official ``MIST.png`` is not redistributed; pass ``target_image`` to use it).
    The official saves by truncation (``quantization = "truncate"``); the suite rounds.
    """

    class Params(Attack.Params):
        eps: float = Field(16.0, ge=0)
        step_size: float = Field(1.0, ge=0)
        steps: int = Field(100, ge=0)
        mode: Literal["semantic", "textural", "fused"] = "fused"
        rate: float = Field(1e4, ge=0)  # weight of the semantic term in fused mode
        prompt: str = "a painting"
        target_image: str | None = None  # None: the bundled pattern
        random_start: bool = True
        batch_size: int | None = Field(None, ge=1)
        gradient_checkpointing: bool = False

    supports_adaptive: ClassVar[bool] = True

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        models, cond = frozen_setup(ctx, p.prompt, p.gradient_checkpointing)
        target = load_target(p.target_image, images.shape[-1]).to(ctx.device) if p.mode != "semantic" else None
        view = threat_view(ctx).purify  # None unless adaptive with a purifier chain
        gen = ctx.generator

        def loss_fn(x: torch.Tensor) -> torch.Tensor:  # the quantity Mist MINIMISES
            loss = x.new_zeros(())
            if p.mode != "semantic":
                loss = loss + textural_loss(models, x, target_latent(models, target, gen), gen)
            if p.mode == "semantic":
                loss = loss - semantic_loss(models, x, cond, gen)
            elif p.mode == "fused":
                loss = loss - p.rate * semantic_loss(models, x, cond, gen)
            return loss

        out, last, runs = [], [], []
        for part in chunks(len(images), p.batch_size):
            adv, losses = pgd(images[part].to(ctx.device), loss_fn, p.eps, p.step_size, p.steps,
                              generator=gen, use_random_start=p.random_start, maximize=False,
                              transform=view, progress=ctx.progress)
            out.append(adv)
            last.extend(losses[-1:])
            runs.append([loss / len(adv) for loss in losses])  # the loss is a per-image sum
        what = {"semantic": "minus the denoising loss L_DM", "textural": "textural loss ‖z(x) − z(target)‖²",
                "fused": f"textural loss ‖z(x) − z(target)‖² minus {p.rate:g} × the denoising loss L_DM"}[p.mode]
        objective = ObjectiveTrace(f"mist {p.mode}: {what}, per image", maximize=False)
        objective.extend_mean(runs, weights=[len(a) for a in out])
        objective.record(ctx.info)
        ctx.info.update(prompt=p.prompt, adaptive=view is not None,
                        target_image=p.target_image or "bundled mist_target.png", loss_last=last)
        return torch.cat(out)
