"""Baselines: no protection, and uniform noise at the attack's budget (the control every attack must beat)."""

from __future__ import annotations

import torch
from pydantic import Field

from benchbase.components import Attack, Context, Params


class NoAttack(Attack):
    """Returns set_B unchanged: the row every protection is compared with."""

    class Params(Params):
        pass

    @property
    def eps(self) -> float:
        return 0.0

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        return images.clone()


class UniformNoise(Attack):
    """x + U(-eps, eps) per pixel, i.i.d.; run at the same eps as the attack it is compared with."""

    class Params(Attack.Params):
        eps: float = Field(8.0, ge=0)

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        eps = self.eps / 255.0
        noise = (torch.rand(images.shape, generator=ctx.generator) * 2 - 1) * eps
        return (images + noise.to(images.device)).clamp(0, 1)
