"""Views of a suite's variants: budget curves (swept entries) and transfer matrices (surrogates).

- ``curves``: for every swept attack (or purifier), the metrics' mean over identities ± 95%
  interval at each swept value, one line per entry and counter-measure (docs/report.md). The
  numbers are the ``cells`` view's, only regrouped: a point of a curve is a cell of the grid.
- ``transfer``: per attack, the metrics' mean with the protection optimised against one model
  (rows: ``surrogate``) and the victim fine-tuning another (columns: ``victim``). One run has one
  victim (the suite's backend); ``benchbase transfer RUN...`` puts the runs of several victims
  (sharing one store, so each protection is computed once) side by side.

Both read only the records' ``sweep``, ``surrogate``, ``victim`` and ``attack_base`` fields
(written by the runner, ``benchbase.records.Record``), never a label's text.
"""

from __future__ import annotations

import math
from numbers import Number
from pathlib import Path
from typing import Any

import pandas as pd

from benchbase.errors import DataError

CURVES_TITLE = "Budget curves: each metric against the swept parameter (mean over identities ± 95% interval)"
TRANSFER_TITLE = "Transfer: protected on one model (rows), fine-tuned on another (columns)"
SWEPT = {"attack": "attack", "purifier": "purifier"}  # a record's ``sweep`` keys -> the cell column swept


def _has(df: pd.DataFrame, column: str) -> bool:
    return column in df and df[column].map(lambda v: bool(v)).any()


def has_curves(df: pd.DataFrame) -> bool:
    return _has(df, "sweep")


def has_transfer(df: pd.DataFrame) -> bool:
    """Some protection was optimised against another model than the one its victim fine-tunes."""
    if not (_has(df, "surrogate") and _has(df, "victim")):
        return False
    return bool((df["surrogate"].astype(str) != df["victim"].astype(str)).any())


def _sort_key(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, Number) and not isinstance(value, bool) else (1, 0.0, str(value))


def curves_view(df: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """One row per (swept family, parameter, curve, the cell's other labels, value) with the metric
    columns of ``table`` (``leaderboard.cell_table``: ``<metric>|mean``, ``|ci95``, ``|status``) for
    that cell; rows ordered by curve, then by value (numbers numerically)."""
    from benchbase.leaderboard import ROW

    if not has_curves(df):
        return pd.DataFrame()
    first = df.drop_duplicates(ROW)
    info = {tuple(r[c] for c in ROW): (r["sweep"], r.get("attack_name", "")) for _, r in first.iterrows()}
    metric_cols = [c for c in table.columns if "|" in c]
    rows = []
    for _, cell in table.iterrows():
        sweep, attack_name = info.get(tuple(cell[c] for c in ROW), ({}, ""))
        for family, column in SWEPT.items():
            entry = (sweep or {}).get(family)
            if not isinstance(entry, dict):
                continue
            others = [c for c in ROW if c != column]
            rows.append({"swept": family, "param": entry.get("param"), "curve": entry.get("curve"),
                         "value": entry.get("value"), **{c: cell[c] for c in ROW},
                         "against": " / ".join(str(cell[c]) for c in others),
                         "attack_name": attack_name, **{c: cell.get(c) for c in metric_cols},
                         "identities": cell["identities"]})
    out = pd.DataFrame(rows)
    if not len(out):
        return out
    order = {k: i for i, k in enumerate(dict.fromkeys(zip(out["swept"], out["param"], out["curve"], out["against"])))}
    out["_line"] = [order[k] for k in zip(out["swept"], out["param"], out["curve"], out["against"])]
    out["_x"] = out["value"].map(_sort_key)
    return out.sort_values(["_line", "_x"], kind="stable").drop(columns=["_line", "_x"]).reset_index(drop=True)


def curve_lines(view: pd.DataFrame) -> dict[tuple[str, str], list[dict]]:
    """The curves to draw, per (swept family, parameter): a list of ``{label, name, points}``
    with points ``{metric: [(value, mean, ci95)]}`` (ok cells only)."""
    out: dict[tuple[str, str], list[dict]] = {}
    if not len(view):
        return out
    metrics = list(dict.fromkeys(c.split("|")[0] for c in view.columns if c.endswith("|status")))
    several = view.groupby(["swept", "param"])["against"].transform("nunique") > 1
    for (family, param, curve, against), group in view.groupby(["swept", "param", "curve", "against"], sort=False):
        label = f"{curve} ({against})" if several[group.index].any() else str(curve)
        points = {}
        for metric in metrics:
            ok = group[group[f"{metric}|status"] == "ok"]
            points[metric] = [(v, float(m), float(c) if isinstance(c, Number) and math.isfinite(c) else float("nan"))
                              for v, m, c in zip(ok["value"], ok[f"{metric}|mean"], ok[f"{metric}|ci95"])]
        name = str(group["attack_name"].iloc[0]) if family == "attack" else ""
        out.setdefault((family, param), []).append({"label": label, "name": name, "points": points})
    return out


def transfer_view(df: pd.DataFrame) -> pd.DataFrame:
    """Per victim (one run each), the ``cells`` view of its records with each attack split into the
    attack (``attack_base``) and the model it was optimised against (``surrogate``)."""
    from benchbase.leaderboard import cell_table

    if not (_has(df, "surrogate") and _has(df, "victim")):
        return pd.DataFrame()
    parts = []
    for victim, sub in df.groupby("victim", sort=False):
        table, _ = cell_table(sub.reset_index(drop=True))
        labels = sub.drop_duplicates("attack").set_index("attack")
        base = labels["attack_base"].where(labels["attack_base"].astype(bool), labels.index.to_series())
        table.insert(1, "surrogate", table["attack"].map(labels["surrogate"]))
        table.insert(2, "victim", victim)
        table["attack"] = table["attack"].map(base)
        parts.append(table)
    out = pd.concat(parts, ignore_index=True)
    # a matrix per attack that was optimised against another model somewhere: an attack always made
    # on the victim's own model (or on none: noise) has one cell per run, in the ``cells`` view
    moved = df.loc[df["surrogate"].astype(str) != df["victim"].astype(str)]
    bases = set(moved["attack_base"].where(moved["attack_base"].astype(bool), moved["attack"]))
    return out[out["attack"].isin(bases)].reset_index(drop=True)


VIEWS = ("curves", "transfer")


def views(df: pd.DataFrame, table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The variant views a run has: ``curves`` when some entry sweeps, ``transfer`` when some
    protection was optimised against another model than the victim's."""
    out = {}
    if has_curves(df):
        out["curves"] = curves_view(df, table)
    if has_transfer(df):
        out["transfer"] = transfer_view(df)
    return out


def render(views: dict[str, pd.DataFrame], directions: dict) -> dict:
    out = {}
    if "curves" in views and len(views["curves"]):
        out["curves"] = render_curves(views["curves"], directions)
    if "transfer" in views and len(views["transfer"]):
        out["transfer"] = render_transfer(views["transfer"], directions)
    return out


def render_curves(view: pd.DataFrame, directions: dict):
    from benchbase.leaderboard import Column, Table, _count_column, _label, _mean_text, _text_column

    cols = [_text_column(h, view[c]) for h, c in (("swept", "swept"), ("curve", "curve"), ("against", "against"),
                                                 ("parameter", "param"))]
    value = Column("value")
    for v in view["value"]:
        value.add(str(v), value=float(v) if isinstance(v, Number) and not isinstance(v, bool) else None)
    cols.append(value)
    for metric in dict.fromkeys(c.split("|")[0] for c in view.columns if c.endswith("|status")):
        col = Column(_label(metric, directions))
        for _, r in view.iterrows():
            status = r[f"{metric}|status"]
            if status == "ok":
                col.add(_mean_text(r[f"{metric}|mean"], r.get(f"{metric}|ci95")), value=r[f"{metric}|mean"])
            else:
                col.add(str(status), status=str(status), note=r.get(f"{metric}|note"))
        cols.append(col)
    cols.append(_count_column("n identities", view["identities"]))
    return Table("curves", CURVES_TITLE, cols)


def render_transfer(view: pd.DataFrame, directions: dict):
    """A matrix per attack: one row per (attack, counter-measure, surrogate), one column per
    (metric, victim); a cell where surrogate and victim are the same model is the white-box case."""
    from benchbase.leaderboard import Column, Table, _count_column, _label, _mean_text, _text_column

    keys = ["attack", "purifier", "defense", "personalizer", "surrogate"]
    victims = list(dict.fromkeys(view["victim"]))
    metrics = list(dict.fromkeys(c.split("|")[0] for c in view.columns if c.endswith("|status")))
    rows = list(dict.fromkeys(tuple(r) for r in view[keys].itertuples(index=False, name=None)))
    attack_order = {a: i for i, a in enumerate(dict.fromkeys(r[0] for r in rows))}
    rows.sort(key=lambda r: attack_order[r[0]])  # each attack's rows together: its matrix
    index = {(tuple(r[k] for k in keys), r["victim"]): r for _, r in view.iterrows()}
    cols = [_text_column(h, [r[i] for r in rows]) for i, h in enumerate(
        ("attack", "purifier", "defense", "personalizer", "protected on"))]
    for metric in metrics:
        for victim in victims:
            col = Column(f"{_label(metric, directions)} · fine-tuned on {victim}")
            for row in rows:
                r = index.get((row, victim))
                same = "white-box: protected on the victim's own model" if row[-1] == victim else None
                if r is None:
                    col.add("—", status="—", note="not in these runs")
                elif r.get(f"{metric}|status") == "ok":
                    col.add(_mean_text(r[f"{metric}|mean"], r.get(f"{metric}|ci95")), value=r[f"{metric}|mean"],
                            note=same)
                else:
                    col.add(str(r.get(f"{metric}|status")), status=str(r.get(f"{metric}|status")),
                            note=r.get(f"{metric}|note"))
            cols.append(col)
    n = {}
    for _, r in view.iterrows():
        key = tuple(r[k] for k in keys)
        n[key] = min(n.get(key, r["identities"]), r["identities"])
    cols.append(_count_column("n identities (min)", [n[r] for r in rows]))
    return Table("transfer", TRANSFER_TITLE, cols)


def transfer_frames(run_dirs: list[Path]) -> pd.DataFrame:
    """The records of several runs, one victim each, for ``benchbase transfer`` (a clear error when
    a run has no transfer fields or two runs fine-tune the same model)."""
    from benchbase.leaderboard import load_results

    frames, seen = [], {}
    for run_dir in run_dirs:
        df, _ = load_results(run_dir)
        if not _has(df, "victim"):
            raise DataError(f"{run_dir}: its records name no victim model (a run from before transfer "
                            "matrices: run the suite again with this benchbase; the store keeps every stage)")
        for victim in dict.fromkeys(df["victim"]):
            if victim in seen:
                raise DataError(f"{seen[victim]} and {run_dir} both fine-tune {victim!r}: give one run per victim")
            seen[victim] = run_dir
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def write_transfer(run_dirs: list[Path], out_dir: Path) -> tuple[Path, str]:
    """``transfer.md``, ``transfer.csv`` (as shown) and ``transfer_numeric.csv`` of several runs."""
    from benchbase.leaderboard import markdown
    from benchbase.store import atomic_write_text

    df = transfer_frames([Path(r) for r in run_dirs])
    view = transfer_view(df)
    directions = df.groupby("metric")["direction"].first().to_dict()
    table = render_transfer(view, directions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = table.frame()
    frame.to_csv(out_dir / "transfer.csv", index=False)
    view.to_csv(out_dir / "transfer_numeric.csv", index=False)
    runs = ", ".join(f"`{Path(r)}`" for r in run_dirs)
    text = (f"# benchbase transfer matrix\n\n- Runs: {runs}.\n- Rows: the model each protection was optimised "
            "against; columns: the model the victim fine-tuned. Mean over identities ± 95% interval "
            "(t·sd/√n); ↑ = higher favours the protection, ↓ = lower favours the protection.\n\n"
            f"## {table.title}\n\n" + markdown(frame) + "\n")
    md = out_dir / "transfer.md"
    atomic_write_text(md, text)
    return md, text
