"""Results -> leaderboard tables (pandas + tabulate), markdown and CSV.

Views:
- ``cells``: one row per (attack, purifier, defense, personalizer), metric means over
  identities (and seeds) with a 95% interval and the number of identities;
- ``attacks``: each attack's score without counter-measure and its worst case over the
  suite's purifiers/defenses/personalizers (direction-aware), naming the arg-worst;
- ``purifiers``: each (purifier, defense) by its worst case over the suite's attacks.

Arrows give the direction that favours the *protection*: ↑ higher is better for the
protector (e.g. FDFR), ↓ lower is better for the protector (e.g. ISM). A row with a
failed or missing identity is shown as incomplete, never as a partial mean; a metric
without weights is shown as unavailable, never as zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from benchbase.errors import DataError
from benchbase.store import RESULTS, RUN_JSON, atomic_write_text

ROW = ["attack", "purifier", "defense", "personalizer"]
TITLES = {"cells": "All cells", "attacks": "Attacks: no counter-measure and worst case",
          "purifiers": "Purifiers and defenses: worst case over attacks"}
ARROW = {"higher": "↑", "lower": "↓"}


def load_results(run_dir: Path) -> tuple[pd.DataFrame, dict]:
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise DataError(f"{run_dir} has no {RESULTS}: is it a benchbase run folder? (run `benchbase run` first)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise DataError(f"{path} is empty: the run has not finished any cell yet")
    info = json.loads((run_dir / RUN_JSON).read_text()) if (run_dir / RUN_JSON).is_file() else {}
    return pd.DataFrame(records), info


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n values (n - 1 degrees of freedom)."""
    if n < 2:
        return float("nan")
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:  # pragma: no cover - scipy comes with scikit-image
        return 1.96


def _summary(values: pd.Series) -> dict:
    n = len(values)
    mean = float(values.mean())
    ci = t95(n) * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": ci}


def cell_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Numeric table: per row and metric, mean/ci95 over identities, status, n identities."""
    directions = df.groupby("metric")["direction"].first().to_dict()
    metrics = list(dict.fromkeys(df["metric"]))
    n_ids = df["identity"].nunique()
    rows = []
    for key, group in df.groupby(ROW, sort=False):
        row = dict(zip(ROW, key))
        # an identity counts when every seed of it scored; a seed/identity pair missing is incomplete
        expected = df[["identity", "seed"]].drop_duplicates().shape[0]
        complete = True
        for metric in metrics:
            g = group[group["metric"] == metric]
            ok = g[g["status"] == "ok"]
            scored = g[g["status"].isin(["ok", "empty"])]  # "empty": ran, but nothing to score
            if len(g) and (g["status"] == "unavailable").all():
                row[f"{metric}|status"] = "unavailable"
                row[f"{metric}|note"] = str(g["error"].iloc[0])
                continue
            if len(scored) < expected:
                complete = False
                row[f"{metric}|status"] = f"incomplete ({len(scored)}/{expected})"
                errors = g[g["status"] == "failed"]["error"]
                row[f"{metric}|note"] = str(errors.iloc[0]) if len(errors) else "missing"
                continue
            if not len(ok):
                row[f"{metric}|status"] = "n/a"
                row[f"{metric}|note"] = str(g["error"].iloc[0])
                continue
            per_identity = ok.groupby("identity")["value"].mean()
            s = _summary(per_identity)
            row[f"{metric}|mean"], row[f"{metric}|ci95"] = s["mean"], s["ci95"]
            row[f"{metric}|status"] = "ok"
        row["identities"] = group[group["status"] == "ok"]["identity"].nunique()
        row["complete"] = complete and row["identities"] == n_ids
        rows.append(row)
    return pd.DataFrame(rows), directions


def _fmt(row: pd.Series, metric: str) -> str:
    status = row.get(f"{metric}|status")
    if status != "ok":
        return str(status)
    mean, ci = row[f"{metric}|mean"], row[f"{metric}|ci95"]
    return f"{mean:.3f}" if (ci is None or math.isnan(ci)) else f"{mean:.3f} ± {ci:.3f}"


def _metric_names(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(c.split("|")[0] for c in table.columns if "|" in c))


def cells_view(table: pd.DataFrame, directions: dict) -> pd.DataFrame:
    out = table[ROW].copy()
    for metric in _metric_names(table):
        out[f"{metric} {ARROW.get(directions.get(metric), '')}".strip()] = table.apply(_fmt, axis=1, metric=metric)
    out["n identities"] = table["identities"]
    out["row"] = table["complete"].map({True: "complete", False: "INCOMPLETE"})
    return out


def _worst(candidates: pd.DataFrame, metric: str, direction: str, against: str) -> tuple[str, str]:
    status = candidates.get(f"{metric}|status")
    if status is not None and len(candidates) and status.isin(["unavailable", "n/a"]).all():
        return status.iloc[0], ""  # nothing was measurable anywhere: say why, not "incomplete"
    ok = candidates[status == "ok"] if status is not None else candidates[:0]
    if len(ok) < len(candidates) or not len(ok):
        return "incomplete", ""
    # worst for the protector: the lowest value of a higher-is-better metric, and vice versa
    idx = ok[f"{metric}|mean"].idxmin() if direction == "higher" else ok[f"{metric}|mean"].idxmax()
    row = ok.loc[idx]
    return f"{row[f'{metric}|mean']:.3f}", " / ".join(str(row[c]) for c in against.split(","))


def attacks_view(table: pd.DataFrame, directions: dict) -> pd.DataFrame:
    rows = []
    for attack, group in table.groupby("attack", sort=False):
        row = {"attack": attack}
        base = group[(group["purifier"] == "none") & (group["defense"] == "none")]
        for metric in _metric_names(table):
            arrow = ARROW.get(directions.get(metric), "")
            if len(base) == 1:
                row[f"{metric} {arrow} (no counter-measure)"] = _fmt(base.iloc[0], metric)
            elif len(base) > 1:  # several personalizers: the worst of them, named
                value, arg = _worst(base, metric, directions.get(metric, "higher"), "personalizer")
                row[f"{metric} {arrow} (no counter-measure)"] = f"{value} ({arg})" if arg else value
            else:
                row[f"{metric} {arrow} (no counter-measure)"] = "—"
            value, arg = _worst(group, metric, directions.get(metric, "higher"), "purifier,defense,personalizer")
            row[f"{metric} {arrow} worst"] = value
            row[f"{metric} worst under"] = arg
        row["n identities"] = int(group["identities"].min())
        rows.append(row)
    return pd.DataFrame(rows)


def purifiers_view(table: pd.DataFrame, directions: dict) -> pd.DataFrame:
    rows = []
    for (purifier, defense), group in table.groupby(["purifier", "defense"], sort=False):
        row = {"purifier": purifier, "defense": defense}
        attacked = group[group["attack"] != "none"]
        for metric in _metric_names(table):
            direction = directions.get(metric, "higher")
            # the restorer's worst case is the protector's best: flip the direction
            flipped = "lower" if direction == "higher" else "higher"
            value, arg = _worst(attacked, metric, flipped, "attack,personalizer") if len(attacked) else ("—", "")
            row[f"{metric} {ARROW.get(direction, '')} worst"] = value
            row[f"{metric} worst under"] = arg
        row["n identities"] = int(group["identities"].min())
        rows.append(row)
    return pd.DataFrame(rows)


def header(info: dict, df: pd.DataFrame) -> str:
    backend = info.get("backend", {}).get("description", "unknown backend")
    lines = [
        f"# benchbase leaderboard: suite `{info.get('suite', '?')}` (hash {info.get('suite_hash', '?')})",
        "",
        f"- Model: {backend}.",
        f"- Device {info.get('device', '?')}, dtype {info.get('dtype', '?')}, seeds {info.get('seeds', '?')}, "
        f"{df['identity'].nunique()} identities, benchbase {info.get('packages', {}).get('benchbase', '?')}.",
        "- Values: mean over identities ± 95% interval (t·sd/√n, Student t with n−1 degrees of freedom). ↑ = higher favours the protection, "
        "↓ = lower favours the protection. INCOMPLETE rows are not averaged.",
    ]
    faces = face_models(df)
    if faces:
        lines.append(faces)
    if "RANDOM" in backend or "tiny" in backend:
        lines.append("- **Random-weight model: these numbers test the machinery, not the science.**")
    return "\n".join(lines) + "\n"


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
    """Paired differences a − b over identities that scored both, mean ± 95% t-interval."""
    rows = []
    for c in contrasts:
        a, b = _per_identity(df, c["metric"], c["a"]), _per_identity(df, c["metric"], c["b"])
        both = a.index.intersection(b.index)
        d = (a[both] - b[both]).astype(float)
        row = {"contrast": c["label"], "metric": c["metric"],
               "a": " / ".join(c["a"].values()), "b": " / ".join(c["b"].values()), "n identities": len(both)}
        if len(both):
            s = _summary(d)
            row.update({"mean a": round(float(a[both].mean()), 4), "mean b": round(float(b[both].mean()), 4),
                        "a − b": f"{s['mean']:+.4f} ± {s['ci95']:.4f}" if len(both) > 1 else f"{s['mean']:+.4f}",
                        "95% interval": (f"[{s['mean'] - s['ci95']:+.4f}, {s['mean'] + s['ci95']:+.4f}]"
                                         if len(both) > 1 else "n/a"),
                        "excludes 0": bool(len(both) > 1 and abs(s["mean"]) > s["ci95"])})
        if "recovery" in c and len(both):
            r = _per_identity(df, c["metric"], c["recovery"])
            common = both.intersection(r.index)
            gap = float(r[common].mean() - b[common].mean()) if len(common) else float("nan")
            # a loss to recover exists only when the reference is better for the victim than b
            # (higher ISM for a "lower favours the protection" metric, lower FDFR for "higher")
            direction = df.loc[df["metric"] == c["metric"], "direction"].iloc[0] if "direction" in df else "lower"
            lost = gap > 0 if direction == "lower" else gap < 0
            if math.isnan(gap) or not lost:
                row["recovered"] = f"n/a: no loss to recover (reference − b = {gap:+.4f})"
            else:
                row["recovered"] = (f"{float(a[common].mean() - b[common].mean()) / gap:.0%} of "
                                    f"{' / '.join(c['recovery'].values())} − b")
        rows.append(row)
    return pd.DataFrame(rows)


def build(run_dir: Path) -> dict[str, pd.DataFrame]:
    df, info = load_results(run_dir)
    table, directions = cell_table(df)
    views = {"cells": cells_view(table, directions), "attacks": attacks_view(table, directions),
             "purifiers": purifiers_view(table, directions), "_numeric": table}
    suite_data = info.get("suite_data") or {}
    if suite_data.get("contrasts"):
        from benchbase.suite import contrasts_of

        views["contrasts"] = contrasts_view(df, contrasts_of(suite_data))
    return views


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


def write(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, str]:
    """Write leaderboard.md and one CSV per view; return the markdown path and text."""
    run_dir = Path(run_dir)
    df, info = load_results(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "leaderboard"
    out_dir.mkdir(parents=True, exist_ok=True)
    views = build(run_dir)
    parts = [header(info, df)]
    if "contrasts" in views:
        parts.append("\n## Contrasts (paired over identities: a − b, mean ± 95% t-interval)\n\n"
                     + markdown(views["contrasts"]) + "\n")
        views["contrasts"].to_csv(out_dir / "contrasts.csv", index=False)
    for name, title in TITLES.items():
        view = views[name]
        parts.append(f"\n## {title}\n\n" + markdown(view) + "\n")
        view.to_csv(out_dir / f"{name}.csv", index=False)
    views["_numeric"].to_csv(out_dir / "cells_numeric.csv", index=False)
    unavailable = df[df["status"] == "unavailable"].drop_duplicates("metric")
    if len(unavailable):
        parts.append("\n## Unavailable metrics\n\n" + "\n".join(
            f"- `{_md_text(r.metric)}`: {_md_text(r.error)}" for r in unavailable.itertuples()) + "\n")
    failed = df[df["status"] == "failed"]
    if len(failed):
        parts.append(f"\n## Failures\n\n{len(failed)} records failed; first: {_md_text(failed['error'].iloc[0])}\n")
    text = "".join(parts)
    md = out_dir / "leaderboard.md"
    atomic_write_text(md, text)
    return md, text
