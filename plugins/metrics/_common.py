"""Shared helpers of the metric family: picking the image set a metric scores, per-prompt
aggregation, and where pretrained files are looked up."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from benchbase.components import MetricInputs, MetricValue
from benchbase.errors import ConfigError

SETS = ("clean", "protected", "purified", "generated", "references", "set_A")


def image_groups(inputs: MetricInputs, of: str) -> dict[str, torch.Tensor]:
    """The images a metric scores as ``{group: (N,3,H,W)}``: one group per eval prompt for
    ``generated``, a single group ``""`` for the other sets."""
    if of not in SETS:
        raise ConfigError(f"unknown image set {of!r}; one of {', '.join(SETS)}")
    value = getattr(inputs, of)
    if value is None:
        raise ConfigError(f"the core passed no {of!r} images to this metric")
    if of == "generated":
        return dict(value)
    return {"": value}


def aggregate(per_group: dict[str, list[float | None]], **details) -> MetricValue:
    """Mean over all scored images (``None`` = excluded, e.g. no face), per prompt and overall.

    The overall value pools images across prompts. When nothing was scored the value is
    NaN with ``count = 0`` (not a number standing in for one) and the reason is in details.
    """
    per_prompt: dict[str, float] = {}
    pooled: list[float] = []
    per_image: dict[str, list[float | None]] = {}
    for group, values in per_group.items():
        kept = [v for v in values if v is not None and math.isfinite(v)]
        pooled += kept
        per_image[group] = [None if v is None else float(v) for v in values]
        if group:
            per_prompt[group] = float(sum(kept) / len(kept)) if kept else float("nan")
    total = sum(len(v) for v in per_group.values())
    details = {**details, "images": total, "excluded": total - len(pooled)}
    details["per_image"] = per_image if any(per_image) else per_image.get("", [])
    if not pooled:
        details.setdefault("reason", "no image could be scored")
        return MetricValue(value=float("nan"), per_prompt=per_prompt, count=0, details=details)
    return MetricValue(value=float(sum(pooled) / len(pooled)), per_prompt=per_prompt, count=len(pooled),
                       details=details)


def torch_home() -> Path:
    return Path(torch.hub.get_dir()).parent


def pyiqa_cache() -> Path:
    return Path(torch.hub.get_dir()) / "pyiqa"


def missing_files(files: Iterable[Path]) -> list[Path]:
    return [p for p in files if not Path(p).is_file()]


def check(available: Callable[[], str | None]) -> None:
    """Raise WeightsUnavailableError with the message of ``available()`` when it has one."""
    from benchbase.errors import WeightsUnavailableError

    message = available()
    if message:
        raise WeightsUnavailableError(message)
