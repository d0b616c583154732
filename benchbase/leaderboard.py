"""Results -> leaderboard views (numeric pandas tables) -> rendered tables (markdown, CSV, HTML).

Views (numbers and statuses only; nothing here is a display string until ``render``):
- ``cells``: one row per (attack, purifier, defense, personalizer), metric means over
  identities (and seeds) with a 95% interval and the number of identities;
- ``attacks``: each attack's score without counter-measure and its worst case over the
  suite's purifiers/defenses/personalizers (direction-aware), naming the arg-worst;
- ``purifiers``: each (purifier, defense) by its worst case over the suite's attacks;
- ``contrasts``: the suite's paired contrasts (a − b over identities, 95% t-interval, the paired
  t-test's p-value, two- or one-sided as the suite states, Holm-adjusted within a family, and
  the verdict the adjusted p-value gives).
- ``curves`` and ``transfer`` (``benchbase.variants``): budget curves of swept entries and the
  transfer matrix of attacks with their own surrogate, when the suite has them.

``render`` turns a view into a ``Table``: per column the display text, the number it shows,
its status and the reason behind a status. Markdown and CSV take the text; the HTML report
takes all four (numbers sort as numbers, a status keeps its reason on hover).

Arrows give the direction that favours the *protection*: ↑ higher is better for the
protector (e.g. FDFR), ↓ lower is better for the protector (e.g. ISM). A row with a
failed or missing identity is shown as incomplete, never as a partial mean; a metric
whose records are all unavailable (a stage it needs has no model, weights or package here) is
shown as unavailable, never as zero; unavailable and failed records are counted apart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchbase import published, variants
from benchbase.errors import DataError
from benchbase.records import RunInfo, read_records_and_rows, read_run_info
from benchbase.store import atomic_write_text

ROW = ["attack", "purifier", "defense", "personalizer"]
TITLES = {"cells": "All cells", "attacks": "Attacks: no counter-measure and worst case",
          "purifiers": "Purifiers and defenses: worst case over attacks"}
CONTRASTS_TITLE = ("Contrasts (paired over identities: a − b, mean ± 95% t-interval; paired t-test, "
                   "Holm-adjusted within a family, verdict at α = 0.05)")
ALPHA = 0.05  # the level of a contrast's verdict (on the Holm-adjusted p-value)
#: the columns of ``per_identity.csv``: one row per record, everything a contrast is computed from
PER_IDENTITY = ["identity", "seed", "attack", "purifier", "defense", "personalizer", "metric", "status", "value"]
ARROW = {"higher": "↑", "lower": "↓"}
HYPOTHESIS = {"two-sided": "a ≠ b", "greater": "a > b", "less": "a < b"}  # a contrast's alternative
NAN = float("nan")


def load_results(run_dir: Path) -> tuple[pd.DataFrame, RunInfo]:
    """The run's records as a DataFrame (one row per record) and its ``RunInfo``."""
    run_dir = Path(run_dir)
    _, rows = read_records_and_rows(run_dir, records=False)
    if not rows:
        raise DataError(f"{run_dir}/results.jsonl is empty: the run has not finished any cell yet")
    return pd.DataFrame(rows), read_run_info(run_dir) or RunInfo()


@functools.lru_cache(maxsize=None)
def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n values (n - 1 degrees of freedom)."""
    if n < 2:
        return float("nan")
    try:
        # scipy.stats.t.ppf(0.975, n - 1) is this function (bit for bit); scipy.stats takes
        # seconds to import, scipy.special a fraction of one
        from scipy.special import stdtrit

        return float(stdtrit(n - 1, 0.975))
    except ImportError:  # pragma: no cover - scipy comes with scikit-image
        return 1.96


def t_pvalue(d: np.ndarray, direction: str = "two-sided") -> float:
    """The paired t-test's p-value of differences ``d`` (H0: mean 0) against ``direction``:
    "two-sided" (mean ≠ 0), "greater" (mean > 0) or "less" (mean < 0); NaN below 2 values.
    Differences all equal: p is 0 or 1 by their sign (t is ±∞), 1 when they are all 0."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n < 2:
        return NAN
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0 and mean == 0:
        return 1.0
    t = math.copysign(math.inf, mean) if sd == 0 else mean / (sd / math.sqrt(n))
    from scipy.special import stdtr  # the Student-t CDF (scipy.stats.t.cdf; a fraction of its import time)

    if direction == "greater":
        return float(stdtr(n - 1, -t))  # P(T ≥ t), by symmetry (no 1 − x cancellation)
    if direction == "less":
        return float(stdtr(n - 1, t))
    return float(min(1.0, 2.0 * stdtr(n - 1, -abs(t))))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of one family's p-values, in their order: sorted
    ascending p₍₁₎ ≤ … ≤ p₍ₘ₎, adjusted p₍ᵢ₎ = max over j ≤ i of min(1, (m − j + 1)·p₍ⱼ₎). A NaN
    (a contrast that could not be tested) stays NaN and does not count in m."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not _isnan(p))
    out, running, m = [NAN] * len(pvalues), 0.0, len(tested)
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(diff: float, p_adjusted: float, direction: str, alpha: float = ALPHA) -> str:
    """What a contrast shows at level ``alpha`` on its adjusted p-value: "a > b", "a < b", "not
    shown" (the test does not reject), "n/a" (fewer than 2 identities)."""
    if _isnan(p_adjusted):
        return "n/a"
    if p_adjusted >= alpha:
        return "not shown"
    if direction == "greater":
        return "a > b"
    if direction == "less":
        return "a < b"
    return "a > b" if diff > 0 else "a < b"


def _summary(values: pd.Series) -> dict:
    n = len(values)
    mean = float(values.mean())
    ci = t95(n) * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": ci}


def _isnan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# ---------------------------------------------------------------------------------------
# Numeric views
# ---------------------------------------------------------------------------------------


def cell_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Numeric table: per row and metric, mean/ci95 over identities, status, note, n identities.

    One pass of grouped counts over all records, then one small loop over (row, metric): a
    leaderboard of 100,000 records is built in seconds (filtering the frame once per row and
    metric took minutes)."""
    directions = df.groupby("metric")["direction"].first().to_dict()
    metrics = list(dict.fromkeys(df["metric"]))
    n_ids = df["identity"].nunique()
    # an identity counts when every seed of it scored; a seed/identity pair missing is incomplete
    expected = df[["identity", "seed"]].drop_duplicates().shape[0]
    status = df["status"].to_numpy()
    is_ok, is_unav, is_failed = status == "ok", status == "unavailable", status == "failed"
    is_scored = is_ok | (status == "empty")  # "empty": ran, but nothing to score
    row_id = df.groupby(ROW, sort=False).ngroup().to_numpy()
    row_keys = df.drop_duplicates(ROW)[ROW].itertuples(index=False, name=None)
    metric_id = pd.Index(metrics).get_indexer(df["metric"])
    cell_id = row_id * len(metrics) + metric_id  # (row, metric) in one integer
    size = len(metrics) * (int(row_id.max()) + 1 if len(df) else 0)

    def count(mask):
        return np.bincount(cell_id[mask], minlength=size)

    n_all, n_ok, n_unav, n_scored = count(np.ones(len(df), bool)), count(is_ok), count(is_unav), count(is_scored)
    errors = df["error"].to_numpy()
    pos = np.arange(len(df))
    first = dict(zip(*np.unique(cell_id, return_index=True)))  # cell -> its first record (frame order)
    failed_first = dict(zip(*np.unique(cell_id[is_failed], return_index=True)))
    failed_pos = pos[is_failed]
    unav_first = dict(zip(*np.unique(cell_id[is_unav], return_index=True)))
    unav_pos = pos[is_unav]
    # per identity means of the ok records (the same grouped mean as before, per cell), then
    # mean and 95% interval over identities, identities sorted as groupby sorts them
    ok = df.loc[is_ok, ["identity", "value"]].assign(cell=cell_id[is_ok])
    per_identity = ok.groupby(["cell", "identity"])["value"].mean()
    cells = per_identity.index.get_level_values(0).to_numpy()
    values = per_identity.to_numpy(dtype=float)
    summary: dict[int, tuple[float, float]] = {}
    for cell, start, n in zip(*np.unique(cells, return_index=True, return_counts=True)):
        summary[cell] = _summary_array(values[start:start + n])
    identities = df.loc[is_ok].groupby(row_id[is_ok])["identity"].nunique().to_dict()

    rows = []
    for r, key in enumerate(row_keys):
        row = dict(zip(ROW, key))
        complete = True
        for m, metric in enumerate(metrics):
            c = r * len(metrics) + m
            if n_all[c] and n_unav[c] == n_all[c]:
                row[f"{metric}|status"] = "unavailable"
                row[f"{metric}|note"] = str(errors[first[c]])
                continue
            if n_scored[c] < expected:
                complete = False
                row[f"{metric}|status"] = f"incomplete ({n_scored[c]}/{expected})"
                # why: a failure first (something went wrong), else an absent model, else nothing recorded
                row[f"{metric}|note"] = (str(errors[failed_pos[failed_first[c]]]) if c in failed_first else
                                         str(errors[unav_pos[unav_first[c]]]) if c in unav_first else "missing")
                continue
            if not n_ok[c]:
                row[f"{metric}|status"] = "n/a"
                row[f"{metric}|note"] = str(errors[first[c]])
                continue
            row[f"{metric}|mean"], row[f"{metric}|ci95"] = summary[c]
            row[f"{metric}|status"] = "ok"
        row["identities"] = identities.get(r, 0)
        row["complete"] = complete and row["identities"] == n_ids
        rows.append(row)
    return pd.DataFrame(rows), directions


def _summary_array(values: np.ndarray) -> tuple[float, float]:
    """``_summary`` of per-identity values (mean; t95·sd/√n with sd of ddof 1), as pandas'
    Series.mean / Series.std compute them (sum / n; two-pass variance), without a Series."""
    n = len(values)
    mean = float(values.sum(dtype=np.float64) / n)
    if n < 2:
        return mean, float("nan")
    avg = values.sum(dtype=np.float64) / n
    sd = float(np.sqrt(((avg - values) ** 2).sum(dtype=np.float64) / (n - 1)))
    return mean, t95(n) * sd / math.sqrt(n)


def _metric_names(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(c.split("|")[0] for c in table.columns if c.endswith("|status")))


def _worst(candidates: pd.DataFrame, metric: str, direction: str, against: str) -> dict:
    """The candidate row worst for the protector: ``{mean, status, under}`` (``under`` names the
    arg-worst by the columns in ``against``)."""
    status = candidates.get(f"{metric}|status")
    if status is not None and len(candidates) and status.isin(["unavailable", "n/a"]).all():
        return {"mean": NAN, "status": status.iloc[0], "under": ""}  # nothing measurable anywhere: say why
    ok = candidates[status == "ok"] if status is not None else candidates[:0]
    if len(ok) < len(candidates) or not len(ok):
        return {"mean": NAN, "status": "incomplete", "under": ""}
    # worst for the protector: the lowest value of a higher-is-better metric, and vice versa
    idx = ok[f"{metric}|mean"].idxmin() if direction == "higher" else ok[f"{metric}|mean"].idxmax()
    row = ok.loc[idx]
    return {"mean": float(row[f"{metric}|mean"]), "status": "ok",
            "under": " / ".join(str(row[c]) for c in against.split(","))}


def attacks_view(table: pd.DataFrame, directions: dict) -> pd.DataFrame:
    """Per attack and metric: ``base`` (no purifier, no defense: one personalizer's mean ± ci, or
    the worst of several, ``base|under`` naming it; status "—" when the suite has no such cell)
    and ``worst`` over every purifier/defense/personalizer."""
    rows = []
    for attack, group in table.groupby("attack", sort=False):
        row: dict[str, Any] = {"attack": attack}
        base = group[(group["purifier"] == "none") & (group["defense"] == "none")]
        for metric in _metric_names(table):
            direction = directions.get(metric, "higher")
            if len(base) == 1:
                b = base.iloc[0]
                status = b[f"{metric}|status"]
                row.update({f"{metric}|base|mean": b.get(f"{metric}|mean", NAN) if status == "ok" else NAN,
                            f"{metric}|base|ci95": b.get(f"{metric}|ci95", NAN) if status == "ok" else NAN,
                            f"{metric}|base|status": status, f"{metric}|base|under": ""})
            elif len(base) > 1:  # several personalizers: the worst of them, named
                w = _worst(base, metric, direction, "personalizer")
                row.update({f"{metric}|base|mean": w["mean"], f"{metric}|base|ci95": NAN,
                            f"{metric}|base|status": w["status"], f"{metric}|base|under": w["under"]})
            else:
                row.update({f"{metric}|base|mean": NAN, f"{metric}|base|ci95": NAN,
                            f"{metric}|base|status": "—", f"{metric}|base|under": ""})
            w = _worst(group, metric, direction, "purifier,defense,personalizer")
            row.update({f"{metric}|worst|mean": w["mean"], f"{metric}|worst|status": w["status"],
                        f"{metric}|worst|under": w["under"]})
        row["identities"] = int(group["identities"].min())
        rows.append(row)
    return pd.DataFrame(rows)


def purifiers_view(table: pd.DataFrame, directions: dict) -> pd.DataFrame:
    """Per (purifier, defense) and metric: the worst case over attacks other than ``none``."""
    rows = []
    for (purifier, defense), group in table.groupby(["purifier", "defense"], sort=False):
        row: dict[str, Any] = {"purifier": purifier, "defense": defense}
        attacked = group[group["attack"] != "none"]
        for metric in _metric_names(table):
            direction = directions.get(metric, "higher")
            # the restorer's worst case is the protector's best: flip the direction
            flipped = "lower" if direction == "higher" else "higher"
            w = (_worst(attacked, metric, flipped, "attack,personalizer") if len(attacked)
                 else {"mean": NAN, "status": "—", "under": ""})
            row.update({f"{metric}|worst|mean": w["mean"], f"{metric}|worst|status": w["status"],
                        f"{metric}|worst|under": w["under"]})
        row["identities"] = int(group["identities"].min())
        rows.append(row)
    return pd.DataFrame(rows)


def face_models(df: pd.DataFrame) -> str | None:
    """The face models each face metric ran with (detector, its threshold, embedder, the
    no-face convention), from the records' details: FDFR and ISM depend on them."""
    if "details" not in df:
        return None
    parts = []
    for metric, group in df.groupby("metric", sort=False):
        d = next((x for x in group["details"] if isinstance(x, dict) and "detector_model" in x), None)
        if d:
            text = f"`{metric}`: detector {d['detector_model']}"
            if d.get("embedder_model"):
                text += f", embedder {d['embedder_model']}"
            if d.get("no_face"):
                text += f", images without a face: {d['no_face']}"
            parts.append(text)
    return "- Face models: " + "; ".join(parts) + "." if parts else None


def _per_identity(df: pd.DataFrame, metric: str, cell: dict) -> pd.Series:
    sel = df[(df["metric"] == metric) & (df["status"] == "ok")]
    for k, v in cell.items():
        sel = sel[sel[k] == v]
    return sel.groupby("identity")["value"].mean()


def contrasts_view(df: pd.DataFrame, contrasts: list[dict]) -> pd.DataFrame:
    """Paired differences a − b over identities that scored both (an identity's value: the mean
    of its seeds): mean and 95% t half-width (two-sided, whatever the direction); ``p``: the
    paired t-test against the contrast's ``direction``; ``p_holm``: adjusted by Holm over the
    contrasts of its ``family`` (alone: p itself); ``verdict`` at α = 0.05 on ``p_holm``;
    ``recovered``: (mean a − mean b) / (mean reference − mean b) when the suite names a
    reference and there is a loss to recover (``gap``: reference − b)."""
    rows = []
    for c in contrasts:
        a, b = _per_identity(df, c["metric"], c["a"]), _per_identity(df, c["metric"], c["b"])
        both = a.index.intersection(b.index)
        d = (a[both] - b[both]).astype(float)
        row: dict[str, Any] = {"contrast": c["label"], "metric": c["metric"], "a": " / ".join(c["a"].values()),
                               "b": " / ".join(c["b"].values()), "n": len(both), "mean_a": NAN, "mean_b": NAN,
                               "diff": NAN, "ci95": NAN, "excludes_0": None,
                               "direction": c.get("direction", "two-sided"), "family": c.get("family") or "",
                               "p": NAN, "p_holm": NAN, "verdict": "n/a", "has_recovery": "recovery" in c,
                               "recovery": " / ".join(c["recovery"].values()) if "recovery" in c else "",
                               "recovered": NAN, "gap": NAN}
        if len(both):
            s = _summary(d)
            row.update(mean_a=float(a[both].mean()), mean_b=float(b[both].mean()), diff=s["mean"],
                       ci95=s["ci95"] if len(both) > 1 else NAN,
                       excludes_0=bool(len(both) > 1 and abs(s["mean"]) > s["ci95"]),
                       p=t_pvalue(d.to_numpy(), row["direction"]))
        if "recovery" in c and len(both):
            r = _per_identity(df, c["metric"], c["recovery"])
            common = both.intersection(r.index)
            gap = float(r[common].mean() - b[common].mean()) if len(common) else float("nan")
            # a loss to recover exists only when the reference is better for the victim than b
            # (higher ISM for a "lower favours the protection" metric, lower FDFR for "higher")
            direction = df.loc[df["metric"] == c["metric"], "direction"].iloc[0] if "direction" in df else "lower"
            lost = gap > 0 if direction == "lower" else gap < 0
            row["gap"] = gap
            if not math.isnan(gap) and lost:
                row["recovered"] = float(a[common].mean() - b[common].mean()) / gap
        rows.append(row)
    # Holm within each family; a contrast without one is a family of its own (p_holm = p)
    families: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        families.setdefault(row["family"] or f"\0{i}", []).append(i)
    for members in families.values():
        for i, adjusted in zip(members, holm([rows[i]["p"] for i in members])):
            rows[i]["p_holm"] = adjusted
            rows[i]["verdict"] = verdict(rows[i]["diff"], adjusted, rows[i]["direction"])
    return pd.DataFrame(rows)


def build(run_dir: Path) -> dict[str, pd.DataFrame]:
    """The numeric views of a run (``contrasts`` when the suite defines some) plus ``_directions``
    (a one-row frame: metric -> "higher"/"lower")."""
    return _views(*load_results(run_dir))


def views_of(df: pd.DataFrame, info: RunInfo) -> dict[str, pd.DataFrame]:
    """``build`` of records already read (``load_results``' frame and run info)."""
    return _views(df, info)


def _views(df: pd.DataFrame, info: RunInfo) -> dict[str, pd.DataFrame]:
    table, directions = cell_table(df)
    views = {"cells": table, "attacks": attacks_view(table, directions),
             "purifiers": purifiers_view(table, directions),
             "_directions": pd.DataFrame([directions]),
             "_reported": published.reported_view(table, info.suite_data)}  # papers' numbers for these cells
    if info.suite_data.get("contrasts"):
        from benchbase.suite import contrasts_of

        views["contrasts"] = contrasts_view(df, contrasts_of(info.suite_data))
    views.update(variants.views(df, table))  # budget curves, transfer matrix: when the suite has them
    return views


# ---------------------------------------------------------------------------------------
# Rendering: numbers -> text, only here
# ---------------------------------------------------------------------------------------


@dataclass
class Column:
    """One column of a rendered table: what each cell says, the number it shows (None for
    text), its status (None when it shows a value) and the reason behind a status."""

    header: str
    text: list = field(default_factory=list)
    values: list = field(default_factory=list)
    statuses: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, text: Any, value: float | None = None, status: str | None = None, note: str | None = None):
        self.text.append(text)
        self.values.append(None if _isnan(value) else float(value))
        self.statuses.append(status)
        self.notes.append(note or None)


@dataclass
class Table:
    name: str
    title: str
    columns: list[Column]

    def frame(self) -> pd.DataFrame:
        """The text of every cell (markdown and CSV)."""
        return pd.DataFrame({c.header: c.text for c in self.columns}) if self.columns else pd.DataFrame()

    def column(self, header: str) -> Column:
        return next(c for c in self.columns if c.header == header)


def _mean_text(mean: float, ci: float) -> str:
    return f"{mean:.3f}" if _isnan(ci) else f"{mean:.3f} ± {ci:.3f}"


def _label(metric: str, directions: dict) -> str:
    return f"{metric} {ARROW.get(directions.get(metric), '')}".strip()


def _text_column(header: str, values) -> Column:
    col = Column(header)
    for v in values:
        col.add(v)
    return col


def _count_column(header: str, values) -> Column:
    col = Column(header)
    for v in values:
        col.add(int(v), value=float(v))
    return col


def render_cells(view: pd.DataFrame, directions: dict) -> Table:
    cols = [_text_column(c, view[c]) for c in ROW]
    for metric in _metric_names(view):
        col = Column(_label(metric, directions))
        # columns, not iterrows (a grid of 10,000 cells)
        missing = [None] * len(view)
        means, cis = (view[f"{metric}|{k}"].tolist() if f"{metric}|{k}" in view else missing for k in ("mean", "ci95"))
        notes = view[f"{metric}|note"].tolist() if f"{metric}|note" in view else missing
        for status, mean, ci, note in zip(view[f"{metric}|status"].tolist(), means, cis, notes):
            note = note if isinstance(note, str) else None
            if status == "ok":
                col.add(_mean_text(mean, ci), value=mean, note=note)
            else:
                col.add(str(status), status=str(status), note=note)
        cols.append(col)
    cols.append(_count_column("n identities", view["identities"]))
    row = Column("row")
    for complete in view["complete"]:
        row.add("complete" if complete else "INCOMPLETE", status=None if complete else "INCOMPLETE")
    cols.append(row)
    return Table("cells", TITLES["cells"], cols)


def _worst_cell(col: Column, mean: float, status: str, under: str = "", suffix_under: bool = False):
    text = f"{mean:.3f}" if status == "ok" else str(status)
    if suffix_under and under:
        text = f"{text} ({under})"
    col.add(text, value=mean if status == "ok" else None, status=None if status == "ok" else str(status))


def render_attacks(view: pd.DataFrame, directions: dict) -> Table:
    cols = [_text_column("attack", view["attack"])]
    for metric in _metric_names_of(view):
        arrow = ARROW.get(directions.get(metric), "")
        base, worst, under = (Column(f"{metric} {arrow} (no counter-measure)"), Column(f"{metric} {arrow} worst"),
                              Column(f"{metric} worst under"))
        for _, r in view.iterrows():
            status, b_under = r[f"{metric}|base|status"], r[f"{metric}|base|under"]
            if status == "ok" and not b_under:
                base.add(_mean_text(r[f"{metric}|base|mean"], r[f"{metric}|base|ci95"]),
                         value=r[f"{metric}|base|mean"])
            else:
                _worst_cell(base, r[f"{metric}|base|mean"], status, b_under, suffix_under=True)
            _worst_cell(worst, r[f"{metric}|worst|mean"], r[f"{metric}|worst|status"])
            under.add(r[f"{metric}|worst|under"])
        cols += [base, worst, under]
    cols.append(_count_column("n identities", view["identities"]))
    return Table("attacks", TITLES["attacks"], cols)


def render_purifiers(view: pd.DataFrame, directions: dict) -> Table:
    cols = [_text_column("purifier", view["purifier"]), _text_column("defense", view["defense"])]
    for metric in _metric_names_of(view):
        arrow = ARROW.get(directions.get(metric), "")
        worst, under = Column(f"{metric} {arrow} worst"), Column(f"{metric} worst under")
        for _, r in view.iterrows():
            _worst_cell(worst, r[f"{metric}|worst|mean"], r[f"{metric}|worst|status"])
            under.add(r[f"{metric}|worst|under"])
        cols += [worst, under]
    cols.append(_count_column("n identities", view["identities"]))
    return Table("purifiers", TITLES["purifiers"], cols)


def _metric_names_of(view: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(c.split("|")[0] for c in view.columns if c.endswith("|worst|status")))


def render_contrasts(view: pd.DataFrame) -> Table:
    cols = [_text_column(c, view[c]) for c in ("contrast", "metric", "a", "b")]
    cols.append(_count_column("n identities", view["n"]))
    scored = view["n"] > 0
    if scored.any():
        mean_a, mean_b, diff, interval, excl = (Column("mean a"), Column("mean b"), Column("a − b"),
                                                Column("95% interval"), Column("excludes 0"))
        test, p, family, p_holm, decision = (Column("test"), Column("p"), Column("family"), Column("p (Holm)"),
                                             Column(f"verdict (α = {ALPHA:g})"))
        for _, r in view.iterrows():
            test.add(HYPOTHESIS.get(r.get("direction", "two-sided"), "a ≠ b"))
            family.add(r.get("family") or "")
            if r["n"] == 0:  # nothing paired: empty cells, as a missing value
                for col in (mean_a, mean_b, diff, interval, excl, p, p_holm, decision):
                    col.add(NAN)
                continue
            mean_a.add(round(r["mean_a"], 4), value=r["mean_a"])
            mean_b.add(round(r["mean_b"], 4), value=r["mean_b"])
            two = r["n"] > 1
            diff.add(f"{r['diff']:+.4f} ± {r['ci95']:.4f}" if two else f"{r['diff']:+.4f}", value=r["diff"])
            interval.add(f"[{r['diff'] - r['ci95']:+.4f}, {r['diff'] + r['ci95']:+.4f}]" if two else "n/a",
                         status=None if two else "n/a")
            excl.add(bool(r["excludes_0"]))
            for col, key in ((p, "p"), (p_holm, "p_holm")):
                if two:
                    col.add(f"{r[key]:.4g}", value=r[key])
                else:
                    col.add("n/a", status="n/a")
            decision.add(r.get("verdict", "n/a"), status=None if two else "n/a")
        cols += [mean_a, mean_b, diff, interval, excl, test, p, family, p_holm, decision]
    if (view["has_recovery"] & scored).any():
        rec = Column("recovered")
        for _, r in view.iterrows():
            if not (r["has_recovery"] and r["n"] > 0):
                rec.add(NAN)
            elif _isnan(r["recovered"]):
                rec.add(f"n/a: no loss to recover (reference − b = {r['gap']:+.4f})", status="n/a")
            else:
                rec.add(f"{r['recovered']:.0%} of {r['recovery']} − b", value=r["recovered"])
        cols.append(rec)
    return Table("contrasts", CONTRASTS_TITLE, cols)


def render(views: dict[str, pd.DataFrame]) -> dict[str, Table]:
    """Every view of ``build`` as a rendered ``Table`` (contrasts first when present)."""
    directions = views["_directions"].iloc[0].to_dict() if len(views["_directions"]) else {}
    out = {}
    if "contrasts" in views:
        out["contrasts"] = render_contrasts(views["contrasts"])
    out["cells"] = render_cells(views["cells"], directions)
    published.add_columns(out["cells"], views.get("_reported"))  # "<metric> reported" beside the measured mean
    out["attacks"] = render_attacks(views["attacks"], directions)
    out["purifiers"] = render_purifiers(views["purifiers"], directions)
    out.update(variants.render(views, directions))
    return out


def header(info: RunInfo | dict, df: pd.DataFrame) -> str:
    if isinstance(info, dict):
        info = RunInfo.from_json(info)
    backend = info.backend.description or "unknown backend"
    lines = [
        f"# benchbase leaderboard: suite `{info.suite}` (hash {info.suite_hash})",
        "",
        f"- Model: {backend}.",
        f"- Device {info.device}, dtype {info.dtype}, seeds {info.seeds or '?'}, "
        f"{df['identity'].nunique()} identities, benchbase {info.packages.get('benchbase', '?')}.",
        "- Values: mean over identities ± 95% interval (t·sd/√n, Student t with n−1 degrees of freedom). ↑ = higher favours the protection, "
        "↓ = lower favours the protection. INCOMPLETE rows are not averaged.",
    ]
    faces = face_models(df)
    if faces:
        lines.append(faces)
    if info.backend.random_weights:
        lines.append("- **Random-weight model: these numbers test the machinery, not the science.**")
    return "\n".join(lines) + "\n"


def _md_text(value):
    """A cell of a pipe table: a `|` or a line break in a label (identity folder, suite label,
    prompt, error) would split the row."""
    if not isinstance(value, str):
        return value
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown(view: pd.DataFrame) -> str:
    """``view`` as a markdown pipe table, cells escaped (see ``_md_text``)."""
    safe = view.map(_md_text)
    safe.columns = [_md_text(str(c)) for c in view.columns]
    return safe.to_markdown(index=False)


def _diagnostics_markdown(run_dir: Path, df: pd.DataFrame, info: RunInfo) -> str:
    """The ``Diagnostics`` section (attack objectives, victims' instance loss) from the stage
    folders the records name; empty when the run recorded none or its store is not here."""
    from benchbase import diagnostics
    from benchbase.records import resolve_store

    store = resolve_store(run_dir, None, info)
    return diagnostics.markdown(diagnostics.collect(df, diagnostics.store_info(store)))


def unavailable_reasons(df: pd.DataFrame) -> list[tuple[str, list[str], int]]:
    """``(reason, metrics, records)`` of the run's unavailable records, one per reason (a stage
    that cannot run here: a model, its weights or a package is absent), most records first."""
    unav = df[df["status"] == "unavailable"]
    out = [(str(reason), list(dict.fromkeys(group["metric"])), len(group))
           for reason, group in unav.groupby("error", sort=False, dropna=False)]
    return sorted(out, key=lambda r: -r[2])


def status_markdown(df: pd.DataFrame) -> str:
    """The ``Unavailable`` and ``Failures`` sections: counted apart, since an absent model is not
    something that went wrong (``benchbase run`` exits 0 for it, 1 for a failure)."""
    parts = []
    reasons = unavailable_reasons(df)
    if reasons:
        n = sum(r[2] for r in reasons)
        parts.append(f"\n## Unavailable\n\n{n} records unavailable: a stage they need cannot run here (a model, "
                     "its weights or a package is absent; nothing failed).\n\n" + "\n".join(
                         f"- {count} records ({', '.join(f'`{_md_text(m)}`' for m in metrics)}): {_md_text(reason)}"
                         for reason, metrics, count in reasons) + "\n")
    failed = df[df["status"] == "failed"]
    if len(failed):
        parts.append(f"\n## Failures\n\n{len(failed)} records failed; first: {_md_text(failed['error'].iloc[0])}\n")
    return "".join(parts)


def write(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, str]:
    """Write leaderboard.md, one CSV per rendered view (``contrasts.csv`` when the suite defines
    contrasts), ``cells_numeric.csv`` and ``per_identity.csv`` (one row per record: identity,
    seed, the cell's labels, metric, status, value); return the markdown path and text."""
    run_dir = Path(run_dir)
    df, info = load_results(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "leaderboard"
    out_dir.mkdir(parents=True, exist_ok=True)
    views = _views(df, info)  # the records read once
    tables = render(views)
    parts = [header(info, df)]
    for name, table in tables.items():
        frame = table.frame()
        parts.append(f"\n## {table.title}\n\n" + markdown(frame) + "\n")
        frame.to_csv(out_dir / f"{name}.csv", index=False)
    views["cells"].to_csv(out_dir / "cells_numeric.csv", index=False)
    # every record's value, so anyone can recompute a mean, an interval or a contrast (values at
    # full precision: pandas writes the shortest text that reads back to the same float)
    df.reindex(columns=PER_IDENTITY).to_csv(out_dir / "per_identity.csv", index=False)
    for name in variants.VIEWS:  # what a plot of them needs: the numbers, not the text
        if name in views:
            views[name].to_csv(out_dir / f"{name}_numeric.csv", index=False)
    parts.append(_diagnostics_markdown(run_dir, df, info))
    parts.append(status_markdown(df))
    text = "".join(parts)
    md = out_dir / "leaderboard.md"
    atomic_write_text(md, text)
    return md, text
