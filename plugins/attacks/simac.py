"""SimAC (Wang et al., CVPR 2024): ASPL with adaptive greedy timestep selection and a
feature-interference loss (somuchtome/SimAC ``attacks/time_feature.py``, ``scripts/attack_timestep.sh``)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from benchbase.components import Context
from benchbase.toolkit import denoise, sign_step

from .aspl import ASPL, Member


class SimAC(ASPL):
    """SimAC = ASPL (50×(3 surrogate + 6 PGD), lr 5e-7, prior preservation) plus:

    1. **Greedy timestep selection**, once per set_B image before the ASPL loop, on the base
       surrogate: starting from T = {0..999}, for up to ``select_max_steps`` = 50 rounds while
       |T| > ``select_keep`` = 100: draw ``select_samples`` = 5 timesteps from T, score each by
       ‖∇ₓ L_DM(x, t)‖₁, remove [t_min − 20, t_min + 20) around the lowest-scoring one (t_min
       clamped to [20, 980]) and take one PGD step at the highest-scoring one on a local copy
       of x (discarded at the end). PGD then draws each image's t from its own set.
    2. **Feature interference**: MSE between the outputs of ``conv2`` (before the skip) of the
       last UNet up-block's resnets for the perturbed vs. the clean latent, same (t, ε).
       ``feature_loss = "detached"`` (default) reproduces the released code, which adds the term
       as ``.item()``, a constant with no gradient — it changes neither the gradient nor the
       iterates, so it is not computed. ``"gradient"`` is the paper's objective: the term is
       maximised with its gradient, against the original clean image.

    Budget: the code's ``pgd_eps=16`` is divided by 255 in [−1,1], i.e. **8 levels**; α 0.6375.
    Precision as ASPL's: ``time_feature.py`` casts UNet, text encoder and VAE to pure bf16 in
    ``train_one_epoch``, ``pgd_attack`` and ``select_timestep`` (``precision = "release"``).
    Selection details that differ (low severity, docs/attacks-surrogate.md): the release draws the
    5 candidates with replacement, each with its own forward, and takes the PGD step with a fresh
    forward at the best t; here they are 5 distinct timesteps in one batched pass whose best
    gradient is reused.
    """

    class Params(ASPL.Params):
        eps: float = Field(8.0, ge=0)
        select_max_steps: int = Field(50, ge=0)
        select_samples: int = Field(5, ge=1)
        delta_t: int = Field(20, ge=1)
        select_keep: int = Field(100, ge=1)
        feature_loss: Literal["detached", "gradient"] = "detached"
        feature_weight: float = Field(1.0, ge=0)

    method = "simac"

    # -- 1. timestep selection ---------------------------------------------------------------

    def _prepare(self, member: Member, x0: torch.Tensor, cond: torch.Tensor, ctx: Context) -> None:
        p = self.params
        models, unet = member.models, member.surrogate.unet
        T_max = models.num_train_timesteps
        sets, unfinished = [], 0
        with member.surrogate.frozen():
            for i in ctx.progress(range(len(x0)), desc="simac timesteps", leave=False):
                T = torch.arange(T_max)
                x_local = x0[i:i + 1].clone()
                for _ in range(p.select_max_steps):
                    if len(T) <= p.select_keep:
                        break
                    ts = T[torch.randperm(len(T), generator=ctx.generator)[: p.select_samples]]
                    k = len(ts)
                    # one batched pass: the k losses are independent, so the batch gradient holds
                    # each timestep's own ∇ₓ in its row
                    xs = x_local.expand(k, -1, -1, -1).clone().requires_grad_(True)
                    z = models.encode_images(xs, sample=True, generator=ctx.generator)
                    out = denoise(models, unet, z, cond[:1].expand(k, -1, -1), ctx.generator, ts)
                    per = (out["pred"] - out["target"]).pow(2).flatten(1).mean(1)
                    grad = torch.autograd.grad(per.sum(), xs)[0]
                    scores = grad.abs().flatten(1).sum(1)
                    t_del = int(ts[scores.argmin()].clamp(p.delta_t, T_max - p.delta_t))
                    T = T[(T < t_del - p.delta_t) | (T >= t_del + p.delta_t)]
                    best = int(scores.argmax())
                    x_local = sign_step(x_local, x0[i:i + 1], grad[best:best + 1], p.pgd_alpha / 255,
                                        p.eps / 255)
                if len(T) > p.select_keep:
                    # released code stores nothing here and misaligns later images; keep T instead
                    unfinished += 1
                sets.append(T.to(models.device))
        member.extra["timesteps"] = sets
        ctx.info.update(simac_timesteps_kept=[len(t) for t in sets], simac_selection_unfinished=unfinished,
                        simac_feature_loss=p.feature_loss)

    def _timesteps(self, member: Member, n: int, ctx: Context) -> torch.Tensor | None:
        sets = member.extra.get("timesteps")
        if not sets:
            return None
        picks = [int(torch.randint(len(T), (1,), generator=ctx.generator)) for T in sets[:n]]
        return torch.stack([T[j] for T, j in zip(sets, picks)])

    # -- 2. feature interference ---------------------------------------------------------------

    def _objective(self) -> str:
        text = super()._objective() + " at each image's selected timesteps"
        if self.params.feature_loss == "gradient" and self.params.feature_weight:
            text += f" plus {self.params.feature_weight:g} × the feature-interference MSE"
        return text

    def _feature_modules(self, unet: torch.nn.Module) -> list[torch.nn.Module]:
        return [r.conv2 for r in unet.up_blocks[-1].resnets]  # SD: up_blocks[3].resnets[0..2]

    def loss(self, member: Member, x: torch.Tensor, cond: torch.Tensor, ctx: Context,
             x_clean: torch.Tensor | None = None) -> torch.Tensor:
        p = self.params
        if p.feature_loss == "detached" or x_clean is None or p.feature_weight == 0:
            return super().loss(member, x, cond, ctx)
        models = member.models
        n = len(x)
        t = self._timesteps(member, n, ctx)
        if t is None:
            t = models.sample_timesteps(n, ctx.generator)
        z = models.encode_images(x, sample=True, generator=ctx.generator)
        with torch.no_grad():
            z_c = models.encode_images(x_clean, sample=True, generator=ctx.generator)
        noise = torch.randn(z.shape, generator=ctx.generator, dtype=torch.float32).to(z.device, z.dtype)
        dm, feature = self.feature_interference(member, z, z_c, noise, t, cond)
        return dm + p.feature_weight * feature

    def feature_interference(self, member: Member, z: torch.Tensor, z_clean: torch.Tensor, noise: torch.Tensor,
                             t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_DM of z, feature MSE between z and z_clean) under the same (t, ε); the clean side
        is a no-grad reference, the perturbed side keeps its graph."""
        models, unet = member.models, member.surrogate.unet
        feats: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: feats.append(o)) for m in self._feature_modules(unet)]
        try:
            with torch.no_grad():
                unet(models.noise_scheduler.add_noise(z_clean, noise, t).to(unet.dtype), t, cond.to(unet.dtype))
            clean_feats = [f.detach() for f in feats]
            feats.clear()
            dm = denoise(models, unet, z, cond, timesteps=t, noise=noise).mse()
        finally:
            for h in hooks:
                h.remove()
        feature = torch.stack([(a.float() - b.float()).pow(2).mean() for a, b in zip(feats, clean_feats)]).mean()
        return dm, feature
