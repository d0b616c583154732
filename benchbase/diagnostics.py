"""Why a protection works or fails in a world: what the run's stages recorded besides images,
as numeric tables (no image is loaded).

- ``objectives``: each protect stage's objective trajectory (``objective``,
  ``objective_trajectory``, ``objective_points`` in its ``_done.json`` info, written by
  :class:`benchbase.toolkit.ObjectiveTrace`), one row per (attack, identity, seed);
- ``instance_losses``: each personalize stage's ``final_instance_loss`` and
  ``instance_loss_trajectory`` (:class:`benchbase.toolkit.TrainingTrace`), one row per cell
  chain (attack, purifier, defense, personalizer) and identity/seed;
- ``latent_shifts``: the ``latent-shift`` metric's records: the relative VAE posterior-mean shift
  of the scored images beside uniform noise of the same measured budget (``details.noise_shift``).

The stages are found through the records' ``stages`` keys (``benchbase.records``); a stage
shared by several cells (one protect stage under every purifier) counts once. Summaries are
means over identities (of the mean over seeds) with the leaderboards' 95% t-interval. The HTML
report plots these tables; ``benchbase leaderboard`` prints the summaries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchbase.records import DONE, StageMeta

CHAIN = ["attack", "purifier", "defense", "personalizer"]
#: the metric (registered name) whose records hold the latent shift beside noise's
LATENT_SHIFT = "latent-shift"

InfoOf = Callable[[str, str], "dict | None"]


def store_info(root: Path) -> InfoOf:
    """``info_of(stage, key)``: the info of one stage folder's ``_done.json`` in the store at
    ``root`` (None when absent or unreadable); reads only the folders asked for."""
    cache: dict[tuple[str, str], dict | None] = {}

    def info_of(stage: str, key: str) -> dict | None:
        if (stage, key) not in cache:
            try:
                text = (Path(root) / stage / key[:2] / key / DONE).read_text(encoding="utf-8")
                cache[stage, key] = StageMeta.from_json(json.loads(text)).info
            except (OSError, ValueError, TypeError):
                cache[stage, key] = None
        return cache[stage, key]

    return info_of


def _stage_key(stages, stage: str) -> str | None:
    return stages.get(stage) if isinstance(stages, dict) else None


def _floats(values) -> list[float]:
    if not isinstance(values, (list, tuple)):
        return []
    return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _stage_rows(df: pd.DataFrame, stage: str, fields: list[str]) -> pd.DataFrame:
    """One row per distinct ``stage`` key the records name, with the cell ``fields`` of the first
    record naming it."""
    if not len(df) or "stages" not in df:
        return pd.DataFrame(columns=[*fields, "key"])
    keys = df["stages"].map(lambda s: _stage_key(s, stage))
    sub = df.assign(key=keys)[keys.notna()].drop_duplicates("key")
    return sub[[*fields, "key"]]


def objectives(df: pd.DataFrame, info_of: InfoOf) -> pd.DataFrame:
    """Per protect stage that recorded an objective: attack, identity, seed, ``objective`` (its
    name and direction), ``points`` (what one value is), ``trajectory`` (list), ``first``,
    ``last``."""
    rows = []
    for r in _stage_rows(df, "protect", ["attack", "identity", "seed"]).itertuples(index=False):
        info = info_of("protect", r.key) or {}
        trajectory = _floats(info.get("objective_trajectory"))
        if not trajectory:
            continue
        rows.append({"attack": r.attack, "identity": str(r.identity), "seed": r.seed,
                     "objective": str(info.get("objective") or "objective"),
                     "points": str(info.get("objective_points") or ""), "trajectory": trajectory,
                     "first": trajectory[0], "last": trajectory[-1], "key": r.key})
    return pd.DataFrame(rows, columns=["attack", "identity", "seed", "objective", "points", "trajectory",
                                       "first", "last", "key"])


def instance_losses(df: pd.DataFrame, info_of: InfoOf) -> pd.DataFrame:
    """Per personalize stage that recorded the victim's loss on its instance images: the chain
    (attack, purifier, defense, personalizer), identity, seed, ``final`` (mean of the last steps),
    ``trajectory`` (list) and ``every`` (steps per value)."""
    rows = []
    for r in _stage_rows(df, "personalize", [*CHAIN, "identity", "seed"]).itertuples(index=False):
        info = info_of("personalize", r.key) or {}
        final = _number(info.get("final_instance_loss"))
        trajectory = _floats(info.get("instance_loss_trajectory"))
        if math.isnan(final) and not trajectory:
            continue
        every = info.get("instance_loss_every")
        rows.append({**{c: getattr(r, c) for c in CHAIN}, "identity": str(r.identity), "seed": r.seed,
                     "final": final, "trajectory": trajectory,
                     "every": int(every) if isinstance(every, int) and every > 0 else 1, "key": r.key})
    return pd.DataFrame(rows, columns=[*CHAIN, "identity", "seed", "final", "trajectory", "every", "key"])


def latent_shifts(df: pd.DataFrame) -> pd.DataFrame:
    """Per ``latent-shift`` score (once per score key): the metric's label, ``of`` (protected or
    purified), the images' ``label`` (the attack, with the purifier for purified images),
    identity, seed, ``shift`` (the record's value), ``noise_shift`` and ``linf_levels``."""
    columns = ["metric", "of", "label", "attack", "identity", "seed", "shift", "noise_shift", "linf_levels"]
    if not len(df) or "metric_name" not in df:
        return pd.DataFrame(columns=columns)
    sub = df[(df["metric_name"] == LATENT_SHIFT) & (df["status"] == "ok")]
    sub = sub[~(sub["key"].notna() & sub.duplicated("key"))]  # a score shared by several cells: once
    rows = []
    for r in sub.itertuples(index=False):
        details = r.details if isinstance(r.details, dict) else {}
        of = str(details.get("of") or "protected")
        rows.append({"metric": r.metric, "of": of,
                     "label": r.attack if of == "protected" else f"{r.attack} | {r.purifier}",
                     "attack": r.attack, "identity": str(r.identity), "seed": r.seed, "shift": _number(r.value),
                     "noise_shift": _number(details.get("noise_shift")),
                     "linf_levels": _number(details.get("linf_levels"))})
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------
# Summaries: mean over identities ± 95% t-interval (the leaderboards' convention)
# ---------------------------------------------------------------------------------------


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, 95% t half-interval (t·sd/√n; NaN for one value) and n of the finite ``values``."""
    from benchbase.leaderboard import t95

    v = np.asarray([x for x in values if isinstance(x, (int, float)) and math.isfinite(x)], dtype=float)
    n = len(v)
    if not n:
        return math.nan, math.nan, 0
    ci = t95(n) * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return float(v.mean()), ci, n


def _per_identity(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """Means over seeds per (``by``, identity), so each identity counts once."""
    return frame.groupby([*by, "identity"], sort=False)[columns].mean().reset_index()


def objective_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per attack: objective, identities, first and last value, and ``change`` = last − first
    (mean ± 95% interval over identities)."""
    rows = []
    if len(frame):
        ids = _per_identity(frame.assign(change=frame["last"] - frame["first"]), ["attack"],
                            ["first", "last", "change"])
        for attack, sub in ids.groupby("attack", sort=False):
            first = frame[frame["attack"] == attack].iloc[0]
            row = {"attack": attack, "objective": first["objective"], "points": first["points"],
                   "identities": len(sub)}
            for col in ("first", "last", "change"):
                row[f"{col}_mean"], row[f"{col}_ci95"], _ = mean_ci(sub[col])
            rows.append(row)
    return pd.DataFrame(rows, columns=["attack", "objective", "points", "identities", "first_mean", "first_ci95",
                                       "last_mean", "last_ci95", "change_mean", "change_ci95"])


def instance_loss_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per chain: identities and the final instance loss (mean ± 95% interval over identities)."""
    rows = []
    if len(frame):
        for chain, sub in _per_identity(frame, CHAIN, ["final"]).groupby(CHAIN, sort=False):
            mean, ci, n = mean_ci(sub["final"])
            rows.append({**dict(zip(CHAIN, chain)), "identities": n, "final_mean": mean, "final_ci95": ci})
    return pd.DataFrame(rows, columns=[*CHAIN, "identities", "final_mean", "final_ci95"])


def latent_shift_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (metric, images): identities, the shift, noise's shift at the same budget, their paired
    difference (shift − noise), each mean ± 95% interval over identities, and the ratio of means."""
    rows = []
    if len(frame):
        ids = _per_identity(frame.assign(diff=frame["shift"] - frame["noise_shift"]), ["metric", "label"],
                            ["shift", "noise_shift", "diff", "linf_levels"])
        for (metric, label), sub in ids.groupby(["metric", "label"], sort=False):
            row = {"metric": metric, "label": label, "identities": len(sub),
                   "linf_levels": float(sub["linf_levels"].max())}
            for col in ("shift", "noise_shift", "diff"):
                row[f"{col}_mean"], row[f"{col}_ci95"], _ = mean_ci(sub[col])
            row["ratio"] = row["shift_mean"] / row["noise_shift_mean"] if row["noise_shift_mean"] > 0 else math.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=["metric", "label", "identities", "linf_levels", "shift_mean", "shift_ci95",
                                       "noise_shift_mean", "noise_shift_ci95", "diff_mean", "diff_ci95", "ratio"])


@dataclass
class Diagnostics:
    objectives: pd.DataFrame
    instance_losses: pd.DataFrame
    latent_shifts: pd.DataFrame

    @property
    def empty(self) -> bool:
        return not (len(self.objectives) or len(self.instance_losses) or len(self.latent_shifts))


def collect(df: pd.DataFrame, info_of: InfoOf) -> Diagnostics:
    """The diagnostics of a run: ``df`` is its records as rows (``Record.to_json()`` columns),
    ``info_of(stage, key)`` a stage folder's recorded info (``store_info``)."""
    return Diagnostics(objectives(df, info_of), instance_losses(df, info_of), latent_shifts(df))


# ---------------------------------------------------------------------------------------
# Markdown (benchbase leaderboard)
# ---------------------------------------------------------------------------------------


def pm_text(mean: float, ci: float) -> str:
    """``mean ± ci`` to 4 significant digits (losses differ in the second or third)."""
    if math.isnan(mean):
        return "–"
    return f"{mean:.4g}" if math.isnan(ci) else f"{mean:.4g} ± {ci:.2g}"


def markdown(diag: Diagnostics) -> str:
    """The leaderboard's ``Diagnostics`` section (empty when the run recorded none)."""
    from benchbase.leaderboard import markdown as md_table

    parts = []
    obj = objective_summary(diag.objectives)
    if len(obj):
        frame = pd.DataFrame({
            "attack": obj["attack"], "objective": obj["objective"], "n identities": obj["identities"],
            "first": [pm_text(m, c) for m, c in zip(obj["first_mean"], obj["first_ci95"])],
            "last": [pm_text(m, c) for m, c in zip(obj["last_mean"], obj["last_ci95"])],
            "last − first": [pm_text(m, c) for m, c in zip(obj["change_mean"], obj["change_ci95"])]})
        parts.append("\n### Attack objective, first → last recorded value (per outer iteration or PGD step)\n\n"
                     + md_table(frame) + "\n")
    loss = instance_loss_summary(diag.instance_losses)
    if len(loss):
        frame = loss[CHAIN].assign(**{"n identities": loss["identities"],
                                      "final instance loss": [pm_text(m, c) for m, c in
                                                              zip(loss["final_mean"], loss["final_ci95"])]})
        parts.append("\n### Victim's final training loss on the instance images\n\n" + md_table(frame) + "\n")
    if not parts:
        return ""
    return ("\n## Diagnostics\n\nMean over identities ± 95% interval (docs/report.md, Diagnostics). For an "
            "attack that alternates surrogate training with PGD (ASPL, SimAC), a maximised objective that "
            "falls from first to last outer iteration means the surrogate's training outpaces the PGD steps; "
            "a victim whose final instance loss is no higher than the clean cell's fitted the protected "
            "photos as well as clean ones.\n" + "".join(parts))
