"""Distribution distances of generated images to the clean references: FID and KID."""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
import torch

from benchbase.components import Context, Metric, MetricInputs, MetricValue, Params
from benchbase.errors import WeightsUnavailableError

from ._common import check, pyiqa_cache

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def frechet_distance(f1: np.ndarray, f2: np.ndarray, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (Heusel et al., NeurIPS'17); an ε·I offset is
    added when the product is singular, as pytorch-fid does for small sets."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y/d + 1)³ (Bińkowski et al.,
    ICLR'18), on all samples (the sets here are small, so no subsets)."""
    d = f1.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((f1, f1), (f2, f2), (f1, f2)))
    m, n = len(f1), len(f2)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def fid_available() -> str | None:
    path = pyiqa_cache() / FID_WEIGHTS
    try:
        import pyiqa.archs.inception  # noqa: F401
    except ImportError:
        return f"unavailable: FID Inception-v3 — pip install pyiqa and put {FID_WEIGHTS} in {pyiqa_cache()}"
    if not path.is_file():
        return (f"unavailable: FID Inception-v3 ({FID_WEIGHTS}) — put it in {pyiqa_cache()} "
                f"(pyiqa downloads it there when online: pyiqa.create_metric('fid'))")
    return None


@lru_cache(maxsize=1)
def _inception(device: str):
    message = fid_available()
    if message:
        raise WeightsUnavailableError(message)
    from pyiqa.archs.inception import InceptionV3

    return InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True,
                       use_fid_inception=True).eval().to(device)


@torch.no_grad()
def inception_features(images: torch.Tensor, device: torch.device, batch: int = 16) -> np.ndarray:
    net = _inception(str(device))
    feats = [net(images[i:i + batch].float().to(device))[0].flatten(1).cpu() for i in range(0, len(images), batch)]
    return torch.cat(feats).double().numpy()


class FID(Metric):
    """FID (Heusel et al., NeurIPS'17) of the generated images against the clean set_C, with
    pytorch-fid's Inception-v3 (pyiqa's copy of its weights); KID in ``details``.

    ``statistic`` picks the reported value (``kid`` is unbiased and better suited to the few
    images per identity here). Higher favours the protector. Per prompt and pooled.
    """

    direction: ClassVar[str] = "higher"
    reads: ClassVar[tuple[str, ...]] = ("generated", "references")

    class Params(Params):
        statistic: Literal["fid", "kid"] = "fid"

    def available(self) -> str | None:
        return fid_available()

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        check(self.available)
        stat = frechet_distance if self.params.statistic == "fid" else kernel_inception_distance
        refs = inception_features(inputs.references, ctx.device)
        per_prompt, pooled = {}, []
        for prompt, images in inputs.generated.items():
            feats = inception_features(images, ctx.device)
            per_prompt[prompt] = stat(feats, refs)
            pooled.append(feats)
        gen = np.concatenate(pooled)
        return MetricValue(value=stat(gen, refs), per_prompt=per_prompt, count=len(gen),
                           details={"statistic": self.params.statistic, "fid": frechet_distance(gen, refs),
                                    "kid": kernel_inception_distance(gen, refs), "references": len(refs)})
