"""A run folder as the report reads it: records, run info and stage folders, through the
run-record schema (``benchbase.records``) only.

Each cell's stage folders come from its records' ``stages`` (and ``key`` for scores); the
clean images from the ``clean`` stage. Nothing is inferred from key parts, no plugin is
instantiated. ``RunData.diagnostics()``: the tables of ``benchbase.diagnostics`` (objective
trajectories, instance losses, latent shifts) from the records and the ``_done.json`` infos.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from benchbase import diagnostics
from benchbase.records import Record, RunInfo, Stage, StageMeta, read_records_and_rows, read_run_info, resolve_store
from benchbase.store import read_stage_metas


@dataclass
class CellView:
    """One cell of the grid with the keys of its stage folders (None where a record names none)."""

    identity: str
    seed: int
    attack: str
    purifier: str
    defense: str
    personalizer: str
    keys: dict[str, str | None] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.attack} / {self.purifier} / {self.defense} / {self.personalizer}"


class RunData:
    """A run folder read for the report."""

    def __init__(self, run_dir: Path, store: Path | None = None):
        self.run_dir = Path(run_dir)
        self.records, rows = read_records_and_rows(self.run_dir)
        self.info: RunInfo = read_run_info(self.run_dir) or RunInfo()
        self.has_run_json = read_run_info(self.run_dir) is not None
        self.df = pd.DataFrame(rows)
        self.store_root = resolve_store(self.run_dir, store, self.info)
        self.metas: dict[str, dict[str, StageMeta]] = read_stage_metas(self.store_root)
        self.cells = self._cells()

    def _cells(self) -> list[CellView]:
        cells: dict[tuple, CellView] = {}
        for rec in self.records:
            cell = cells.setdefault(rec.cell, CellView(*rec.cell, keys={s.value: None for s in Stage
                                                                         if s is not Stage.SCORE}))
            cell.records.append(rec)
            for stage, key in rec.stages.items():
                if stage in cell.keys and key:
                    cell.keys[stage] = key
        return list(cells.values())

    def diagnostics(self) -> diagnostics.Diagnostics:
        """Attack objectives, victims' instance losses and latent shifts (``benchbase.diagnostics``)
        from the records and the stage folders' recorded info (no image loaded)."""
        if not hasattr(self, "_diagnostics"):
            def info_of(stage: str, key: str) -> dict | None:
                meta = self.meta(stage, key)
                return meta.info if meta is not None else None

            self._diagnostics = diagnostics.collect(self.df, info_of)
        return self._diagnostics

    def meta(self, stage: str, key: str | None) -> StageMeta | None:
        return self.metas.get(str(stage), {}).get(key) if key else None

    def path(self, stage: str, key: str | None) -> Path | None:
        if self.meta(stage, key) is None:
            return None
        return self.store_root / str(stage) / key[:2] / key

    def clean(self, cell: CellView) -> tuple[list[np.ndarray], list[str]] | str:
        """The clean set_B of a cell's identity (uint8 HWC arrays, file stems) from its ``clean``
        stage, or why it is not there."""
        folder = self.path(Stage.CLEAN, cell.keys.get("clean"))
        if folder is None:
            return ("clean images are not in the store (a run from before benchbase stored them: run the "
                    "same suite again to add them; nothing else is recomputed)")
        files = sorted((folder / "images").glob("*.png"))
        return [read_image(p) for p in files], [p.stem for p in files]


def read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def per_image_scores(records: list[Record]) -> dict[str, dict]:
    """``{"protected"|"purified"|"clean": {metric: [values]}, "generated": {prompt: {metric: [values]}}}``
    from the ``per_image`` details metrics record (ordered as the stage folder's sorted files)."""
    out: dict[str, dict] = {"generated": defaultdict(dict)}
    for rec in records:
        per_image = rec.details.get("per_image")
        if rec.status != "ok" or per_image is None:
            continue
        if isinstance(per_image, dict):
            for prompt, values in per_image.items():
                out["generated"][prompt][rec.metric] = values
        elif isinstance(per_image, list):
            of = rec.details.get("of") or "protected"
            out.setdefault(of, {})[rec.metric] = per_image
    return out


def score_text(scores: dict[str, list], index: int, extra: dict[str, Any] | None = None) -> str:
    parts = [f"{k} {fmt(v)}" for k, v in (extra or {}).items()]
    for metric, values in scores.items():
        if isinstance(values, list) and index < len(values):
            parts.append(f"{metric} {fmt(values[index])}")
    return " · ".join(parts)
