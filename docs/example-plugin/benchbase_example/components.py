"""The components themselves. Images are float32 NCHW RGB in [0, 1]; budgets in 8-bit levels."""

import torch
import torch.nn.functional as F
from pydantic import Field

from benchbase.components import Attack, Context, Params, Purifier


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


class Median(Purifier):
    """3x3 median filter (reflect padding)."""

    class Params(Params):
        size: int = Field(3, ge=1)

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        k = self.params.size
        padded = F.pad(images, [k // 2] * 4, mode="reflect")
        patches = padded.unfold(2, k, 1).unfold(3, k, 1)
        return patches.reshape(*patches.shape[:4], -1).median(dim=-1).values
