"""Face metrics of generated images: FDFR, ISM (Anti-DreamBooth, Van Le et al., ICCV'23) and SER-FIQ (Terhörst et al., CVPR'20).

Detector and embedder are pluggable (``faces.py``); the defaults (MTCNN, dlib) work
offline. Results name the detector and embedder in ``details``: numbers from different
models or reference conventions must never be mixed in one column.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from benchbase.components import Context, Metric, MetricInputs, MetricValue, Params
from benchbase.errors import ConfigError
from benchbase.images import to_uint8

from . import faces
from ._common import aggregate, check, image_groups


class FaceDetectionFailureRate(Metric):
    """FDFR (Anti-DreamBooth, Le et al., ICCV'23): fraction of generated images in which the
    detector finds no face; per prompt and pooled over prompts. Higher favours the protector.

    Anti-DreamBooth detects with RetinaFace-R50 at threshold 0.9 (``detector = "retinaface"``,
    the ``retina-face`` package); ``"scrfd"`` is insightface's SCRFD-10GF at 0.5, a different
    detector. ``detector = "auto"`` (default) is MTCNN (facenet-pytorch, weights in the wheel),
    or the world's own detector on a backend that brings one (its ``default_models``).
    ``details`` name the detector, its model and threshold (``detector_model``), which the
    leaderboard header prints. ``details.face_det_score`` is the soft form (MetaCloak): mean confidence of the
    best face, 0 when none.
    """

    direction: ClassVar[str] = "higher"
    reads: ClassVar[tuple[str, ...]] = ("generated",)

    model_roles: ClassVar[dict[str, str]] = {"detector": "face-detector"}

    class Params(Params):
        detector: str = "auto"  # a face-detector model (`benchbase ls models`): mtcnn, retinaface...
        of: Literal["generated", "protected", "purified", "clean"] = "generated"

    def available(self) -> str | None:
        return faces.auto_available("detector", self.params.detector)

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        model = ctx.find_model("face-detector", self.params.detector)
        name = model.name
        check(lambda: faces.detector_available(model))
        detector = faces.get_detector(model, device=str(ctx.device))
        groups = image_groups(inputs, self.params.of)
        failures, confidences = {}, []
        for group, images in groups.items():
            found = detector.detect(images)
            failures[group] = [0.0 if f else 1.0 for f in found]
            confidences += [max((x.score for x in f), default=0.0) for f in found]
        value = aggregate(failures, detector=name, detector_model=faces.describe(detector))
        value.details["face_det_score"] = float(np.mean(confidences)) if confidences else float("nan")
        return value


def _largest_face_embeddings(images: torch.Tensor, detector, embedder,
                             no_face: str = "drop") -> tuple[list[np.ndarray | None], int]:
    """The embedding of the largest detected face of each image, and how many images had no
    face. Without a face: ``None`` (``no_face = "drop"``) or the embedding of the whole image
    (``"whole-image"``, what deepface does with ``enforce_detection=False``)."""
    arrays = to_uint8(images)
    out, missing = [], 0
    for arr, found in zip(arrays, detector.detect(images)):
        face = faces.largest(found)
        if face is None:
            missing += 1
            if no_face == "whole-image":
                face = faces.whole_image(arr)
        out.append(None if face is None else embedder.embed(arr, face))
    return out, missing


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-12))


class IdentityScoreMatching(Metric):
    """ISM (Anti-DreamBooth): cosine between the embedding of the largest face in each
    generated image and the mean embedding of the identity's clean reference faces.

    ``no_face``: images in which the detector finds no face are excluded (``"drop"``, default:
    Anti-DreamBooth ``evaluations/ism_fdfr.py`` skips them in ``matching_score_genimage_id``,
    they count in FDFR only) or embedded whole (``"whole-image"``: MetaCloak
    ``robust_facecloak/eval_score.py`` ``IMS_get_score`` calls deepface with
    ``enforce_detection=False``, which embeds the whole image when no face is found, so such
    images are scored and usually pull the value down; DiffShortcut ships the same
    ``generic/modi_deepface.py``). The convention applies to the reference images too. The
    value is the mean over scored images, per prompt and pooled. ``reference``: ``set_C``
    (suite default, MetaCloak/DiffShortcut's reference set) or ``adb`` (set_A ∪ set_B clean,
    Anti-DreamBooth's ``evaluations/test.py``). Lower favours the protector. The paper's
    embedder is ArcFace; the offline default is dlib's 128-d ResNet, whose numbers are on
    another scale.
    ``"auto"`` detector/embedder (default): MTCNN + dlib, or the world's own models on a
    backend that brings them (its ``default_models``).
    """

    direction: ClassVar[str] = "lower"
    reads: ClassVar[tuple[str, ...]] = ("generated", "references", "clean", "set_A")
    always_reads: ClassVar[tuple[str, ...]] = ("references", "clean", "set_A")

    model_roles: ClassVar[dict[str, str]] = {"detector": "face-detector", "embedder": "face-embedder"}

    class Params(Params):
        detector: str = "auto"  # a face-detector model (`benchbase ls models`)
        embedder: str = "auto"  # a face-embedder model: dlib, arcface, facenet-vggface2...
        reference: Literal["set_C", "adb"] = "set_C"
        no_face: Literal["drop", "whole-image"] = "drop"
        of: Literal["generated", "protected", "purified"] = "generated"

    def available(self) -> str | None:
        return (faces.auto_available("detector", self.params.detector)
                or faces.auto_available("embedder", self.params.embedder))

    def _references(self, inputs: MetricInputs) -> torch.Tensor:
        if self.params.reference == "set_C":
            refs = inputs.references
        else:
            parts = [x for x in (inputs.set_A, inputs.clean) if x is not None]
            refs = torch.cat(parts) if len(parts) == 2 else None
        if refs is None or len(refs) == 0:
            raise ConfigError(f"ism: reference {self.params.reference!r} needs images the core did not pass")
        return refs

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        det = ctx.find_model("face-detector", self.params.detector)
        emb = ctx.find_model("face-embedder", self.params.embedder)
        det_name, emb_name = det.name, emb.name
        check(lambda: faces.detector_available(det) or faces.embedder_available(emb))
        detector = faces.get_detector(det, device=str(ctx.device))
        embedder = faces.get_embedder(emb)
        no_face = self.params.no_face
        refs, _ = _largest_face_embeddings(self._references(inputs), detector, embedder, no_face)
        ref_embs = [e for e in refs if e is not None]
        if not ref_embs:  # ISM is undefined: say so rather than invent a value
            return MetricValue(value=float("nan"), count=0, details={
                "reason": f"the {det_name} detector finds no face in any reference image",
                "detector": det_name, "embedder": emb_name, "no_face": no_face})
        centre = np.mean(ref_embs, axis=0)
        per_group, without_face = {}, 0
        for group, images in image_groups(inputs, self.params.of).items():
            embs, missing = _largest_face_embeddings(images, detector, embedder, no_face)
            without_face += missing
            per_group[group] = [None if e is None else _cosine(e, centre) for e in embs]
        return aggregate(per_group, detector=det_name, embedder=emb_name, detector_model=faces.describe(detector),
                         embedder_model=faces.describe(embedder), reference=self.params.reference,
                         reference_faces=len(ref_embs), no_face=no_face, images_without_face=without_face)


def serfiq_quality(embeddings: np.ndarray, alpha: float = 130.0, r: float = 0.88) -> float:
    """SER-FIQ from T stochastic embeddings of one face (Terhörst et al., CVPR'20).

    Mean pairwise Euclidean distance of the L2-normalised embeddings d̄ (i < j),
    s = 2·σ(−d̄), then the published normalisation q = σ(α·(s − r)), α = 130, r = 0.88.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    diff = np.linalg.norm(e[:, None, :] - e[None, :, :], axis=-1)
    iu = np.triu_indices(len(e), k=1)
    d = float(diff[iu].mean())
    s = 2.0 / (1.0 + math.exp(d))
    return 1.0 / (1.0 + math.exp(-alpha * (s - r)))


class SERFIQ(Metric):
    """SER-FIQ face image quality (Terhörst et al., CVPR'20) as Anti-DreamBooth evaluates it.

    MTCNN with thresholds (0.6, 0.7, 0.8) and a 50-px minimum face; T = 100 passes with
    dropout through an embedder that has a dropout layer; ``serfiq_quality`` gives the
    published normalisation. Undetected images are skipped. Lower favours the protector.
    The original model is InsightFace's MXNet ArcFace with a dropout layer kept at inference
    (``FaceImageQuality`` in Anti-DreamBooth's ``evaluations``); insightface's ONNX recognition
    models have no dropout node (dropout is dropped at export), so they cannot give the
    stochastic passes. The backend here is FaceNet InceptionResnetV1 (VGGFace2), which the
    SER-FIQ paper also evaluates — numbers differ between backends; suites label the column
    ``ser-fiq-facenet`` and ``details.embedder`` records it.
    """

    direction: ClassVar[str] = "lower"
    reads: ClassVar[tuple[str, ...]] = ("generated",)

    class Params(Params):
        embedder: Literal["facenet-vggface2"] = "facenet-vggface2"
        weights: str | None = None  # local checkpoint path of the embedder
        passes: int = Field(100, ge=1)
        min_face_size: int = Field(50, ge=1)
        of: Literal["generated", "protected", "purified", "clean"] = "generated"

    def available(self) -> str | None:
        cls = faces.model_class("embedder", self.params.embedder)
        if not cls.has_dropout:  # pragma: no cover - the Literal only allows dropout embedders
            return f"unavailable: SER-FIQ — embedder {self.params.embedder!r} has no dropout layer"
        return faces.detector_available("mtcnn") or cls.available(self.params.weights)

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        check(self.available)
        detector = faces.get_detector("mtcnn", min_face_size=self.params.min_face_size,
                                      thresholds=(0.6, 0.7, 0.8), device=str(ctx.device))
        embedder = faces.get_embedder(self.params.embedder, weights=self.params.weights)
        per_group = {}
        for group, images in image_groups(inputs, self.params.of).items():
            arrays = to_uint8(images)
            values = []
            for arr, found in zip(arrays, detector.detect(images)):
                face = faces.largest(found)
                if face is None:
                    values.append(None)
                    continue
                embs = embedder.stochastic_embeddings(arr, face, self.params.passes, generator=ctx.generator)
                values.append(serfiq_quality(embs))
            per_group[group] = values
        return aggregate(per_group, embedder=self.params.embedder, passes=self.params.passes,
                         detector_model=faces.describe(detector), embedder_model=faces.describe(embedder))
