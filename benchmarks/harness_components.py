"""Cheap stand-in components for ``benchmarks/harness.py`` (registered by ``harness_standins``):
they do almost no work, so a run of them measures the harness alone: planning, the store,
records, status, leaderboard and report.

Every stage still writes what a real one writes (8-bit PNGs, a fine-tuned "model" file, one
folder per eval prompt, score.json), at 16 px.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from benchbase.components import (
    Attack,
    Backend,
    Dataset,
    IdentityData,
    Metric,
    MetricInputs,
    MetricValue,
    Params,
    Personalizer,
    Prompts,
    Purifier,
)

SIDE = 16


class StubBackend(Backend):
    class Params(Params):
        resolution: int = SIDE

    def fingerprint(self) -> str:
        return f"stub-{self.params.resolution}"

    def describe(self) -> str:
        return "stand-in backend (no model)"


class StubDataset(Dataset):
    class Params(Params):
        identities: int = Field(100, ge=1)
        images_per_set: int = Field(2, ge=1)

    def identities(self) -> list[str]:
        return [f"id{i:05d}" for i in range(self.params.identities)]

    def fingerprint(self, identity: str) -> str:
        return hashlib.sha256(f"{identity}|{self.params.images_per_set}".encode()).hexdigest()[:16]

    def load(self, identity: str, resolution: int) -> IdentityData:
        g = torch.Generator().manual_seed(int(self.fingerprint(identity), 16) % 2**31)
        n = self.params.images_per_set

        def images():
            return (torch.randint(0, 256, (n, 3, resolution, resolution), generator=g) / 255.0).float()

        return IdentityData(identity, images(), images(), images())

    def prompts(self) -> Prompts:
        return Prompts()


class StubAttack(Attack):
    """±eps levels of seeded noise."""

    class Params(Attack.Params):
        eps: float = Field(4.0, ge=0)
        variant: int = 0

    def protect(self, images: torch.Tensor, ctx) -> torch.Tensor:
        noise = torch.rand(images.shape, generator=ctx.generator) * 2 - 1
        return (images + noise * self.params.eps / 255).clamp(0, 1)


class StubPurifier(Purifier):
    class Params(Params):
        strength: float = Field(0.5, ge=0, le=1)
        variant: int = 0

    def purify(self, images: torch.Tensor, ctx) -> torch.Tensor:
        return images * (1 - self.params.strength) + images.mean() * self.params.strength


class StubPersonalizer(Personalizer):
    class Params(Params):
        num_images_per_prompt: int = Field(2, ge=1)

    generation_fields = frozenset({"num_images_per_prompt"})

    def train(self, images: torch.Tensor, ctx, defense, out_dir: Path) -> None:
        (out_dir / "model.txt").write_text(f"{float(images.mean()):.6f}\n")

    def generate(self, model_dir: Path, ctx, defense) -> dict[str, torch.Tensor]:
        level = float((Path(model_dir) / "model.txt").read_text())
        n, side = self.params.num_images_per_prompt, ctx.backend.resolution
        return {p: torch.full((n, 3, side, side), level) + 0.01 * i for i, p in enumerate(ctx.prompts.eval)}


class StubMetric(Metric):
    """The mean pixel of what it reads (one value per image in details, like the real metrics)."""

    class Params(Params):
        of: Literal["generated", "protected", "purified"] = "generated"
        variant: int = 0

    def score(self, inputs: MetricInputs, ctx) -> MetricValue:
        images = getattr(inputs, self.reads[0])
        if isinstance(images, dict):
            per_prompt = {p: float(x.mean()) for p, x in images.items()}
            images = torch.cat(list(images.values()))
        else:
            per_prompt = {}
        per_image = images.flatten(1).mean(1).tolist()
        return MetricValue(value=float(images.mean()), count=len(per_image), per_prompt=per_prompt,
                           details={"per_image": per_image})
