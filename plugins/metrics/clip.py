"""CLIP-based metrics through open_clip: image–prompt alignment (DiffShortcut diagnostic,
DiffShortcut, arXiv 2406.18944) and CLIP-IQA-C / CLIP-Face-IQA (MetaCloak's scorer, Liu et al., CVPR'24)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

import torch
from PIL import Image

from benchbase.components import Context, Metric, MetricInputs, MetricValue, Params
from benchbase.errors import WeightsUnavailableError
from benchbase.images import to_uint8
from benchbase.records import FigureSpec

from ._common import aggregate, check, image_groups

_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_available(model: str, pretrained: str | None, ctx: Context | None = None) -> str | None:
    """None when the ``clip`` model ``model`` (``"auto"``: the backend's default) can be built
    without a download, else the reason."""
    from benchbase.plugins import find_model

    entry = find_model("clip", model, ctx)
    return entry.load().available(entry.name, pretrained)


def load_open_clip(model: str, pretrained: str | None, ctx: Context | None = None):
    """(model, preprocess, tokenizer) of the ``clip`` model ``model``: an open_clip architecture
    with its ``pretrained`` tag or checkpoint, or a model a plugin registers (a world's CLIP)."""
    from benchbase.plugins import find_model

    entry = find_model("clip", model, ctx)
    return entry.load().load(entry.name, pretrained)


def _hub_available(model: str, pretrained: str | None) -> str | None:
    label = f"open_clip {model} ({pretrained})"
    try:
        import open_clip
    except ImportError:
        return f"unavailable: {label} — pip install open_clip_torch"
    if model not in open_clip.list_models():
        import difflib

        from benchbase.plugins import get_plugin_manager

        close = difflib.get_close_matches(model, list(get_plugin_manager().models("clip")), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        return (f"unavailable: {label} — unknown open_clip model{hint}; see open_clip.list_models() and "
                "`benchbase ls models`")
    if not pretrained:
        return f"unavailable: {label} — give pretrained weights (a tag or a local file); random towers score nothing"
    if Path(pretrained).is_file():
        return None
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        return f"unavailable: {label} — unknown pretrained tag; see open_clip.list_pretrained()"
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        parts = hub.split("/")  # "org/repo" or "org/repo/subfolder"
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        for name in _HF_FILES:
            hit = try_to_load_from_cache(repo, f"{sub}/{name}" if sub else name)
            if isinstance(hit, str):
                return None
    url = cfg.get("url")
    if url and (Path.home() / ".cache" / "clip" / Path(url).name).is_file():
        return None
    return (f"unavailable: {label} — its weights are not in the Hugging Face cache; download them once "
            f"online (open_clip.create_model_and_transforms({model!r}, pretrained={pretrained!r})) "
            f"or pass a local checkpoint path as pretrained")


@lru_cache(maxsize=4)
def _hub_load(model: str, pretrained: str | None):
    message = _hub_available(model, pretrained)
    if message:
        raise WeightsUnavailableError(message)
    import open_clip

    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
    except (RuntimeError, OSError) as exc:  # a cache that looked complete but is not
        raise WeightsUnavailableError(f"unavailable: open_clip {model} ({pretrained}) — {exc}") from None
    return net.eval(), preprocess, open_clip.get_tokenizer(model)


class OpenClipHub:
    """The ``clip`` role for any open_clip architecture (``ViT-B-32``...) with a ``pretrained``
    tag (loaded from the Hugging Face cache, never downloaded when offline) or checkpoint file."""

    available = staticmethod(_hub_available)
    load = staticmethod(_hub_load)


class _OpenClip:
    def __init__(self, model: str, pretrained: str | None, device: torch.device, ctx: Context | None = None):
        self.net, self.preprocess, self.tokenizer = load_open_clip(model, pretrained, ctx)
        self.device = device
        self.net.to(device)

    @torch.no_grad()
    def images(self, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """L2-normalised image embeddings, each image through the model's own preprocessing."""
        arrays = to_uint8(x)
        out = []
        for i in range(0, len(arrays), batch):
            pix = torch.stack([self.preprocess(Image.fromarray(a)) for a in arrays[i:i + batch]]).to(self.device)
            out.append(torch.nn.functional.normalize(self.net.encode_image(pix).float(), dim=-1))
        return torch.cat(out).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.net.encode_text(tokens).float(), dim=-1).cpu()


class CLIPAlignment(Metric):
    """CLIP image–prompt alignment A(x) = cos(f_I(x), f_T(p)) (suite-defined, DiffShortcut's
    hypothesis that protections misalign image and prompt; DiffShortcut, arXiv 2406.18944).

    ``of`` picks the images (clean, protected, purified or generated; generated is reported
    per eval prompt), ``prompt`` the caption: ``class`` (default, "a photo of person"),
    ``instance`` ("a photo of sks person") or any literal text. ``model``/``pretrained`` are
    any open_clip pair (default OpenAI ViT-B/32, the authors' tooling) or a ``clip`` model a
    plugin registers (``benchbase ls models``: a world's own CLIP, a random test model);
    ``"auto"`` is the backend's default CLIP. Lower (more misalignment) favours the protector. Compare the same
    ``of`` across cells, or pair clean and protected runs for ΔA.
    """

    direction: ClassVar[str] = "lower"
    reads: ClassVar[tuple[str, ...]] = ("clean", "protected", "purified", "generated")
    # DiffShortcut's diagnostic: alignment of clean vs protected vs purified images, per image
    report_figures = (FigureSpec("CLIP image–prompt alignment: clean vs protected vs purified",
                                 values="details.per_image", image_sets=("clean", "protected", "purified"),
                                 ylabel="cos(image, prompt)"),)

    model_roles: ClassVar[dict[str, str]] = {"model": "clip"}

    class Params(Params):
        of: Literal["clean", "protected", "purified", "generated"] = "protected"
        prompt: str = "class"
        model: str = "ViT-B-32"
        pretrained: str | None = "openai"

    def available(self, ctx: Context | None = None) -> str | None:
        return open_clip_available(self.params.model, self.params.pretrained, ctx)

    def caption(self, ctx: Context) -> str:
        return {"class": ctx.prompts.class_, "instance": ctx.prompts.instance}.get(self.params.prompt,
                                                                                   self.params.prompt)

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        check(lambda: self.available(ctx))
        clip = _OpenClip(self.params.model, self.params.pretrained, ctx.device, ctx)
        text = clip.texts([self.caption(ctx)])[0]
        per_group = {g: (clip.images(x) @ text).tolist() for g, x in image_groups(inputs, self.params.of).items()}
        return aggregate(per_group, caption=self.caption(ctx), model=self.params.model,
                         pretrained=self.params.pretrained, of=self.params.of)


def clip_iqa_c(image_embs: torch.Tensor, text_embs: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """p = softmax(scale · cos(image, [good, bad])); score = p_good − p_bad ∈ [−1, 1]."""
    p = (scale * image_embs @ text_embs.T).softmax(dim=-1)
    return p[:, 0] - p[:, 1]


IQAC_PROMPTS = {
    "clip-iqac": ("a good photo of {noun}", "a bad photo of {noun}"),
    "clip-face-iqa": ("good {noun}", "bad {noun}"),
}
