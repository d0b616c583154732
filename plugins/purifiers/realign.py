"""``realign``: DiffShortcut's realignment purifier as released (``code-sr``), with an optional
CLIP-guided strength (a benchbase extension, off by default).

The released chain (liuyixin-louis/DiffShortcut ``README.md`` "Simple Purification Code",
``scripts/sub/defense/code.sh`` then ``sr.sh``), applied to every image:

1. CodeFormer (sczhou/CodeFormer ``inference_codeformer.py`` at the commit the repository pins,
   8392d03, run with ``-w 0.5`` and every other flag at its default): RetinaFace-ResNet50
   detection on the image resized to 640 px, 5-landmark alignment to 512-px crops, CodeFormer
   with fidelity w = 0.5, ParseNet face mask, paste back into the input upsampled x2
   (bilinear; images under 512 px are first resized up to 512), no background upsampler;
   the result is saved as an 8-bit PNG;
2. ``defenses/sr.py``: PIL bicubic down to 128x128 px, then the SD x4 upscaler with prompt
   "A photo of a person" and its pipeline defaults: 75 steps, guidance 9, noise level 20.

CodeFormer comes from the ``codeformer-pip`` package (that repository's ``basicsr`` and
``facelib`` code, unchanged); benchbase only loads its weights (with ``weights_only``) and
runs the loop of ``inference_codeformer.py``.

The CLIP-guided strength (``clip_guided = true``) is not DiffShortcut's method: the
image–prompt alignment A(x) = cos(f_I(x), f_T("a photo of a <class>")) of an open_clip model
is calibrated on the backend's class images, and each image gets the lightest strength s
whose output reaches the clean range (s = 0 leaves it unpurified; s = 0.5 is the released
chain: CodeFormer w = 1 − s, upscaler noise level 2·s·20). Its gate model defaults to
OpenAI ViT-L/14, not the ViT-B/32 that ``clip-align`` reports with, so the metric does not
score the very quantity the gate optimised; ``ctx.info["realign"]["gate_model"]`` records it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from pydantic import Field, field_validator

from benchbase.components import Context, Params, Purifier
from benchbase.errors import ConfigError, DataError, WeightsUnavailableError
from benchbase.images import from_uint8, to_uint8
from benchbase.records import FigureSpec

from ._common import resize
from .upscale import UPSCALER, SuperResolution, pil_resize, upscale

# ---------------------------------------------------------------------------------------
# Face restorers: a protocol and a registry
# ---------------------------------------------------------------------------------------


class FaceRestorer(Protocol):
    """Restores the faces of [0,1] NCHW images. ``fidelity`` ∈ [0,1] is CodeFormer's w
    (1 keeps the input face, 0 restores most). Returns [0,1] 8-bit-valued images at the
    restorer's output size (CodeFormer: ``restorer_upscale`` times the input)."""

    def restore(self, images: torch.Tensor, fidelity: float, ctx: Context) -> torch.Tensor: ...


FACE_RESTORERS: dict[str, Callable[..., FaceRestorer]] = {}


def register_face_restorer(name: str, factory: Callable[..., FaceRestorer]) -> None:
    """Make a restorer available to ``realign`` as ``restorer = "<name>"``; ``factory(weights,
    ctx, upscale=...)`` builds it (``weights``: the ``restorer_weights`` parameter)."""
    FACE_RESTORERS[name] = factory


def _bgr_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return [np.ascontiguousarray(a[..., ::-1]) for a in to_uint8(images)]


def _from_bgr(arrays: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    return from_uint8(np.stack([a[..., ::-1] for a in arrays])).to(like.device, like.dtype)


def load_state_dict(path: Path) -> dict:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, never executing pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


#: the files of sczhou/CodeFormer's v0.1.0 release that ``inference_codeformer.py`` downloads
CODEFORMER_FILES = {"net": "codeformer", "detector": "detection_Resnet50_Final", "parser": "parsing_parsenet"}
CODEFORMER_INSTALL = "pip install --no-deps codeformer-pip==0.0.4 lpips==0.1.4"


def codeformer_folder(weights: str | None) -> Path:
    """Where CodeFormer's three weight files are looked up: ``restorer_weights`` or
    ``$TORCH_HOME/hub/codeformer``."""
    return Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "codeformer"


def _weight_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".safetensors", ".pth"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def codeformer_available(weights: str | None = None) -> str | None:
    try:
        import codeformer.facelib.utils.face_restoration_helper  # noqa: F401
    except ImportError:
        return (f"unavailable: CodeFormer — install the sczhou/CodeFormer code: {CODEFORMER_INSTALL} "
                "(S-Lab License 1.0, non-commercial)")
    folder = codeformer_folder(weights)
    missing = [f"{stem}.pth" for stem in CODEFORMER_FILES.values() if _weight_file(folder, stem) is None]
    if missing:
        return (f"unavailable: CodeFormer weights — put {', '.join(missing)} (sczhou/CodeFormer release v0.1.0) "
                f"in {folder} (or set `restorer_weights` to their folder)")
    return None


@contextlib.contextmanager
def _swapped(module, **names):
    """Temporarily replace module-level names (CodeFormer's helper builds its detector and
    parser through download functions; here they come from the files benchbase loaded)."""
    old = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


class CodeFormerRestorer:
    """CodeFormer (Zhou et al., NeurIPS'22) as sczhou/CodeFormer ``inference_codeformer.py``
    runs it by default: RetinaFace-ResNet50 on the image resized to 640 px (faces with an
    eye distance under 5 px dropped), 512-px aligned crops, the network at fidelity w with
    AdaIN, ParseNet mask, paste back at ``upscale`` (2) times the input, no background
    upsampler. The code is the ``codeformer-pip`` package's copy of that repository; the
    three weight files are loaded from ``restorer_weights`` (S-Lab License 1.0, non-commercial)."""

    def __init__(self, weights: str | None, ctx: Context, upscale: int = 2):
        missing = codeformer_available(weights)
        if missing:
            raise WeightsUnavailableError(missing)
        from codeformer.basicsr.archs.codeformer_arch import CodeFormer
        from codeformer.facelib.detection.retinaface.retinaface import RetinaFace
        from codeformer.facelib.detection.retinaface.retinaface import device as facelib_device
        from codeformer.facelib.parsing.parsenet import ParseNet
        from codeformer.facelib.utils import face_restoration_helper as helper_module

        folder = codeformer_folder(weights)
        files = {k: _weight_file(folder, stem) for k, stem in CODEFORMER_FILES.items()}
        try:
            state = load_state_dict(files["net"])
            net = CodeFormer(dim_embd=512, codebook_size=1024, n_head=8, n_layers=9,
                             connect_list=["32", "64", "128", "256"])
            net.load_state_dict(state.get("params_ema", state))
            detector = RetinaFace(network_name="resnet50", half=False)
            det_state = load_state_dict(files["detector"])
            detector.load_state_dict({k.removeprefix("module."): v for k, v in det_state.items()}, strict=True)
            parser = ParseNet(in_size=512, out_size=512, parsing_ch=19)
            parser.load_state_dict(load_state_dict(files["parser"]), strict=True)
        except Exception as exc:  # noqa: BLE001  (a truncated or foreign file: say which; a failure, not absent)
            raise DataError(
                f"CodeFormer weights — the files in {folder} do not load "
                f"({type(exc).__name__}: {str(exc)[:200]}); put the sczhou/CodeFormer v0.1.0 files there") from None
        # facelib's RetinaFace moves its inputs to a device it picks at import time
        self.device = torch.device(facelib_device)
        self.net = net.to(self.device).eval()
        detector, parser = detector.to(self.device).eval(), parser.to(self.device).eval()
        with _swapped(helper_module, init_detection_model=lambda *a, **k: detector,
                      init_parsing_model=lambda *a, **k: parser):
            self.helper = helper_module.FaceRestoreHelper(
                upscale, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50", save_ext="png",
                use_parse=True, device=self.device)
        self.faces: list[int] = []

    def restore_one(self, img: np.ndarray, fidelity: float) -> tuple[np.ndarray, int]:
        """One BGR uint8 image: the loop body of ``inference_codeformer.py``."""
        from codeformer.basicsr.utils import img2tensor, tensor2img
        from torchvision.transforms.functional import normalize

        helper = self.helper
        helper.clean_all()
        helper.read_image(img)
        helper.get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)
        helper.align_warp_face()
        for cropped in helper.cropped_faces:
            t = img2tensor(cropped / 255.0, bgr2rgb=True, float32=True)
            normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
            with torch.no_grad():
                out = self.net(t.unsqueeze(0).to(self.device), w=fidelity, adain=True)[0]
            restored = tensor2img(out, rgb2bgr=True, min_max=(-1, 1)).astype("uint8")
            helper.add_restored_face(restored, cropped)
        helper.get_inverse_affine(None)
        return helper.paste_faces_to_input_image(upsample_img=None, draw_box=False), len(helper.cropped_faces)

    def restore(self, images: torch.Tensor, fidelity: float, ctx: Context) -> torch.Tensor:
        outs, self.faces = [], []
        for img in _bgr_uint8(images):
            out, n = self.restore_one(img, fidelity)
            outs.append(out)
            self.faces.append(n)
        return _from_bgr(outs, images)


class GFPGANRestorer:
    """GFPGAN v1.3/1.4 (Wang et al., CVPR'21) through the ``gfpgan`` package's ``GFPGANer``
    (not DiffShortcut's restorer; an option). Its blend weight is 1 − ``fidelity``. Needs
    ``gfpgan`` installed and the .pth weights as ``restorer_weights``."""

    def __init__(self, weights: str | None, ctx: Context, upscale: int = 1):
        if not weights:
            raise WeightsUnavailableError(
                "unavailable: GFPGAN weights — download GFPGANv1.4.pth from the TencentARC/GFPGAN releases and "
                "set `restorer_weights` to its path (and `pip install gfpgan`)")
        try:
            from gfpgan import GFPGANer  # type: ignore

            self.restorer = GFPGANer(model_path=weights, upscale=upscale, arch="clean", channel_multiplier=2,
                                     bg_upsampler=None, device=ctx.device)
        except Exception as exc:  # noqa: BLE001  (third-party loaders raise anything)
            raise WeightsUnavailableError(f"unavailable: GFPGAN — it could not be loaded from {weights!r} "
                                          f"({type(exc).__name__}: {exc}); `pip install gfpgan` and point "
                                          "`restorer_weights` at the .pth") from None

    def restore(self, images: torch.Tensor, fidelity: float, ctx: Context) -> torch.Tensor:
        outs = []
        for img in _bgr_uint8(images):
            _, _, restored = self.restorer.enhance(img, has_aligned=False, only_center_face=False,
                                                   paste_back=True, weight=1.0 - fidelity)
            outs.append(img if restored is None else restored)
        return _from_bgr(outs, images)


register_face_restorer("codeformer", CodeFormerRestorer)
register_face_restorer("gfpgan", GFPGANRestorer)


# ---------------------------------------------------------------------------------------
# CLIP alignment
# ---------------------------------------------------------------------------------------


class ClipAlignment:
    """cos(f_I(x), f_T(prompt)) with an open_clip model and its own preprocessing (in torch)."""

    def __init__(self, model: str, pretrained: str | None, device: torch.device, ctx: Context | None = None):
        import open_clip

        from benchbase.plugins import find_model

        entry = find_model("clip", model, ctx)  # an open_clip architecture or a registered CLIP
        provider = entry.load()
        message = provider.available(entry.name, pretrained)
        if message:
            raise WeightsUnavailableError(f"{message} (realign's `clip_model` / `clip_pretrained`)")
        self.model, _, self.tokenizer = provider.load(entry.name, pretrained)
        self.model = self.model.to(device).eval().requires_grad_(False)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.size = size[0] if isinstance(size, (list, tuple)) else int(size)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)
        self.device = device
        self.name = f"{entry.name}/{pretrained}" if pretrained else entry.name

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
    """``realign``: DiffShortcut's ``code-sr`` as released (module docstring): CodeFormer
    (w = 0.5, RetinaFace-ResNet50, paste back at 2x) on every image, PIL bicubic down to 128 px,
    then the SD x4 upscaler ("A photo of a person", 75 steps, guidance 9, noise level 20).

    ``restorer = "none"`` drops the face restoration (the chain is then ``sr``); ``"gfpgan"``,
    a name registered with ``register_face_restorer`` or a ``face-restorer`` model
    (``benchbase ls models``; ``"auto"``: the backend's, e.g. mini v3's CodeFormer) swaps it;
    ``sr = false`` drops the upscaling step (the restorer alone). ``clip_guided = true``
    turns on the CLIP-guided strength (a benchbase extension, module docstring).
    ``low_res`` is stated at 512 px and scales with the image side.
    """

    model_roles: ClassVar[dict[str, str]] = {"model": "x4-upscaler", "clip_model": "clip"}
    # per-image alignment before vs after, against the clean range it aims for (ctx.info["realign"])
    report_figures = (FigureSpec("realign: per-image CLIP alignment", kind="scatter", source="purify-info",
                                 x="realign.alignment_before", y="realign.alignment_after",
                                 hline="realign.clean_range.0", xlabel="alignment before realign",
                                 ylabel="alignment after realign", hline_label="clean range (low)"),)

    class Params(Params):
        restorer: str = "codeformer"
        restorer_weights: str | None = None
        fidelity_weight: float = Field(0.5, ge=0, le=1, description="CodeFormer's w")
        restorer_upscale: int = Field(2, ge=1, description="CodeFormer's final upscale (its -s)")
        #: False: the face restorer alone (DiffShortcut's ``code.sh`` without ``sr.sh``), the
        #: output resized back to the input size
        sr: bool = True
        model: str = UPSCALER
        prompt: str = "A photo of a person"
        num_inference_steps: int = Field(75, ge=1)
        guidance_scale: float = Field(9.0, ge=0)
        noise_level: int = Field(20, ge=0, le=350)
        low_res: int = Field(128, ge=4)
        scale_with_resolution: bool = True
        batch_size: int = Field(4, ge=1)
        clip_guided: bool = False
        strengths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
        clip_model: str = "ViT-L-14"
        clip_pretrained: str | None = "openai"
        alignment_prompt: str | None = None
        calibration_images: int = Field(8, ge=1)
        calibration_steps: int = Field(50, ge=1)
        calibration_guidance: float = Field(7.5, ge=0)
        calibration_quantile: float = Field(0.1, ge=0, le=1)
        min_alignment: float | None = Field(None, ge=-1, le=1)  # a cosine similarity

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

    def upscaler(self) -> SuperResolution:
        p = self.params
        if self._sr is None:
            self._sr = SuperResolution(model=p.model, prompt=p.prompt, num_inference_steps=p.num_inference_steps,
                                       guidance_scale=p.guidance_scale, low_res=p.low_res,
                                       scale_with_resolution=p.scale_with_resolution, batch_size=p.batch_size)
            self._sr.name = "realign"
        return self._sr

    def face_restorer(self, ctx: Context) -> FaceRestorer | None:
        name = self.params.restorer
        if name == "none":
            return None
        if self._restorer is None:
            if name in FACE_RESTORERS:
                factory = FACE_RESTORERS[name]
            else:  # a restorer registered by a plugin under the `face-restorer` role ("auto": the backend's)
                from benchbase.errors import UnknownComponentError
                from benchbase.plugins import find_model

                try:
                    factory = find_model("face-restorer", name, ctx).load()
                except (UnknownComponentError, ConfigError) as exc:
                    raise ConfigError(f"realign: unknown face restorer {name!r} ({exc}); built in: none, "
                                      f"{', '.join(sorted(FACE_RESTORERS))}") from None
            self._restorer = factory(self.params.restorer_weights, ctx, upscale=self.params.restorer_upscale)
        return self._restorer

    def chain(self, images: torch.Tensor, fidelity: float, noise_level: int, ctx: Context) -> torch.Tensor:
        """Face restoration on the full-size 8-bit images, PIL bicubic down to the low-res side of
        the *input* size, x4 upscaling, back to the input size."""
        p = self.params
        h, w = images.shape[-2:]
        sr = self.upscaler()
        restorer = self.face_restorer(ctx)
        restored = images if restorer is None else restorer.restore(images, fidelity, ctx)
        if not p.sr:
            return resize(restored, (h, w)).to(images.device, images.dtype).clamp(0, 1)
        low = pil_resize(restored, sr.low_res_side(w))
        pipe = sr.pipeline(ctx)
        outs = []
        for start in range(0, len(low), p.batch_size):
            up = upscale(pipe, low[start:start + p.batch_size], ctx, p.prompt, "", p.num_inference_steps,
                         p.guidance_scale, noise_level, progress_desc="realign sampling")
            outs.append(resize(up, (h, w)))
        return torch.cat(outs).to(images.device, images.dtype).clamp(0, 1)

    def _record(self, ctx: Context, **extra) -> None:
        p = self.params
        info = {"restorer": p.restorer, "clip_guided": p.clip_guided, **extra}
        if p.restorer != "none":
            info.update(fidelity_weight=p.fidelity_weight, restorer_upscale=p.restorer_upscale)
            faces = getattr(self._restorer, "faces", None)
            if faces is not None:
                info["faces_restored"] = list(faces)
        ctx.info["realign"] = info

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        if not p.clip_guided:
            out = self.chain(images, p.fidelity_weight, p.noise_level, ctx)
            self._record(ctx, noise_level=p.noise_level)
            return out
        return self._clip_guided(images, ctx)

    # -----------------------------------------------------------------------------------
    # the CLIP-guided strength (benchbase extension)
    # -----------------------------------------------------------------------------------

    def at_strength(self, images: torch.Tensor, strength: float, ctx: Context) -> torch.Tensor:
        """The chain at strength s: w = 1 − s, noise level 2·s·``noise_level``; s = 0 is the identity."""
        if strength <= 0:
            return images
        noise = min(350, round(2 * strength * self.params.noise_level))
        return self.chain(images, 1.0 - strength, noise, ctx)

    def aligner(self, ctx: Context) -> ClipAlignment:
        if self._clip is None:
            self._clip = ClipAlignment(self.params.clip_model, self.params.clip_pretrained, ctx.device, ctx)
        return self._clip

    def prompt_for_alignment(self, ctx: Context) -> str:
        return self.params.alignment_prompt or f"a photo of a {ctx.prompts.class_noun}"

    def clean_range(self, ctx: Context) -> tuple[float, float, int]:
        """(lower bound, max, count) of the alignment of the backend's class images."""
        p = self.params
        if p.min_alignment is not None:
            return p.min_alignment, float("inf"), 0
        from benchbase.toolkit import class_images

        if ctx.backend is None or ctx.shared is None:
            raise ConfigError("realign: calibrating the clean range needs a backend and shared stages "
                              "(or set `min_alignment`)")
        images = class_images(ctx, ctx.prompts.class_, p.calibration_images, p.calibration_steps,
                              p.calibration_guidance)
        scores = self.aligner(ctx)(images, self.prompt_for_alignment(ctx))
        return float(torch.quantile(scores, p.calibration_quantile)), float(scores.max()), len(scores)

    def _clip_guided(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
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
            candidate = self.at_strength(images[idx], s, ctx)
            scores = align(candidate, prompt)
            still = []
            for k, i in enumerate(pending):
                if scores[k] > best[i] or scores[k] >= low:  # keep the best-aligned fallback
                    best[i], out[i], after[i], chosen[i] = scores[k], candidate[k], scores[k], s
                if scores[k] < low:
                    still.append(i)
            pending = still
        self._record(
            ctx, gate_model=align.name, alignment_prompt=prompt, clean_range=[low, high], calibration_images=count,
            alignment_before=[round(float(v), 6) for v in before],
            alignment_after=[round(float(v), 6) for v in after],
            strength=chosen, in_range_after=[bool(v >= low) for v in after])
        return out
