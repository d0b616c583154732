"""Classic image transforms used as purifiers (JPEG, blur, resizing as in the Anti-DreamBooth and DiffShortcut evaluations).

Each runs the reference implementation (PIL) in ``purify``; ``differentiable_view`` gives
adaptive attacks a torch version of the same operation (exact in float for blur and
resize, the usual differentiable approximation for JPEG).
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from pydantic import Field

from benchbase.components import Context, Params, Purifier
from benchbase.errors import ConfigError
from benchbase.images import from_uint8, to_uint8

from ._common import resize, scaled, straight_through


def _pil_map(images: torch.Tensor, fn) -> torch.Tensor:
    out = [np.asarray(fn(Image.fromarray(arr)).convert("RGB")) for arr in to_uint8(images)]
    return from_uint8(np.stack(out)).to(images.device, images.dtype)


class NoPurifier(Purifier):
    """Identity: the victim trains on the protected images (the lower bound row)."""

    differentiable = True

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        return images


class Oracle(Purifier):
    """Replaces the protected set_B by its clean originals (the upper bound row; DiffShortcut
    ``oracle.sh``). The one purifier that reads ``ctx.identity``."""

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        if ctx.identity is None:
            raise ConfigError("oracle: needs the identity's clean set_B, but the context has no identity")
        clean = ctx.identity.set_B
        if clean.shape != images.shape:
            raise ConfigError(f"oracle: clean set_B has shape {tuple(clean.shape)}, images {tuple(images.shape)}")
        return clean.to(images.device, images.dtype)

    def differentiable_view(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        # the output does not depend on the input: zero gradient, as it should be
        return self.purify(images, ctx) + 0 * images


# ---------------------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------------------

_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def _quant_table(base: list[int], quality: int) -> torch.Tensor:
    """libjpeg's quality scaling of the Annex K tables (what PIL's ``quality=`` does)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    q = [min(max(math.floor((b * scale + 50) / 100), 1), 255) for b in base]
    return torch.tensor(q, dtype=torch.float32).view(8, 8)


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m.float()  # orthonormal DCT-II: coeffs = M @ block @ M.T


def _round_approx(x: torch.Tensor) -> torch.Tensor:
    """Shin & Song (2017) differentiable rounding: round(x) + (x - round(x))^3."""
    r = torch.round(x)
    return r + (x - r) ** 3


def differentiable_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG as a differentiable function: YCbCr, 4:2:0 chroma averaging, 8x8 DCT, quantisation
    with libjpeg's tables and approximate rounding, and the inverse (bilinear chroma upsampling)."""
    n, _, h, w = images.shape
    x = images.float() * 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    ph, pw = (-h) % 16, (-w) % 16  # whole MCUs; libjpeg replicates the edge
    planes = F.pad(torch.stack([y, cb, cr], 1), (0, pw, 0, ph), mode="replicate")
    H, W = planes.shape[-2:]
    chroma = F.avg_pool2d(planes[:, 1:], 2)
    dct = _dct_matrix().to(images.device)

    def code(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        c, hh, ww = plane.shape[1:]
        blocks = (plane - 128).reshape(n, c, hh // 8, 8, ww // 8, 8).permute(0, 1, 2, 4, 3, 5)
        coef = dct @ blocks @ dct.T
        coef = _round_approx(coef / table) * table
        blocks = dct.T @ coef @ dct + 128
        return blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hh, ww)

    luma = code(planes[:, :1], _quant_table(_LUMA, quality).to(images.device))
    chroma = code(chroma, _quant_table(_CHROMA, quality).to(images.device))
    chroma = F.interpolate(chroma, size=(H, W), mode="bilinear", align_corners=False)
    y, cb, cr = luma[:, 0, :h, :w], chroma[:, 0, :h, :w] - 128, chroma[:, 1, :h, :w] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (rgb / 255).clamp(0, 1).to(images.dtype)


class JPEG(Purifier):
    """JPEG re-compression with PIL's libjpeg (4:2:0 subsampling, PIL default) at ``quality``
    (default 75: DiffShortcut ``jpeg.sh`` and the MetaCloak scripts).

    ``differentiable_view``: the real JPEG output forward, the gradient of a differentiable
    JPEG (Shin & Song 2017 rounding) backward; ``gradient = "approx"`` returns the
    approximation itself in both passes.
    """

    class Params(Params):
        quality: int = Field(75, ge=1, le=100)
        gradient: Literal["straight-through-approx", "approx", "bpda"] = "straight-through-approx"

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        def jpeg(img: Image.Image) -> Image.Image:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.params.quality)
            buf.seek(0)
            return Image.open(buf)

        return _pil_map(images, jpeg)

    def differentiable_view(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.params.gradient == "bpda":
            return super().differentiable_view(images, ctx)
        approx = differentiable_jpeg(images, self.params.quality)
        if self.params.gradient == "approx":
            return approx
        return straight_through(self.purify(images.detach(), ctx), approx)


# ---------------------------------------------------------------------------------------
# Gaussian blur
# ---------------------------------------------------------------------------------------


def pil_box_radius(radius: float, passes: int = 3) -> float:
    """The fractional box radius PIL uses per pass to approximate a Gaussian of std ``radius``
    (extended box blur, Pillow ``BoxBlur.c``)."""
    sigma2 = radius * radius / passes
    big_l = math.sqrt(12.0 * sigma2 + 1.0)
    small_l = math.floor((big_l - 1.0) / 2.0)
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * sigma2)
    a /= 6 * (sigma2 - (small_l + 1) * (small_l + 1))
    return small_l + a


def box_blur_torch(images: torch.Tensor, radius: float, passes: int = 3) -> torch.Tensor:
    """Float version of PIL's GaussianBlur: ``passes`` extended box blurs per axis, edges
    replicated. Matches PIL up to PIL's 8-bit rounding between passes; differentiable."""
    if radius <= 0:
        return images
    r = pil_box_radius(radius, passes)
    ri = int(r)
    full = 1.0 / (2 * r + 1)
    frac = (r - ri) * full
    kernel = torch.full((2 * ri + 3,), full, dtype=images.dtype, device=images.device)
    kernel[0] = kernel[-1] = frac
    c = images.shape[1]
    x = images
    pad = ri + 1
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    for _ in range(passes):
        x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), kx, groups=c)
    for _ in range(passes):
        x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), ky, groups=c)
    return x


class GaussianBlur(Purifier):
    """Gaussian blur as PIL ``ImageFilter.GaussianBlur(radius=5)`` (DiffShortcut ``gau.sh``;
    PIL's radius is the standard deviation, so a strong blur at 512 px).

    ``radius`` is stated at 512 px and scaled with the image side (``scale_with_resolution``).
    ``differentiable_view`` runs the same extended box blur in float torch.
    """

    class Params(Params):
        radius: float = Field(5.0, ge=0)
        scale_with_resolution: bool = True

    def radius_for(self, side: int) -> float:
        p = self.params
        return scaled(p.radius, side) if p.scale_with_resolution else p.radius

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        radius = self.radius_for(images.shape[-1])
        return _pil_map(images, lambda img: img.filter(ImageFilter.GaussianBlur(radius)))

    def differentiable_view(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        return box_blur_torch(images, self.radius_for(images.shape[-1]))


# ---------------------------------------------------------------------------------------
# Resize
# ---------------------------------------------------------------------------------------


class Resize(Purifier):
    """Down to ``size`` and back up, PIL bicubic (suite-defined: 512 → 128
    → 512, the same 128-px bottleneck as ``sr`` without the diffusion model).

    ``size`` is stated at 512 px and scaled with the image side. ``differentiable_view``:
    torch antialiased bicubic, which follows PIL's filter.
    """

    class Params(Params):
        size: int = Field(128, ge=1)
        scale_with_resolution: bool = True

    def size_for(self, side: int) -> int:
        p = self.params
        return max(1, round(scaled(p.size, side))) if p.scale_with_resolution else p.size

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        h, w = images.shape[-2:]
        s = self.size_for(w)
        return _pil_map(images, lambda img: img.resize((s, s), Image.BICUBIC).resize((w, h), Image.BICUBIC))

    def differentiable_view(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        h, w = images.shape[-2:]
        s = self.size_for(w)
        # PIL clips the bottleneck image to 8 bits too (bicubic overshoots at strong edges)
        return resize(resize(images, s).clamp(0, 1), (h, w)).clamp(0, 1)
