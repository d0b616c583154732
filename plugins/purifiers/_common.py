"""Helpers shared by the purifiers: resolution scaling, resizing, straight-through gradients,
seeded noise and model loading with one clear error when weights are absent."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchbase.errors import WeightsUnavailableError

#: spatial parameters of the protocol (blur radius, bottleneck sizes, windows) are stated at
#: the 512-px protocol resolution and scale with the image side, so a 64-px test run
#: performs the same operation as a 512-px benchmark run
REFERENCE_RESOLUTION = 512


def scaled(value: float, side: int, reference: int = REFERENCE_RESOLUTION) -> float:
    return value * side / reference


def resize(images: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Differentiable resize. Bicubic/bilinear use antialiasing, which makes torch follow PIL's
    filters (Keys a = -0.5, support scaled when downsampling) rather than OpenCV's."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode in ("bicubic", "bilinear"):
        return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(images, size=size, mode=mode)


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass (BPDA)."""
    return value.detach() + (surrogate - surrogate.detach())


def randn(shape, ctx, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise from ``ctx.generator`` (drawn on CPU, moved to the device)."""
    return torch.randn(tuple(shape), generator=ctx.generator, dtype=torch.float32).to(ctx.device, dtype)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def as_given(name: str) -> str:
    """A model role's folder for a name that is itself a local folder or a hub id."""
    return name


def load_pretrained(what: str, model: str, loader: Callable[[str, bool], object], hint: str = ""):
    """Load ``model`` (a local folder or a hub id) with ``loader(path, local_files_only)``;
    turn any failure to find the files into one WeightsUnavailableError sentence."""
    local = Path(model).expanduser()
    if not local.exists() and model.startswith((".", "/", "~")):
        raise WeightsUnavailableError(f"{what} folder {model!r} does not exist{hint}.")
    try:
        return loader(str(local) if local.exists() else model, local.exists() or hub_offline())
    except (OSError, ValueError) as exc:
        state = "the hub is offline (HF_HUB_OFFLINE=1) and " if hub_offline() else ""
        raise WeightsUnavailableError(
            f"{what} {model!r} is not available: {state}it is not in the local cache; download it on a "
            f"machine with internet access (`huggingface-cli download {model} --local-dir <folder>`) and "
            f"pass the folder as the purifier's `model` parameter{hint} ({type(exc).__name__})."
        ) from None


def quiet_diffusers():
    """Context manager silencing diffusers' banners and progress bars while loading."""
    from contextlib import contextmanager

    from diffusers.utils import logging as dlogging

    @contextmanager
    def _quiet():
        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        try:
            yield
        finally:
            dlogging.set_verbosity(verbosity)

    return _quiet()
