"""The mini world's auxiliary models, in the shape each role asks for (``benchbase.roles``).

Registered by ``benchbase_plugins.worlds.mini.register_models`` under the name ``mini``:
the face detector (its RetinaFace) and face embedder (its ArcFace), its CLIP and its x4
upscaler. The ``mini`` backend names them as its defaults, so ``"auto"`` models pick them.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from benchbase.errors import WeightsUnavailableError
from benchbase.images import from_uint8, to_uint8
from benchbase_plugins.metrics.faces import Face


class MiniDetector:
    """The benchbase-mini world's face detector (its RetinaFace): a small ResNet trained on the
    world's portraits against backgrounds, patch-shuffled portraits and random blobs
    (``benchbase_plugins.worlds.mini.train``). One face per image at most: a portrait when its
    probability is ≥ ``threshold`` (0.5), with the regressed box and 5 landmarks. Only
    meaningful on 64-px images of the mini world."""

    name: ClassVar[str] = "mini"
    version: ClassVar[str] = "v2"

    def __init__(self, threshold: float = 0.5, device: str | torch.device = "cpu", **_):
        from .models import load_face_models

        missing = self.available()
        if missing:
            raise WeightsUnavailableError(missing)
        self.net = load_face_models(self.version)[1]
        self.threshold = threshold

    def describe(self) -> str:
        return f"benchbase-mini {self.version} detector, threshold {self.threshold}"

    @classmethod
    def available(cls) -> str | None:
        from .models import weights_present

        return weights_present(version=cls.version)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[list[Face]]:
        x = _mini_input(images)
        logit, box, lm = self.net(x)
        side = x.shape[-1]
        out = []
        for p, b, marks in zip(torch.sigmoid(logit), box, lm):
            if p < self.threshold:
                out.append([])
                continue
            out.append([Face(tuple(float(v) * side for v in b), float(p), marks.double().numpy() * side)])
        return out


def _mini_input(images: torch.Tensor) -> torch.Tensor:
    """[0,1] NCHW images at the mini world's 64 px, 8-bit like every scored image."""
    x = from_uint8(to_uint8(images)).float().cpu().contiguous()
    if x.shape[-1] != 64 or x.shape[-2] != 64:
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x


class MiniEmbedder:
    """The benchbase-mini world's face embedder (its ArcFace): a small ResNet trained with a
    CosFace head to tell the world's 1000 training identities apart; 128-d, L2-normalised.
    It embeds the whole 64-px portrait (the world's portraits are face crops already), so the
    box is not used."""

    name: ClassVar[str] = "mini"
    version: ClassVar[str] = "v2"
    has_dropout: ClassVar[bool] = False

    def __init__(self, **_):
        from .models import load_face_models

        missing = self.available()
        if missing:
            raise WeightsUnavailableError(missing)
        self.net = load_face_models(self.version)[0]

    @classmethod
    def available(cls) -> str | None:
        from .models import weights_present

        return weights_present(version=cls.version)

    @torch.no_grad()
    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return self.net(_mini_input(from_uint8(image[None])))[0].double().numpy()


class MiniClip:
    """The ``clip`` role: the world's open_clip CLIP, trained on its portraits and captions
    (``pretrained`` is ignored: the weights are the world's)."""

    version: ClassVar[str] = "v2"

    @classmethod
    def available(cls, name: str, pretrained: str | None) -> str | None:
        from .models import weights_present

        return weights_present(version=cls.version)

    @classmethod
    def load(cls, name: str, pretrained: str | None):
        from .models import load_clip

        return load_clip(cls.version)


def upscaler_folder(name: str) -> str:
    """The ``x4-upscaler`` role: the world's trained x4 upscaler (16 px -> 64 px) as a
    ``StableDiffusionUpscalePipeline`` folder, built once from the shipped weights."""
    from .models import ensure_folder

    return str(ensure_folder("upscaler"))


# ---------------------------------------------------------------------------------------
# v3: the same roles on v3's weights (registered as "mini-v3"), and its new organs
# ---------------------------------------------------------------------------------------


class MiniDetectorV3(MiniDetector):
    """v3's face detector: v2's architecture trained again with CodeFormer's degradations on
    positives and negatives (a blurry or noisy face is still a face)."""

    name: ClassVar[str] = "mini-v3"
    version: ClassVar[str] = "v3"


class MiniEmbedderV3(MiniEmbedder):
    """v3's face embedder: v2's, unchanged."""

    name: ClassVar[str] = "mini-v3"
    version: ClassVar[str] = "v3"


class MiniClipV3(MiniClip):
    """v3's CLIP: trained on full captions, the class prompt and noisy portraits."""

    version: ClassVar[str] = "v3"


def upscaler_folder_v3(name: str) -> str:
    """v3's x4 upscaler: v2's, with the v2 text encoder it was trained with."""
    from .models import ensure_folder

    return str(ensure_folder("upscaler", "v3"))


def pixel_model_folder_v3(name: str) -> str:
    """The ``pixel-diffusion`` role: v3's unconditional pixel DDPM (64 px, guided-diffusion's
    linear schedule) as a ``DDPMPipeline`` folder."""
    from .models import ensure_folder

    return str(ensure_folder("pixel", "v3"))


class MiniRestorer:
    """The ``face-restorer`` role: v3's CodeFormer (``organs.MiniCodeFormer``). The world's
    portraits are aligned 64-px face crops already, so there is no detection, alignment or
    paste-back: the network runs on the whole image at fidelity ``w`` (CodeFormer's
    ``inference_codeformer.py --has_aligned`` path). ``upscale`` > 1 resizes the output as
    CodeFormer's paste-back at ``-s`` would (bicubic)."""

    def __init__(self, weights: str | None, ctx, upscale: int = 1):
        from .models import load_restorer, weights_present

        missing = weights_present(version="v3")
        if missing:
            raise WeightsUnavailableError(missing)
        self.net = load_restorer("v3")
        self.upscale = upscale
        self.faces: list[int] = []

    @torch.no_grad()
    def restore(self, images: torch.Tensor, fidelity: float, ctx) -> torch.Tensor:
        x = _mini_input(images)
        out = (self.net(x * 2 - 1, w=float(fidelity)).clamp(-1, 1) + 1) / 2
        self.faces = [1] * len(out)
        side = images.shape[-1] * self.upscale
        if out.shape[-1] != side:
            out = torch.nn.functional.interpolate(out, size=(side, side), mode="bicubic", align_corners=False)
        return from_uint8(to_uint8(out.clamp(0, 1))).to(images.device, images.dtype)
