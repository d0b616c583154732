"""The image convention, 8-bit budgets, PNG I/O and quantisation.

Images are float32 NCHW RGB in [0, 1]. Protected and purified images are stored as
8-bit PNG, because that is what a victim downloads, so every budget is checked after
quantisation against the 8-bit preprocessed clean image.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from benchbase.errors import BudgetError, DataError
from benchbase.store import file_mode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 16  # smaller images cannot be resized meaningfully to a training resolution


def levels(eps: float) -> float:
    """8-bit levels -> [0, 1] units."""
    return eps / 255.0


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with a clear message for anything unusable.

    Grayscale, palette and CMYK images are converted to RGB; RGBA and LA images are
    composited on white (a transparent background would otherwise turn black).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None
    if min(rgb.size) < MIN_SIDE:
        raise DataError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, smaller than {MIN_SIDE} px on a side")
    return rgb


def preprocess(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` (bilinear) and center-crop a square, as every
    DreamBooth/Anti-DreamBooth script does (torchvision Resize + CenterCrop)."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def load_image(path: str | os.PathLike, resolution: int | None = None) -> torch.Tensor:
    """Load one image as (3, H, W) float in [0, 1] on the 8-bit grid."""
    img = open_rgb(path)
    if resolution is not None:
        img = preprocess(img, resolution)
    return pil_to_tensor(img)


def load_images(paths: list[Path], resolution: int | None = None) -> torch.Tensor:
    if not paths:
        raise DataError("no images to load")
    return torch.stack([load_image(p, resolution) for p in paths])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) [0,1] -> (N, H, W, 3) uint8, rounding half up (Anti-DreamBooth's convention)."""
    x = images.detach().float().cpu().clamp(0, 1)
    return torch.floor(x * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(255.0)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid (what saving as PNG does)."""
    return from_uint8(to_uint8(images))


def quantize_to_budget(
    adv: torch.Tensor, clean: torch.Tensor, eps_levels: float | None, mode: str = "round"
) -> torch.Tensor:
    """Quantise a perturbed batch to 8 bits so the PNG satisfies the L∞ budget exactly.

    ``round``: round half up, then clip the integer difference to ±floor(eps) against the
    8-bit clean image (the suite default: what saving a float image as PNG does). ``truncate``: floor, as
    Mist, Diff-Protect and MetaCloak save, then the same clip. ``eps_levels=None`` skips
    the clip (attacks without a budget, e.g. ``none``).
    """
    x = adv.detach().float().cpu().clamp(0, 1) * 255.0
    q = torch.floor(x + 0.5) if mode == "round" else torch.floor(x)
    ref = torch.floor(clean.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5)
    if eps_levels is not None:
        bound = math.floor(eps_levels + 1e-6)
        q = ref + (q - ref).clamp(-bound, bound)
    return q.clamp(0, 255) / 255.0


def check_images(images: torch.Tensor, like: torch.Tensor, what: str) -> None:
    """A stage's output must be finite and shaped like its input: NaN/inf would turn into
    arbitrary 8-bit values when saved, and a wrong shape into images nobody asked for."""
    if not isinstance(images, torch.Tensor):
        raise BudgetError(f"{what} returned {type(images).__name__}, not a tensor of images")
    if tuple(images.shape) != tuple(like.shape):
        raise BudgetError(f"{what} returned shape {tuple(images.shape)}, expected {tuple(like.shape)}")
    bad = int((~torch.isfinite(images.detach())).sum())
    if bad:
        raise BudgetError(f"{what} returned {bad} NaN/inf values")


def assert_budget(protected: torch.Tensor, clean: torch.Tensor, eps_levels: float, what: str) -> float:
    """The core's check on every protection, after quantisation: measured L∞ ≤ ⌊eps⌋ levels
    (eps itself finite and ≥ 0), or a BudgetError. Returns the measured L∞ in levels."""
    if not isinstance(eps_levels, (int, float)) or not math.isfinite(eps_levels) or eps_levels < 0:
        raise BudgetError(f"{what}: eps = {eps_levels!r} is not a budget (a finite number of levels ≥ 0)")
    check_images(protected, clean, what)
    linf = linf_levels(protected, clean)
    if not math.isfinite(linf) or linf > math.floor(eps_levels + 1e-6):
        raise BudgetError(f"{what}: measured L∞ {linf:g} levels after quantisation exceeds the budget "
                          f"⌊eps⌋ = {math.floor(eps_levels + 1e-6)} levels")
    return linf


def linf_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """L∞ distance in 8-bit levels, measured on the 8-bit values a PNG holds (exact integers)."""
    qa, qb = (torch.floor(x.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5) for x in (a, b))
    return float((qa - qb).abs().max())


def l2_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image L2 distance (over the whole image tensor) in 8-bit levels."""
    diff = (a.float().cpu() - b.float().cpu()) * 255.0
    return float(diff.flatten(1).norm(dim=1).mean())


def atomic_save_png(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(img).save(tmp, format="PNG")
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pngs(images: torch.Tensor, folder: Path, names: list[str] | None = None) -> list[Path]:
    """Save a batch as 8-bit PNGs (``names`` without suffix; default 0000, 0001...)."""
    arr = to_uint8(images)
    names = names or [f"{i:04d}" for i in range(len(arr))]
    paths = []
    for img, name in zip(arr, names):
        p = Path(folder) / f"{Path(name).stem}.png"
        atomic_save_png(img, p)
        paths.append(p)
    return paths


def load_pngs(folder: Path) -> torch.Tensor:
    paths = sorted(Path(folder).glob("*.png"))
    if not paths:
        raise DataError(f"{folder}: no PNG images")
    return torch.stack([pil_to_tensor(Image.open(p)) for p in paths])


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (Anti-DreamBooth relied on unsorted iterdir)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [0,1] images (inf for identical images)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)
