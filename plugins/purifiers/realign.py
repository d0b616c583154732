"""``realign``: DiffShortcut's realignment purifier (``code-sr``, diffshortcut.md §3) with an
alignment-guided strength (suite extension, diffshortcut.md §5).

Chain at strength s ∈ (0, 1]: optional face restoration (CodeFormer fidelity w = 1 − s, or
GFPGAN blend weight s), then PIL bicubic down to 128 px and the SD x4 upscaler conditioned
on noise level 2·s·20 — so s = 0.5 is exactly the paper's chain (CodeFormer w = 0.5, then
``sr`` with noise_level 20) and s = 0 is the identity.

Beyond the paper: the image–prompt alignment A(x) = cos(f_I(x), f_T("a photo of a
<class>")) of an open_clip model is measured before and after; the clean range is
calibrated on the backend's own class images (the prior-preservation images DreamBooth
generates anyway), and each image gets the lightest strength whose output lies in that
range (A ≥ the calibration quantile), so clean content is not over-purified. When no
strength reaches the range, the strength with the highest alignment is used. Alignment
before/after, the chosen strengths and the range go to ``ctx.info["realign"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from pydantic import Field, field_validator

from benchbase.components import Context, Params, Purifier
from benchbase.errors import ConfigError, WeightsUnavailableError
from benchbase.images import from_uint8, to_uint8

from ._common import resize
from .upscale import UPSCALER, SuperResolution

# ---------------------------------------------------------------------------------------
# Face restorers: a protocol and a registry
# ---------------------------------------------------------------------------------------


class FaceRestorer(Protocol):
    """Restores faces in [0,1] NCHW images; ``strength`` ∈ [0,1], 0 = leave as is."""

    def restore(self, images: torch.Tensor, strength: float, ctx: Context) -> torch.Tensor: ...


FACE_RESTORERS: dict[str, Callable[[str | None, Context], FaceRestorer]] = {}


def register_face_restorer(name: str, factory: Callable[[str | None, Context], FaceRestorer]) -> None:
    """Make a restorer available to ``realign`` as ``restorer = "<name>"``; ``factory(weights,
    ctx)`` builds it (``weights``: the ``restorer_weights`` parameter, a local file)."""
    FACE_RESTORERS[name] = factory


def _bgr_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return [np.ascontiguousarray(a[..., ::-1]) for a in to_uint8(images)]


def _from_bgr(arrays: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    out = from_uint8(np.stack([a[..., ::-1] for a in arrays]))
    return resize(out, like.shape[-2:]).clamp(0, 1).to(like.device, like.dtype)


class CodeFormerRestorer:
    """CodeFormer (Zhou et al., NeurIPS'22), sczhou/CodeFormer ``inference_codeformer.py``
    defaults: RetinaFace-ResNet50 detection, 512-px aligned crops, fidelity w, paste back,
    no background upsampler. Needs the CodeFormer repository importable (its ``basicsr``
    registers the ``CodeFormer`` architecture), facexlib, and ``codeformer.pth``
    (S-Lab License 1.0, non-commercial)."""

    def __init__(self, weights: str | None, ctx: Context):
        if not weights:
            raise WeightsUnavailableError(
                "CodeFormer weights are not bundled: download codeformer.pth from the sczhou/CodeFormer releases "
                "and set `restorer_weights` to its path (with the CodeFormer repository on PYTHONPATH).")
        try:
            from basicsr.utils.registry import ARCH_REGISTRY  # type: ignore
            from facexlib.utils.face_restoration_helper import FaceRestoreHelper  # type: ignore

            net = ARCH_REGISTRY.get("CodeFormer")(dim_embd=512, codebook_size=1024, n_head=8, n_layers=9,
                                                  connect_list=["32", "64", "128", "256"])
            state = torch.load(weights, map_location="cpu")
            net.load_state_dict(state.get("params_ema", state))
        except Exception as exc:  # noqa: BLE001  (third-party loaders raise anything)
            raise WeightsUnavailableError(
                f"CodeFormer could not be loaded from {weights!r} ({type(exc).__name__}: {exc}); put the "
                "sczhou/CodeFormer repository on PYTHONPATH and point `restorer_weights` at codeformer.pth.") from None
        self.net = net.to(ctx.device).eval()
        self.helper_cls = FaceRestoreHelper
        self.device = ctx.device

    def restore(self, images: torch.Tensor, strength: float, ctx: Context) -> torch.Tensor:
        w = 1.0 - strength  # CodeFormer's fidelity weight: 1 keeps the input, 0 restores most
        outs = []
        for img in _bgr_uint8(images):
            try:
                helper = self.helper_cls(2, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50",
                                         save_ext="png", use_parse=True, device=self.device)
            except Exception as exc:  # noqa: BLE001  (third-party loaders raise anything)
                raise WeightsUnavailableError(f"facexlib's RetinaFace/parsing weights are not available "
                                              f"({type(exc).__name__}); run once with internet access.") from None
            helper.read_image(img)
            helper.get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)
            helper.align_warp_face()
            for face in helper.cropped_faces:
                t = torch.from_numpy(face[..., ::-1].copy()).permute(2, 0, 1).float().div(255)
                t = ((t - 0.5) / 0.5).unsqueeze(0).to(self.device)
                with torch.no_grad():
                    restored = self.net(t, w=w, adain=True)[0].clamp(-1, 1)
                arr = ((restored[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
                helper.add_restored_face(np.ascontiguousarray(arr[..., ::-1]), face)
            helper.get_inverse_affine(None)
            outs.append(helper.paste_faces_to_input_image(upsample_img=None) if helper.cropped_faces else img)
        return _from_bgr(outs, images)


class GFPGANRestorer:
    """GFPGAN v1.3/1.4 (Wang et al., CVPR'21) through the ``gfpgan`` package's ``GFPGANer``;
    ``strength`` is its blend weight. Needs ``gfpgan`` installed and the .pth weights."""

    def __init__(self, weights: str | None, ctx: Context):
        if not weights:
            raise WeightsUnavailableError(
                "GFPGAN weights are not bundled: download GFPGANv1.4.pth from the TencentARC/GFPGAN releases and "
                "set `restorer_weights` to its path (and `pip install gfpgan`).")
        try:
            from gfpgan import GFPGANer  # type: ignore

            self.restorer = GFPGANer(model_path=weights, upscale=1, arch="clean", channel_multiplier=2,
                                     bg_upsampler=None, device=ctx.device)
        except Exception as exc:  # noqa: BLE001  (third-party loaders raise anything)
            raise WeightsUnavailableError(f"GFPGAN could not be loaded from {weights!r} ({type(exc).__name__}: "
                                          f"{exc}); `pip install gfpgan` and point `restorer_weights` at the .pth.") from None

    def restore(self, images: torch.Tensor, strength: float, ctx: Context) -> torch.Tensor:
        outs = []
        for img in _bgr_uint8(images):
            _, _, restored = self.restorer.enhance(img, has_aligned=False, only_center_face=False,
                                                   paste_back=True, weight=strength)
            outs.append(img if restored is None else restored)
        return _from_bgr(outs, images)


register_face_restorer("codeformer", CodeFormerRestorer)
register_face_restorer("gfpgan", GFPGANRestorer)


# ---------------------------------------------------------------------------------------
# CLIP alignment
# ---------------------------------------------------------------------------------------


class ClipAlignment:
    """cos(f_I(x), f_T(prompt)) with an open_clip model and its own preprocessing (in torch)."""

    def __init__(self, model: str, pretrained: str | None, device: torch.device):
        import open_clip

        if model == "tiny":
            from ._tiny_models import (
                TINY_CLIP_NAME,
                register_tiny_clip,
                tiny_clip_checkpoint,
            )

            register_tiny_clip()
            model, pretrained = TINY_CLIP_NAME, str(tiny_clip_checkpoint())
        if model == "mini":  # the benchbase-mini world's CLIP (weights ship with benchbase)
            from benchbase_plugins.worlds.mini.models import CLIP_NAME, load_clip

            self.model, pretrained = load_clip()[0], "benchbase-mini"
            model = CLIP_NAME
        else:
            self.model = None
        try:
            if self.model is None:
                self.model = open_clip.create_model(model, pretrained=pretrained or None)
        except Exception as exc:  # noqa: BLE001  (third-party loaders raise anything)
            raise WeightsUnavailableError(
                f"open_clip {model} weights {pretrained!r} are not available ({type(exc).__name__}): download them "
                "on a machine with internet access and set `clip_pretrained` to the local checkpoint file "
                '(or `clip_model = "tiny"` for the offline stand-in).') from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.size = size[0] if isinstance(size, (list, tuple)) else int(size)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
        self.device = device
        self.name = f"{model}/{pretrained}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)  # resize the short side, center crop: open_clip's eval transform
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = resize(x, (nh, nw))
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = (x[..., top:top + self.size, left:left + self.size] - self.mean) / self.std
        img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer([prompt]).to(self.device)).float(), dim=-1)
        return (img @ txt.T).squeeze(1).cpu()


# ---------------------------------------------------------------------------------------
# The purifier
# ---------------------------------------------------------------------------------------


class Realign(Purifier):
    """``realign``: DiffShortcut realignment (CodeFormer w = 0.5 → 128 px → SD x4 upscaler,
    "A photo of a person", 75 steps, guidance 9, noise_level 20) with the lightest strength
    that brings each image's CLIP alignment into the clean range (see the module docstring).

    ``adaptive = false`` applies the fixed ``strength`` (0.5 = the paper's chain). No face
    restorer is bundled: ``restorer = "codeformer" | "gfpgan"`` (or a name registered with
    ``register_face_restorer``) with ``restorer_weights``; without one the chain is ``sr``.
    """

    class Params(Params):
        restorer: str | None = None
        restorer_weights: str | None = None
        model: str = UPSCALER
        prompt: str = "A photo of a person"
        num_inference_steps: int = Field(75, ge=1)
        guidance_scale: float = 9.0
        noise_level_at_half: int = Field(20, ge=0, le=175, description="upscaler noise level at strength 0.5")
        low_res: int = Field(128, ge=4)
        scale_with_resolution: bool = True
        adaptive: bool = True
        strength: float = Field(0.5, ge=0, le=1)
        strengths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
        clip_model: str = "ViT-B-32"
        clip_pretrained: str | None = "openai"
        alignment_prompt: str | None = None
        calibration_images: int = Field(8, ge=1)
        calibration_steps: int = Field(50, ge=1)
        calibration_guidance: float = 7.5
        calibration_quantile: float = Field(0.1, ge=0, le=1)
        min_alignment: float | None = None

        @field_validator("strengths")
        @classmethod
        def _sorted(cls, v: list[float]) -> list[float]:
            if not v or any(not 0 <= s <= 1 for s in v):
                raise ValueError("strengths must be a non-empty list of values in [0, 1]")
            return sorted(set(v))

    _sr = None
    _restorer = None
    _clip = None

    def release(self) -> None:
        self._sr = self._restorer = self._clip = None

    def _upscaler(self, strength: float) -> SuperResolution:
        p = self.params
        if self._sr is None:
            self._sr = SuperResolution(model=p.model, prompt=p.prompt, num_inference_steps=p.num_inference_steps,
                                       guidance_scale=p.guidance_scale, low_res=p.low_res,
                                       scale_with_resolution=p.scale_with_resolution)
            self._sr.name = "realign"
        self._sr.params.noise_level = min(350, round(2 * strength * p.noise_level_at_half))
        return self._sr

    def _face_restorer(self, ctx: Context) -> FaceRestorer | None:
        name = self.params.restorer
        if name is None:
            return None
        if name not in FACE_RESTORERS:
            raise ConfigError(f"realign: unknown face restorer {name!r}; known: {', '.join(sorted(FACE_RESTORERS))}")
        if self._restorer is None:
            self._restorer = FACE_RESTORERS[name](self.params.restorer_weights, ctx)
        return self._restorer

    def chain(self, images: torch.Tensor, strength: float, ctx: Context) -> torch.Tensor:
        """The realignment chain at one strength (0 = identity)."""
        if strength <= 0:
            return images
        restorer = self._face_restorer(ctx)
        if restorer is not None:
            images = restorer.restore(images, strength, ctx)
        return self._upscaler(strength).purify(images, ctx)

    def aligner(self, ctx: Context) -> ClipAlignment:
        if self._clip is None:
            self._clip = ClipAlignment(self.params.clip_model, self.params.clip_pretrained, ctx.device)
        return self._clip

    def prompt_for_alignment(self, ctx: Context) -> str:
        return self.params.alignment_prompt or f"a photo of a {ctx.prompts.class_noun}"

    def clean_range(self, ctx: Context) -> tuple[float, float, int]:
        """(lower bound, max, count) of the alignment of the backend's class images."""
        p = self.params
        if p.min_alignment is not None:
            return p.min_alignment, float("inf"), 0
        from benchbase_plugins.personalizers.dreambooth import class_images

        if ctx.backend is None or ctx.shared is None:
            raise ConfigError("realign: calibrating the clean range needs a backend and shared stages "
                              "(or set `min_alignment`)")
        images = class_images(ctx, ctx.prompts.class_, p.calibration_images, p.calibration_steps,
                              p.calibration_guidance)
        scores = self.aligner(ctx)(images, self.prompt_for_alignment(ctx))
        return float(torch.quantile(scores, p.calibration_quantile)), float(scores.max()), len(scores)

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        if not p.adaptive:
            out = self.chain(images, p.strength, ctx)
            ctx.info["realign"] = {"strength": [p.strength] * len(images), "adaptive": False}
            return out
        align = self.aligner(ctx)
        prompt = self.prompt_for_alignment(ctx)
        low, high, count = self.clean_range(ctx)
        before = align(images, prompt)
        out = images.clone()
        after = before.clone()
        chosen = [p.strengths[0]] * len(images)
        best = before.clone()
        pending = [i for i in range(len(images)) if not (p.strengths[0] <= 0 and before[i] >= low)]
        if p.strengths[0] > 0:  # no identity candidate: the lightest strength is the floor
            best = torch.full_like(before, -float("inf"))
        for s in p.strengths:
            if not pending or s <= 0:
                continue
            idx = torch.tensor(pending)
            candidate = self.chain(images[idx], s, ctx)
            scores = align(candidate, prompt)
            still = []
            for k, i in enumerate(pending):
                if scores[k] > best[i] or scores[k] >= low:  # keep the best-aligned fallback
                    best[i], out[i], after[i], chosen[i] = scores[k], candidate[k], scores[k], s
                if scores[k] < low:
                    still.append(i)
            pending = still
        ctx.info["realign"] = {
            "adaptive": True, "clip_model": align.name, "alignment_prompt": prompt,
            "clean_range": [low, high], "calibration_images": count,
            "alignment_before": [round(float(v), 6) for v in before],
            "alignment_after": [round(float(v), 6) for v in after],
            "strength": chosen,
            "in_range_after": [bool(v >= low) for v in after],
        }
        return out
