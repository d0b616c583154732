"""ASPL (Anti-DreamBooth, Le et al., ICCV 2023, arXiv 2303.15433), with its targeted (T-ASPL)
and ensemble (E-ASPL) variants: VinAIResearch/Anti-DreamBooth ``attacks/aspl.py``,
``attacks/ensemble_aspl.py``, ``scripts/attack_with_aspl.sh``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field

from benchbase.components import Attack, Context, Prompts
from benchbase.toolkit import ClassPrior, ObjectiveTrace, PosteriorCache, denoise, pgd, threat_view

from ._precision import weights_precision
from ._surrogate import (
    Surrogate,
    SurrogateParams,
    class_latents,
    load_models,
    target_latents,
    targeted_term,
)


@dataclass
class Member:
    """One surrogate of the (possibly ensemble) attack: its models and what its losses need."""

    surrogate: Surrogate
    class_latents: ClassPrior | None
    target: torch.Tensor | None = None
    extra: dict | None = None  # method-specific state (SimAC's timestep sets)
    #: VAE posteriors of the clean set_A's training batches (the same every iteration)
    posteriors: PosteriorCache = field(default_factory=PosteriorCache)

    @property
    def models(self):
        return self.surrogate.models


class ASPL(Attack):
    """Anti-DreamBooth ASPL: alternate DreamBooth surrogate training and PGD (Le et al., ICCV'23).

    Per outer iteration (``max_train_steps`` = 50): save θ; train θ' = θ for 3 steps on clean
    set_A (fresh AdamW, lr 5e-7, prior preservation, text encoder trained); 6 PGD ascent steps
    of ``L_DM(x_B; θ', "a photo of sks person")`` on the whole set_B batch (α 0.6375 levels =
    5e-3 in [−1,1], no random start); restore θ and train it 3 steps on the perturbed set_B.
    Budget 6.375 levels (= 0.05 in [−1,1]). The saved/restored θ is a state dict of the
    trainable tensors (the released code deep-copies the models twice per iteration).

    ``precision = "release"`` (default): UNet, text encoder and VAE in pure bf16 weights, as
    ``train_one_epoch`` and ``pgd_attack`` cast them (``aspl.py`` ``weight_dtype =
    torch.bfloat16``); at lr 5e-7 nearly every surrogate update rounds away, so θ' ≈ θ ≈ the base
    model. ``precision = "fp32"``: the surrogate really fine-tunes (a different attack).

    ``target_image``: T-ASPL — ascend ``L_DM − MSE(DDPM step of ε̂, q(z_target, ε, t−1))``.
    ``ensemble``: E-ASPL — extra backends (``{"name": "sd", "model": ...}``); every member runs the
    sub-steps from the same x_B and the new x_B is the mean of their results (released code).
    """

    class Params(SurrogateParams):
        eps: float = Field(6.375, ge=0)
        max_train_steps: int = Field(50, ge=0)  # outer iterations
        max_f_train_steps: int = Field(3, ge=0)  # surrogate steps per phase
        max_adv_train_steps: int = Field(6, ge=0)  # PGD steps per iteration
        pgd_alpha: float = Field(0.6375, ge=0)  # levels
        target_image: str | None = None
        ensemble: list[dict[str, Any]] = Field(default_factory=list)

    supports_adaptive = True
    method = "aspl"
    #: the weight dtype of the released loop (``precision = "release"``)
    release_precision: ClassVar[str] = "bf16"

    # -- setup ------------------------------------------------------------------------------

    def _backends(self, ctx: Context) -> list:
        backends = [ctx.backend]
        for spec in self.params.ensemble:  # through the run's own plugin registry
            spec = dict(spec)
            backends.append(ctx.create("backends", spec.pop("name"), spec))
        return backends

    def _member(self, ctx: Context, backend, prompts: Prompts, n: int) -> Member:
        p = self.params
        models = load_models(ctx, weights_precision(p.precision, self.release_precision), backend=backend)
        surrogate = Surrogate(models, "lora" if p.lora_rank else "full", p.train_text_encoder,
                              p.lora_rank or 4, p.gradient_checkpointing, generator=ctx.generator)
        cl = class_latents(ctx.with_(backend=backend), models, p, prompts, needed=self._class_images_used())
        target = target_latents(models, p.target_image, n, ctx.generator) if p.target_image else None
        return Member(surrogate, cl, target, {})

    def _class_images_used(self) -> int | None:
        # step indices restart at 0 in every 3-step call: only the first 3 class images are used
        return self.params.max_f_train_steps

    def _prepare(self, member: Member, x0: torch.Tensor, cond: torch.Tensor, ctx: Context) -> None:
        """Hook run once per member before the outer loop (SimAC selects timesteps here)."""

    # -- losses -----------------------------------------------------------------------------

    def _objective(self) -> str:
        """What the PGD ascends, in words (``ctx.info["objective"]``)."""
        text = "surrogate denoising loss L_DM of the protected set_B"
        return text + (" minus the targeted term" if self.params.target_image else "")

    def _timesteps(self, member: Member, n: int, ctx: Context) -> torch.Tensor | None:
        return None  # U{0..T-1} per image

    def loss(self, member: Member, x: torch.Tensor, cond: torch.Tensor, ctx: Context,
             x_clean: torch.Tensor | None = None) -> torch.Tensor:
        """The PGD objective on [0,1] images ``x`` (ascended)."""
        models = member.models
        z = models.encode_images(x, sample=True, generator=ctx.generator)
        out = denoise(models, member.surrogate.unet, z, cond, ctx.generator, self._timesteps(member, len(x), ctx))
        loss = (out["pred"] - out["target"]).pow(2).mean()
        if member.target is not None:
            loss = loss - targeted_term(models, out, member.target, ctx.generator)
        return loss

    # -- the loop -----------------------------------------------------------------------------

    def _train(self, member: Member, images: torch.Tensor, prompts: Prompts, ctx: Context,
               posteriors: PosteriorCache | bool = True) -> list[float]:
        p = self.params
        return member.surrogate.train_steps(
            images, p.max_f_train_steps, prompts, ctx.generator, p=p, class_latents=member.class_latents,
            max_grad_norm=p.max_grad_norm, prior_loss_weight=p.prior_loss_weight, posteriors=posteriors)

    def _pgd(self, member: Member, x0: torch.Tensor, x: torch.Tensor, cond: torch.Tensor, ctx: Context,
             purify: Callable | None) -> tuple[torch.Tensor, list[float]]:
        p = self.params
        view = purify or (lambda v: v)
        with member.surrogate.frozen():
            return pgd(x0, lambda v: self.loss(member, view(v), cond, ctx, x0), p.eps, p.pgd_alpha,
                       p.max_adv_train_steps, start=x)

    def _iteration(self, member: Member, set_A: torch.Tensor, x0: torch.Tensor, x: torch.Tensor,
                   prompts: Prompts, ctx: Context, purify: Callable | None) -> tuple[torch.Tensor, list[float]]:
        p = self.params
        s = member.surrogate
        theta = s.state("cpu" if p.offload_state else None)
        self._train(member, set_A, prompts, ctx, member.posteriors)  # θ' ← θ trained on clean set_A
        cond = s.encode_prompts([prompts.instance] * len(x))
        x_new, losses = self._pgd(member, x0, x, cond, ctx, purify)
        s.load_state(theta)  # back to θ
        del theta
        train_on = x_new if purify is None else purify(x_new).detach()
        self._train(member, train_on, prompts, ctx)  # θ ← θ trained on the perturbed set_B
        return x_new, losses

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        purify, prompts = threat_view(ctx)
        x0 = images.to(ctx.device, torch.float32)
        set_A = ctx.identity.set_A.to(ctx.device, torch.float32)
        members = [self._member(ctx, b, prompts, len(x0)) for b in self._backends(ctx)]
        for m in members:
            self._prepare(m, x0, m.surrogate.encode_prompts([prompts.instance] * len(x0)), ctx)
        x = x0.clone()
        first = last = None
        trace = ObjectiveTrace(self._objective(), maximize=True,
                               per=f"outer iteration: the mean loss of its {p.max_adv_train_steps} PGD steps"
                                   + (" over the ensemble's surrogates" if len(members) > 1 else ""))
        for _ in ctx.progress(range(p.max_train_steps), desc=self.method, leave=False):
            outs, seen = [], []
            for m in members:
                x_j, losses = self._iteration(m, set_A, x0, x, prompts, ctx, purify)
                outs.append(x_j)
                seen.extend(losses)
                if losses:
                    first = losses[0] if first is None else first
                    last = losses[-1]
            if seen:
                trace.add(sum(seen) / len(seen))
            x = outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)
        trace.record(ctx.info)
        ctx.info.update({f"{self.method}_pgd_loss_first": first, f"{self.method}_pgd_loss_last": last,
                         "surrogate_dtype": str(members[0].models.dtype).removeprefix("torch."),
                         "surrogates": len(members), "targeted": p.target_image is not None,
                         "adaptive": ctx.threat is not None})
        return x.detach().cpu()
