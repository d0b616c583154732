"""Protections computed elsewhere, evaluated as they are (``precomputed``).

A researcher often holds photos protected by someone else's code: the authors' released
scripts, a GUI tool (Mist, Glaze), a collaborator's run. This attack reads them from a folder
in the Anti-DreamBooth layout, ``<root>/<identity>/set_B/<stem>.png`` (the stems of the
dataset's clean set_B files), checks them against the clean set_B the suite would protect
(count, names, size, 8-bit lossless PNG), measures the perturbation (L∞ and L2 in 8-bit
levels, per image) and refuses (default) or flags images over the declared budget ``eps``.

Nothing is optimised here, so the protect stage's key does not name the folder: ``config()``
replaces ``root`` by a SHA-256 of the bytes of every file under ``<root>/*/set_B/`` (with
their relative names). Moving the folder keeps the cache; changing one pixel recomputes.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from benchbase.components import Attack, Context, IdentityData
from benchbase.errors import ConfigError, DataError
from benchbase.images import IMAGE_SUFFIXES, pil_to_tensor, save_pngs

SET = "set_B"
#: PIL modes that hold 8 bits per channel and convert to RGB without loss of the colour values
_EIGHT_BIT = {"RGB", "RGBA", "L", "LA", "P"}


def _set_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"*/{SET}/*") if p.is_file())


@lru_cache(maxsize=16)
def _digest(root: Path, stamp: tuple) -> str:
    h = hashlib.sha256()
    for path in _set_files(root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def images_digest(root: str | Path) -> str:
    """SHA-256 over the bytes (and relative names) of every file in ``<root>/*/set_B/``;
    recomputed only when a file's size or modification time changes."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"precomputed: folder {root} does not exist")
    files = _set_files(root)
    if not files:
        raise DataError(f"precomputed: {root} has no <identity>/{SET}/ images")
    stamp = tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(root, stamp)


def clean_stems(data: IdentityData) -> list[str]:
    """The names the protected files must carry: the stems of the clean set_B files, in order."""
    stems = [Path(f).stem for f in data.files.get(SET) or []]
    if len(stems) != len(data.set_B):
        raise DataError(f"precomputed: the dataset gives no file names for {data.name}'s {SET}; "
                        "protected images are matched to the clean ones by name")
    return stems


def _load_png(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            if fmt != "PNG":
                raise DataError(f"precomputed: {path} is {fmt}, not PNG: a lossy or re-encoded file is not "
                                "what the protector produced (save the protected images as PNG)")
            if mode not in _EIGHT_BIT:
                raise DataError(f"precomputed: {path} has mode {mode}; benchbase scores 8-bit RGB images "
                                "(save as 8-bit RGB PNG)")
            if mode in ("RGBA", "LA") and np.asarray(img.getchannel("A")).min() < 255:
                raise DataError(f"precomputed: {path} has transparent pixels; a protected photo is opaque")
            return pil_to_tensor(img.convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise DataError(f"precomputed: cannot read {path}: {exc}") from None


def export_clean_set_b(data: IdentityData, root: str | Path) -> list[Path]:
    """Write an identity's clean set_B as ``<root>/<identity>/set_B/<stem>.png``: the input an
    external protection tool needs, with the names ``precomputed`` expects back."""
    # save_pngs keeps Path(name).stem: the suffix protects stems that contain a dot
    return save_pngs(data.set_B, Path(root) / data.name / SET, [f"{s}.png" for s in clean_stems(data)])


class Precomputed(Attack):
    """Protected set_B images read from ``root`` (Anti-DreamBooth layout), checked, measured,
    and used as they are."""

    class Params(Attack.Params):
        root: str = Field(description="folder with <identity>/set_B/<clean stem>.png")
        eps: float = Field(gt=0, le=255, description="declared L∞ budget in 8-bit levels")
        over_budget: Literal["refuse", "flag"] = Field(
            "refuse", description="refuse: an image over eps is an error; flag: keep it as it is and record it")

    def config(self) -> dict:
        """Parameters for the stage key and provenance: the image bytes' digest instead of the path."""
        out = self.params.model_dump(mode="json")
        out.pop("root")
        out["images_sha256"] = images_digest(self.params.root)
        return out

    @property
    def eps(self) -> float:
        # flag mode uses the images as they are: the core's budget clip must not touch them
        return float(self.params.eps) if self.params.over_budget == "refuse" else 255.0

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        data = ctx.identity
        if data is None:
            raise ConfigError("precomputed: the core passed no identity (its name selects the folder)")
        folder = Path(self.params.root).expanduser() / data.name / SET
        if not folder.is_dir():
            raise DataError(f"precomputed: {folder} is missing (expected <root>/<identity>/{SET}/)")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        found = {p.stem: p for p in files}
        if len(found) != len(files):
            raise DataError(f"precomputed: {folder} holds two files with the same name stem; keep one PNG per image")
        stems = clean_stems(data)
        missing = [s for s in stems if s not in found]
        extra = sorted(set(found) - set(stems))
        if missing or extra or len(found) != len(images):
            raise DataError(f"precomputed: {folder} must hold exactly the clean {SET}'s {len(stems)} images "
                            f"as <stem>.png; missing {missing or 'none'}, unexpected {extra or 'none'}")
        protected = []
        for stem, clean in zip(stems, images):
            x = _load_png(found[stem])
            if x.shape != clean.shape:
                raise DataError(f"precomputed: {found[stem]} is {x.shape[2]}×{x.shape[1]} px, the clean image "
                                f"{clean.shape[2]}×{clean.shape[1]} px (protect the images at the run resolution; "
                                "resizing would change the perturbation)")
            protected.append(x)
        adv = torch.stack(protected)
        clean8 = torch.floor(images.detach().float().cpu().clamp(0, 1) * 255 + 0.5)
        diff = adv * 255 - clean8  # exact integers: both are on the 8-bit grid
        linf = diff.abs().flatten(1).amax(1)
        l2 = diff.flatten(1).norm(dim=1)
        over = [s for s, v in zip(stems, linf.tolist()) if v > self.params.eps + 1e-6]
        if over and self.params.over_budget == "refuse":
            worst = max(linf.tolist())
            raise DataError(f"precomputed: {len(over)} image(s) of {data.name} exceed the declared budget "
                            f"eps = {self.params.eps:g} levels (largest L∞ {worst:g}): {', '.join(over)}; "
                            "declare the budget they were made with, or set over_budget = \"flag\"")
        ctx.info.update(declared_eps=float(self.params.eps), over_budget=over,
                        linf_levels_per_image=[float(v) for v in linf], l2_levels_per_image=[float(v) for v in l2],
                        images_sha256=hashlib.sha256(b"".join(p.read_bytes() for p in
                                                              (found[s] for s in stems))).hexdigest())
        return adv.to(images.device)
