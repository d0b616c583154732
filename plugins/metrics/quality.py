"""No-reference image quality: BRISQUE (Mittal et al., TIP 2012), LIQE (Zhang et al., CVPR'23), CLIP-IQA(-C) (Wang et al., AAAI'23; -C: MetaCloak's variant).

Only the ``brisque`` package works offline (it ships its SVM). pyiqa's learned metrics need
their checkpoints in pyiqa's cache (``$TORCH_HOME/hub/pyiqa``) and OpenAI CLIP weights in
``$TORCH_HOME/hub/clip``; they are checked before construction so that nothing is
downloaded in the middle of a run.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from benchbase.components import Context, Metric, MetricInputs, MetricValue, Params
from benchbase.errors import WeightsUnavailableError
from benchbase.images import to_uint8

from ._common import aggregate, check, image_groups, missing_files, pyiqa_cache

ImageSet = Literal["generated", "protected", "purified", "clean"]

# files each pyiqa metric loads (its default configuration)
PYIQA_FILES = {
    "brisque": lambda: [pyiqa_cache() / "brisque_svm_weights.pth"],
    "liqe": lambda: [pyiqa_cache() / "liqe_koniq.pt", Path(torch.hub.get_dir()) / "clip" / "ViT-B-32.pt"],
    "liqe_mix": lambda: [pyiqa_cache() / "liqe_mix.pt", Path(torch.hub.get_dir()) / "clip" / "ViT-B-32.pt"],
    "clipiqa": lambda: [Path(torch.hub.get_dir()) / "clip" / "RN50.pt"],
    "clipiqa+": lambda: [Path(torch.hub.get_dir()) / "clip" / "RN50.pt",
                         pyiqa_cache() / "CLIP-IQA+_learned_prompts-603f3273.pth"],
    "lpips": lambda: [pyiqa_cache() / "LPIPS_v0.1_alex-df73285e.pth",
                      Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"],
}
_NEEDS_OPENAI_CLIP = {"liqe", "liqe_mix", "clipiqa", "clipiqa+"}


def pyiqa_available(name: str) -> str | None:
    if importlib.util.find_spec("pyiqa") is None:
        return f"unavailable: pyiqa {name} — pip install pyiqa and put its weights in {pyiqa_cache()}"
    if name in _NEEDS_OPENAI_CLIP and importlib.util.find_spec("pkg_resources") is None:
        return f"unavailable: pyiqa {name} — its OpenAI CLIP loader imports pkg_resources: pip install 'setuptools<81'"
    missing = missing_files(PYIQA_FILES[name]())
    if missing:
        return (f"unavailable: pyiqa {name} — missing weights {', '.join(str(p) for p in missing)}; download them "
                f"once online (pyiqa.create_metric({name!r})) or copy them there")
    return None


@lru_cache(maxsize=4)
def pyiqa_metric(name: str, device: str):
    message = pyiqa_available(name)
    if message:
        raise WeightsUnavailableError(message)
    import pyiqa

    try:
        return pyiqa.create_metric(name, device=torch.device(device))
    except (OSError, ImportError) as exc:  # URLError is an OSError: a file we did not expect
        raise WeightsUnavailableError(f"unavailable: pyiqa {name} — {type(exc).__name__}: {exc}") from None


def _pyiqa_scores(name: str, images: torch.Tensor, device: torch.device) -> list[float]:
    metric = pyiqa_metric(name, str(device))
    with torch.no_grad():
        return [float(metric(x[None].to(device))) for x in images]


@lru_cache(maxsize=1)
def _brisque_package():
    from brisque import BRISQUE

    model = BRISQUE(url=False)
    original = model.calculate_image_quality_score

    # brisque 0.2.0 under numpy 2: the feature list mixes scalars and 1-element arrays and
    # scale_features fails on float(array) (recent numpy refuses float() of a non-scalar array); flatten it first.
    def flattened(features):
        flat = np.concatenate([np.ravel(np.asarray(f, dtype=np.float64)) for f in features])
        return original(flat)

    model.calculate_image_quality_score = flattened
    return model


def brisque_package_available() -> str | None:
    if importlib.util.find_spec("brisque") is None:
        return "unavailable: BRISQUE (brisque package) — pip install brisque (its SVM ships in the wheel)"
    return None


class BRISQUE(Metric):
    """BRISQUE (Mittal et al., TIP 2012), no-reference; lower = better quality, so higher
    favours the protector. Default: the PyPI ``brisque`` package on the image as stored,
    Anti-DreamBooth's implementation (works offline). ``implementation = "pyiqa"`` uses
    pyiqa's port where its SVM weights are cached; the two give different numbers.
    """

    direction: ClassVar[str] = "higher"
    reads: ClassVar[tuple[str, ...]] = ("generated", "protected", "purified", "clean")

    class Params(Params):
        of: ImageSet = "generated"
        implementation: Literal["package", "pyiqa"] = "package"

    def available(self) -> str | None:
        if self.params.implementation == "package":
            return brisque_package_available()
        return pyiqa_available("brisque")

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        check(self.available)
        per_group = {}
        for group, images in image_groups(inputs, self.params.of).items():
            if self.params.implementation == "package":
                model = _brisque_package()
                per_group[group] = [float(model.score(arr)) for arr in to_uint8(images)]
            else:
                per_group[group] = _pyiqa_scores("brisque", images, ctx.device)
        return aggregate(per_group, implementation=self.params.implementation, of=self.params.of)


class LIQE(Metric):
    """LIQE (Zhang et al., CVPR'23) through pyiqa: quality ∈ [1, 5], higher = better, so lower
    favours the protector. ``checkpoint = "mix"`` (default) is the authors' multitask model
    (quality, scene and distortion prompts; pyiqa ``liqe_mix``), the ``LIQE.pt`` that
    MetaCloak's ``robust_facecloak/eval_score.py`` and DiffShortcut's README load through
    ``LIQE/LIQE.py``; ``"koniq"`` is pyiqa's default single-task model trained on KonIQ
    (``liqe``), which scores differently. Needs images of at least 224 px.
    """

    direction: ClassVar[str] = "lower"
    reads: ClassVar[tuple[str, ...]] = ("generated", "protected", "purified", "clean")

    class Params(Params):
        of: ImageSet = "generated"
        checkpoint: Literal["mix", "koniq"] = "mix"

    @property
    def _pyiqa_name(self) -> str:
        return "liqe_mix" if self.params.checkpoint == "mix" else "liqe"

    def available(self) -> str | None:
        return pyiqa_available(self._pyiqa_name)

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        check(self.available)
        name = self._pyiqa_name
        per_group = {g: _pyiqa_scores(name, x, ctx.device) for g, x in image_groups(inputs, self.params.of).items()}
        return aggregate(per_group, implementation=f"pyiqa {name}", checkpoint=self.params.checkpoint)


class CLIPIQA(Metric):
    """CLIP-IQA (Wang et al., AAAI'23) and MetaCloak's CLIP-IQA-C variants; higher = better
    quality, so lower favours the protector.

    ``variant``: ``clipiqa`` / ``clipiqa+`` through pyiqa (RN50, antonym prompts, [0, 1]);
    ``clip-iqac`` (prompts "a good/bad photo of face") or ``clip-face-iqa`` ("good/bad face")
    through open_clip: p = softmax(100·cos), score = p_good − p_bad ∈ [−1, 1], with OpenAI
    ViT-B/32 by default as in MetaCloak (``model``/``pretrained`` configurable: any open_clip pair
    or a registered ``clip`` model, e.g. ``tiny`` for tests; ``"auto"``: the backend's default).
    """

    direction: ClassVar[str] = "lower"
    reads: ClassVar[tuple[str, ...]] = ("generated", "protected", "purified", "clean")
    model_roles: ClassVar[dict[str, str]] = {"model": "clip"}

    class Params(Params):
        of: ImageSet = "generated"
        variant: Literal["clipiqa", "clipiqa+", "clip-iqac", "clip-face-iqa"] = "clipiqa"
        noun: str = "face"  # MetaCloak maps the class noun "person" to "face"
        model: str = "ViT-B-32"
        pretrained: str | None = "openai"

    def available(self, ctx: Context | None = None) -> str | None:
        if self.params.variant in ("clipiqa", "clipiqa+"):
            return pyiqa_available(self.params.variant)
        from .clip import open_clip_available

        return open_clip_available(self.params.model, self.params.pretrained, ctx)

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        check(lambda: self.available(ctx))
        groups = image_groups(inputs, self.params.of)
        if self.params.variant in ("clipiqa", "clipiqa+"):
            per_group = {g: _pyiqa_scores(self.params.variant, x, ctx.device) for g, x in groups.items()}
            return aggregate(per_group, variant=self.params.variant)
        from .clip import IQAC_PROMPTS, _OpenClip, clip_iqa_c

        clip = _OpenClip(self.params.model, self.params.pretrained, ctx.device, ctx)
        prompts = [p.format(noun=self.params.noun) for p in IQAC_PROMPTS[self.params.variant]]
        text = clip.texts(prompts)
        per_group = {g: clip_iqa_c(clip.images(x), text).tolist() for g, x in groups.items()}
        return aggregate(per_group, variant=self.params.variant, prompts=prompts, model=self.params.model,
                         pretrained=self.params.pretrained)
