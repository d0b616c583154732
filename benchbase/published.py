"""Published numbers beside measured ones: the ``reported`` column of the cells table.

``benchbase/data/published.csv`` (the canonical copy, shipped as package data; the repository's
``leaderboards/published/published.csv`` is the same file, with a README saying where each number
was read and how) holds one number of a paper's table per row: paper, table, source, dataset,
model version, L∞ budget in 8-bit levels, the cell (attack, purifier, defense, personalizer, in
benchbase's component names where the paper's component is the same one), the metric (benchbase's
name plus the options that make it the paper's measure, e.g. ``clip-iqa`` with
``variant=clip-iqac``), the value and the setting.

A run's cell gets a reported value when everything that makes the number comparable is the same
(``reported_view``):

- the suite's dataset (``vggface2`` / ``celebahq``, read from the suite's name and dataset root,
  since a suite has no field for it) and the backend's model version (``SD-2.1-base``...);
- the attack's component name and budget (the suite's ``eps``, else the component's default,
  within ``BUDGET_TOL`` levels), with no other option set: a variant (``precision = "fp32"``, an
  ensemble, ``adaptive``) is not what the paper ran;
- the purifier chain's and the defense's component names, with no option set (an option changes
  the purifier: the published row names the released setting benchbase's default reproduces);
- the personalizer's component name, with no option other than ``PERSONALIZER_NUMERICS`` (how
  the same recipe is computed: mixed precision, gradient checkpointing); where a paper's recipe
  differs from benchbase's default, its row says so in ``setting_notes``;
- the metric's component name with exactly the row's ``metric_options`` (``ism`` with the dlib
  embedder and ``ism`` with ArcFace live on different scales: never one column).

Anything not a benchbase component (a paper-only setting such as MetaCloak's transformation
training) keeps the paper's name and so never matches: it stays in the CSV for reading.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from benchbase.errors import DataError

COLUMNS = ("paper", "arxiv", "table", "source", "dataset", "model", "budget_levels", "attack", "purifier",
           "defense", "personalizer", "metric", "metric_options", "prompt", "value", "sd", "direction",
           "setting_notes")
#: budgets are compared in 8-bit levels; papers state them as n/255 or in [-1, 1] (0.05 = 6.375 levels)
BUDGET_TOL = 0.05
#: personalizer options that change how the recipe is computed, not the recipe (steps, lr, prior
#: preservation... are the recipe: any of those set and the cell is not the paper's)
PERSONALIZER_NUMERICS = frozenset({"mixed_precision", "gradient_checkpointing"})
# words in a suite's name / dataset root -> the dataset papers name
_DATASETS = (("vggface2", "vggface2"), ("celeba", "celebahq"))
# diffusers repository names -> the model versions papers name (order: most specific first)
_MODELS = (
    (r"stable-diffusion-2-1-base", "SD-2.1-base"),
    (r"stable-diffusion-2-1(?!-base)", "SD-2.1"),
    (r"stable-diffusion-2-base", "SD-2.0-base"),
    (r"stable-diffusion-2(?![-\d])", "SD-2.0"),
    (r"stable-diffusion-v1-5", "SD-1.5"),
    (r"stable-diffusion-v1-4", "SD-1.4"),
)


def default_path() -> Path:
    return Path(str(resources.files("benchbase") / "data" / "published.csv"))


def _float(text: str) -> float:
    return float(text) if text.strip() else math.nan


@lru_cache(maxsize=4)
def load(path: str | None = None) -> pd.DataFrame:
    """The published rows (``value`` and ``budget_levels`` as floats, NaN where a row states no
    budget). A missing column or a value that is not a number is a one-line DataError naming
    the file and row."""
    path = Path(path) if path else default_path()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                row["value"] = float(row["value"])
                row["budget_levels"] = _float(row["budget_levels"])
            except ValueError:
                raise DataError(f"{path}:{i}: value {row['value']!r} or budget {row['budget_levels']!r} "
                                "is not a number") from None
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def dataset_of(suite_data: dict) -> str | None:
    """``vggface2`` / ``celebahq`` when the suite's name or dataset root names one (else None)."""
    ds = suite_data.get("dataset") or {}
    text = " ".join(str(x) for x in (suite_data.get("name", ""), ds.get("name", ""), ds.get("root", ""))).lower()
    text = text.replace("-", "").replace("_", "")
    found = {tag for key, tag in _DATASETS if key in text}
    return found.pop() if len(found) == 1 else None


def model_of(suite_data: dict) -> str | None:
    """The model version a paper would name (``SD-2.1-base``...) for a Stable Diffusion backend."""
    backend = suite_data.get("backend") or {}
    if backend.get("name") != "sd":
        return None
    model = str(backend.get("model", "")).lower()
    return next((tag for pattern, tag in _MODELS if re.search(pattern, model)), None)


def _options(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in (s.strip() for s in str(text).split(";")) if item)


def _default_eps(name: str) -> float | None:
    """The registered attack's default budget (levels); None when it cannot be resolved."""
    from benchbase.plugins import get_plugin_manager

    try:
        return float(get_plugin_manager().get("attacks", name).load().Params().eps)
    except Exception:  # an unknown or unimportable attack: no budget, so no match (never a guess)
        return None


def _cell_keys(suite) -> dict[str, dict[str, Any]]:
    """Per family, label -> what a published row must name: attack (name, budget), purifier
    chain name, defense name, personalizer name; None for an entry with options (a variant)."""
    keys: dict[str, dict[str, Any]] = {"attack": {}, "purifier": {}, "defense": {}, "personalizer": {}}
    for s in suite.attacks:
        extra = set(s.params) - {"eps"}
        eps = 0.0 if s.name == "none" else s.params["eps"] if "eps" in s.params else _default_eps(s.name)
        # a protection made on another model than the victim's (transfer) is not the papers' white-box cell
        variant = extra or s.adaptive or eps is None or s.surrogate is not None
        keys["attack"][s.label] = None if variant else (s.name, float(eps))
    for chain in suite.purifiers:
        plain = all(not s.params and not s.adaptive for s in chain)
        keys["purifier"][suite.purifier_label(chain)] = "+".join(s.name for s in chain) if plain else None
    for s in suite.defenses:
        keys["defense"][s.label] = None if s.params else s.name
    for s in suite.personalizers:
        keys["personalizer"][s.label] = None if set(s.params) - PERSONALIZER_NUMERICS else s.name
    return keys


def _short(row: dict) -> str:
    table = re.sub(r"^Table\s*", "T", str(row["table"]))
    return f"{str(row['paper']).split(' (')[0]} {table}".strip()


def reported_view(table: pd.DataFrame, suite_data: dict, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Row-aligned with the cells ``table``: per metric with at least one match,
    ``<metric>|reported`` (the published value) and ``<metric>|reported_by`` (paper and table,
    several joined by "; " when papers agree on the cell). Empty when nothing matches — or when
    the suite cannot be read, the dataset or model is not one papers report (a toy world)."""
    out = pd.DataFrame(index=table.index)
    dataset, model = dataset_of(suite_data), model_of(suite_data)
    if dataset is None or model is None or table.empty:
        return out
    from benchbase.suite import parse_suite

    try:
        suite = parse_suite(suite_data, "<run.json suite>")
    except Exception:  # a run of an older suite format: no reported column rather than no leaderboard
        return out
    keys = _cell_keys(suite)
    try:
        rows = (published if published is not None else load()).to_dict("records")
    except (OSError, DataError) as exc:  # a broken table must not cost the leaderboard itself
        warnings.warn(f"published numbers not shown: {exc}", stacklevel=2)
        return out
    rows = [r for r in rows if r["dataset"] == dataset and r["model"] == model and not math.isnan(r["budget_levels"])]
    metrics = {s.label: (s.name, {k: str(v) for k, v in s.params.items()}) for s in suite.metrics}
    for label, (name, params) in metrics.items():
        if f"{label}|status" not in table:
            continue
        mine = [r for r in rows if r["metric"] == name and _options(r["metric_options"]) == params]
        if not mine:
            continue
        values, by = [], []
        for cell in table[["attack", "purifier", "defense", "personalizer"]].itertuples(index=False):
            att = keys["attack"].get(cell.attack)
            hits = [r for r in mine if att is not None and r["attack"] == att[0]
                    and abs(r["budget_levels"] - att[1]) <= BUDGET_TOL
                    and r["purifier"] == keys["purifier"].get(cell.purifier)
                    and r["defense"] == keys["defense"].get(cell.defense)
                    and r["personalizer"] == keys["personalizer"].get(cell.personalizer)]
            values.append(hits[0]["value"] if hits else math.nan)
            by.append("; ".join(dict.fromkeys(_short(r) for r in hits)))
        if any(by):
            out[f"{label}|reported"], out[f"{label}|reported_by"] = values, by
    return out


def add_columns(cells, reported: pd.DataFrame | None) -> None:
    """Insert ``<metric> reported`` right after each measured metric column of the rendered
    cells ``Table`` that has published values (text: "0.417 (MetaCloak T4)"; "—" elsewhere)."""
    if reported is None or reported.empty:
        return
    from benchbase.leaderboard import Column

    for col in list(reported.columns):
        if not col.endswith("|reported"):
            continue
        label = col[: -len("|reported")]
        new = Column(f"{label} reported")
        for value, by in zip(reported[col].tolist(), reported[f"{label}|reported_by"].tolist()):
            if by:
                new.add(f"{value:.3f} ({by})", value=value, note=f"published: {by}")
            else:
                new.add("—")
        at = next((i for i, c in enumerate(cells.columns) if c.header.split(" ")[0] == label), None)
        cells.columns.insert(len(cells.columns) if at is None else at + 1, new)
