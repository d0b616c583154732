"""Models by role: the auxiliary models that metrics and purifiers use (face detector, CLIP...).

A plugin registers models through the ``register_models(register)`` hook, calling
``register(role, name, target, **meta)``: a world registers the models made for it (the mini
world's face detector is ``("face-detector", "mini")``), a method family the real ones
(``("face-detector", "mtcnn")``). A metric or purifier never compares a model name with a
world's name: it asks the registry for a role (``ctx.find_model("clip", name)``), where
``name = "auto"`` means the backend's default for that role (``Backend.default_models``), else
the role's default registration, and any other name the model registered under that name.

``target`` is a lazy ``"module:attr"`` string (imported only when the model is used) or the
object itself; what it must be is the role's contract below. Useful ``meta`` keys:
``description`` (one line for ``benchbase ls models``), ``default=True`` (what ``"auto"``
picks on a backend that declares nothing for the role; one per role) and ``any_name=True``
(this registration also serves names nobody registered — a local folder, a hub id, an
open_clip architecture —, which then reach the target as its ``name`` argument; one per role).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

#: the roles the bundled metrics and purifiers ask for, and what a registered target must be.
#: A plugin may register other roles for its own components; they are listed the same way.
ROLES: dict[str, str] = {
    "face-detector": "a FaceDetector class (benchbase_plugins.metrics.faces): available() classmethod, "
                     "detect(images) -> faces with boxes, scores, 5 landmarks",
    "face-embedder": "a FaceEmbedder class (benchbase_plugins.metrics.faces): available() classmethod, "
                     "embed(image, face) -> identity embedding",
    "clip": "an object with load(name, pretrained) -> (open_clip model, preprocess, tokenizer) and "
            "available(name, pretrained) -> None or the sentence saying why it cannot load",
    "x4-upscaler": "folder(name) -> a local StableDiffusionUpscalePipeline folder or a hub id",
    "pixel-diffusion": "folder(name) -> a local unconditional pixel model folder (DDPMPipeline or UNet2DModel "
                       "+ scheduler), a hub id, or a guided-diffusion .pt checkpoint",
    "lpips": "load(name, device) -> a module d(a, b) of [-1, 1] images, LPIPS-shaped (one distance per pair)",
    "face-restorer": "a class built as cls(weights, ctx, upscale=k) with restore(images, fidelity, ctx) -> [0,1] "
                     "images (fidelity: CodeFormer's w, 1 keeps the input); realign's `restorer`",
}


@dataclass
class ModelEntry:
    """One registered model: its role, name, where it comes from and how to load it."""

    role: str
    name: str
    target: str | Callable[..., Any] | Any
    plugin: str
    meta: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        return str(self.meta.get("description", ""))

    @property
    def default(self) -> bool:
        return bool(self.meta.get("default", False))

    @property
    def any_name(self) -> bool:
        return bool(self.meta.get("any_name", False))

    def load(self) -> Any:
        """Import the target (through ``benchbase.plugins.import_target``)."""
        from benchbase.plugins import import_target

        return import_target(self.target, f"{self.role} model {self.name!r} from plugin {self.plugin!r}")


__all__ = ["ROLES", "ModelEntry"]
