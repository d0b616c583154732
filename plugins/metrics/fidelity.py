"""Pixel-level metrics: perturbation fidelity (PSNR, SSIM, LPIPS, L∞, latent shift) and a model-free score of generations.

``psnr``, ``ssim``, ``lpips`` and ``linf`` compare ``of`` (protected, default, or purified)
with the clean set_B. Their direction depends on ``of``: for protected images closeness to
clean is imperceptibility (good for the protector); for purified images closeness to clean
is a faithful purification (good for the purifier, bad for the protector). The instance
attribute ``direction`` carries that; the class attribute is the ``protected`` case.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from benchbase.components import Context, Metric, MetricInputs, MetricValue, Params
from benchbase.errors import ConfigError
from benchbase.images import psnr

from ._common import check


class _Fidelity(Metric):
    """Base of the full-reference metrics: ``of`` against the clean set_B."""

    reads: ClassVar[tuple[str, ...]] = ("clean", "protected", "purified")
    always_reads: ClassVar[tuple[str, ...]] = ("clean",)

    class Params(Params):
        of: Literal["protected", "purified"] = "protected"

    def __init__(self, **params):
        super().__init__(**params)
        if self.params.of == "purified":  # closeness to clean now favours the purifier
            self.direction = "lower" if type(self).direction == "higher" else "higher"

    def available(self) -> str | None:
        return None

    def pair(self, inputs: MetricInputs) -> tuple[torch.Tensor, torch.Tensor]:
        other = inputs.protected if self.params.of == "protected" else inputs.purified
        if other is None or inputs.clean is None:
            raise ConfigError(f"{self.name or type(self).__name__}: the core passed no {self.params.of!r} or clean images")
        if other.shape != inputs.clean.shape:
            raise ConfigError(f"{self.params.of} images {tuple(other.shape)} and clean {tuple(inputs.clean.shape)} differ")
        return other.float().cpu(), inputs.clean.float().cpu()

    @staticmethod
    def result(values: torch.Tensor, **details) -> MetricValue:
        return MetricValue(value=float(values.mean()), count=len(values),
                           details={**details, "per_image": [float(v) for v in values]})


class PSNR(_Fidelity):
    """PSNR (dB) of ``of`` (protected by default, or purified) against the clean set_B, mean
    over images; identical images count as 100 dB rather than infinity.

    Direction ``higher`` for protected images: an imperceptible protection is better for the
    protector (``lower`` when ``of = purified``).
    """

    direction: ClassVar[str] = "higher"

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        other, clean = self.pair(inputs)
        return self.result(psnr(other, clean).clamp(max=100.0), of=self.params.of)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al., TIP 2004): 11×11 Gaussian window, σ = 1.5, K1 = 0.01,
    K2 = 0.03, population statistics, averaged over the valid region and the RGB channels
    (scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` per channel)."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = _gaussian_window(window, sigma).to(a)[None, None].repeat(c, 1, 1, 1)

    def blur(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1).float()


class SSIM(_Fidelity):
    """SSIM (Wang et al., TIP 2004) of ``of`` against the clean set_B, mean over images
    (``ssim()`` gives the defaults). Higher favours the protector for protected images."""

    direction: ClassVar[str] = "higher"

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        other, clean = self.pair(inputs)
        if min(clean.shape[-2:]) < 11:
            raise ConfigError("ssim needs images of at least 11 px")
        return self.result(ssim(other, clean), of=self.params.of)


class LInf(_Fidelity):
    """Measured L∞ distance (8-bit levels) of ``of`` to the clean set_B: per image, and the
    value is the largest over the set (what a budget bounds). ``details.l2_levels``: mean
    per-image L2 in levels. Lower favours the protector for protected images."""

    direction: ClassVar[str] = "lower"

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        other, clean = self.pair(inputs)
        diff = (other - clean) * 255.0
        per_image = diff.abs().flatten(1).max(dim=1).values
        l2 = diff.flatten(1).norm(dim=1)
        return MetricValue(value=float(per_image.max()), count=len(per_image),
                           details={"of": self.params.of, "per_image": [float(v) for v in per_image],
                                    "mean_linf_levels": float(per_image.mean()), "l2_levels": float(l2.mean())})


class LatentShift(_Fidelity):
    """Relative shift of the autoencoder's posterior mean that the perturbation causes,
    ‖μ(x′) − μ(x)‖₂ / ‖μ(x)‖₂ per image (x′ = ``of``, x = clean set_B, μ = the backend's VAE
    encoder mean), beside the same ratio for uniform noise of the same measured L∞ budget,
    rounded to 8 bits like a PNG (``details.noise_shift``, ``details.ratio_to_noise``).

    A diagnostic, not a protection score: latent-space protections (ASPL, PhotoGuard's encoder
    attack, Mist's textual loss) work through the encoder, whose amplification of small pixel
    changes is their lever (Xue et al., "Toward effective protection against diffusion based
    mimicry through score distillation", ICLR'24, §3). A protection whose shift is no larger
    than noise's cannot change what the victim fine-tunes on much more than noise does.
    Higher favours the protector for protected images.
    """

    direction: ClassVar[str] = "higher"

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        from benchbase.images import linf_levels, quantize_to_budget

        other, clean = self.pair(inputs)
        eps = linf_levels(other, clean)
        noise = (torch.rand(clean.shape, generator=ctx.generator) * 2 - 1) * (eps / 255.0)
        noisy = quantize_to_budget((clean + noise).clamp(0, 1), clean, eps)
        models = ctx.models()
        with torch.no_grad():
            mean = lambda x: models.encode_images(x, sample=False).float().flatten(1).cpu()  # noqa: E731
            mu0, mu, mu_noise = mean(clean), mean(other), mean(noisy)
        norm = mu0.norm(dim=1).clamp_min(1e-12)
        shift, noise_shift = (mu - mu0).norm(dim=1) / norm, (mu_noise - mu0).norm(dim=1) / norm
        ratio = float(shift.mean() / noise_shift.mean()) if float(noise_shift.mean()) > 0 else float("nan")
        return self.result(shift, of=self.params.of, linf_levels=eps, noise_shift=float(noise_shift.mean()),
                           noise_per_image=[float(v) for v in noise_shift], ratio_to_noise=ratio)


class LPIPS(_Fidelity):
    """LPIPS (Zhang et al., CVPR'18), AlexNet v0.1 through pyiqa, of ``of`` against the clean
    set_B; unavailable unless pyiqa's LPIPS head and torchvision's AlexNet weights are cached.
    Lower favours the protector for protected images."""

    direction: ClassVar[str] = "lower"

    def available(self) -> str | None:
        from .quality import pyiqa_available

        return pyiqa_available("lpips")

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        check(self.available)
        from .quality import pyiqa_metric

        metric = pyiqa_metric("lpips", str(ctx.device))
        other, clean = self.pair(inputs)
        with torch.no_grad():
            values = torch.tensor([float(metric(o[None].to(ctx.device), c[None].to(ctx.device)))
                                   for o, c in zip(other, clean)])
        return self.result(values, of=self.params.of, net="alex", version="0.1")


class ReferenceRMSE(Metric):
    """How far generations are from the identity's photos, with no model at all.

    For each generated image, the RMS difference (8-bit levels) to the closest set_C
    reference after downsampling both to ``size`` px; mean over images, per prompt and
    overall. Higher = generations less like the reference photos (good for the
    protector). A crude stand-in until face metrics (ISM, FDFR) are available.
    """

    direction: ClassVar[str] = "higher"
    reads: ClassVar[tuple[str, ...]] = ("generated", "references")

    class Params(Params):
        size: int = Field(32, ge=1)

    def available(self) -> str | None:
        return None

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        size = self.params.size
        refs = F.interpolate(inputs.references.float(), size=(size, size), mode="area").flatten(1)
        per_prompt, all_values = {}, []
        for prompt, images in inputs.generated.items():
            gen = F.interpolate(images.float(), size=(size, size), mode="area").flatten(1)
            dist = torch.cdist(gen, refs) / (gen.shape[1] ** 0.5) * 255.0  # RMS in levels
            nearest = dist.min(dim=1).values
            per_prompt[prompt] = float(nearest.mean())
            all_values.append(nearest)
        values = torch.cat(all_values)
        return MetricValue(value=float(values.mean()), per_prompt=per_prompt, count=len(values))
