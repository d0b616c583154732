"""``benchbase report RUN_DIR``: a static HTML report of a run (tables, image grids, plots).

The report is one folder (``RUN_DIR/report`` by default) that opens from disk with no
server and no network: ``index.html`` with inline CSS and a few lines of inline
JavaScript (sortable tables), ``thumbs/`` with small JPEG thumbnails and PNG heat maps,
``plots/`` with matplotlib SVGs. Full-size images are *linked* (relative paths into the
run's store), never copied, so a report of a full suite stays a few MB per identity.

Where everything comes from:

- tables: :func:`benchbase.leaderboard.build` — the very numbers ``benchbase leaderboard``
  prints (means over identities ± 95% interval, worst cases, counts, unavailable metrics);
- stage folders of each cell: the records' stage keys when the runner wrote them
  (``record["stages"]``), else a walk of the ``_done.json`` key parts from the record's
  score key upwards (score -> generate -> personalize -> purify -> protect), else a match on
  the parts themselves (attack/purifier names and parameters, identity fingerprint, seed);
- clean images: the run folder keeps no clean copy, so they are rebuilt from the suite in
  ``run.json`` through its dataset plugin, at the resolution the protect stage recorded;
- per-image scores: the ``per_image`` lists metrics put in their details, plus the PSNR and
  L∞ (levels) of each protected / purified image against its clean image, computed here;
- cost: each stage folder's ``seconds`` (and ``peak_memory_mb`` where recorded).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

from benchbase import leaderboard
from benchbase.errors import DataError
from benchbase.store import DONE, RESULTS, RUN_JSON

STAGES = ("protect", "purify", "personalize", "generate", "score")
THUMB_SIZE = 128  # px, longest side: a 4x4 grid of a cell reads well and weighs ~5 KB per image
MAX_SAMPLES = 8  # generated images shown per prompt (all are linked from the folder link)
MEMORY_KEYS = ("peak_memory_mb", "peak_mem_mb", "max_memory_mb", "peak_rss_mb", "cuda_peak_mb")


# ---------------------------------------------------------------------------------------
# The run: records, run.json, stage folders
# ---------------------------------------------------------------------------------------


class StageIndex:
    """Every completed stage folder of a store: ``{stage: {key: meta}}`` (meta = _done.json
    plus ``_path``), read once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta: dict[str, dict[str, dict]] = defaultdict(dict)
        if not self.root.is_dir():
            return
        for done in self.root.glob(f"*/*/*/{DONE}"):
            if done.parent.name.startswith("."):  # a temporary of a killed process
                continue
            try:
                meta = json.loads(done.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            meta["_path"] = done.parent
            self.meta[done.parts[-4]][done.parent.name] = meta

    def get(self, stage: str, key: str | None) -> dict | None:
        return self.meta.get(stage, {}).get(key) if key else None

    def path(self, stage: str, key: str | None) -> Path | None:
        meta = self.get(stage, key)
        return meta["_path"] if meta else None


@dataclass
class CellView:
    """One cell of the grid with the keys of its stage folders (None where not found)."""

    identity: str
    seed: int
    attack: str
    purifier: str
    defense: str
    personalizer: str
    keys: dict[str, str | None] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.attack} / {self.purifier} / {self.defense} / {self.personalizer}"


def _subset(wanted: dict, got: dict) -> bool:
    """The suite gives only overrides; the key parts hold the full config."""
    return all(k in got and got[k] == v for k, v in wanted.items())


def _spec_matches(spec, cid: dict | None) -> bool:
    return bool(cid) and cid.get("name") == spec.name and _subset(spec.params, cid.get("params", {}))


class RunData:
    """A run folder read for the report."""

    def __init__(self, run_dir: Path, store: Path | None = None, manager=None):
        self.run_dir = Path(run_dir)
        self.df, self.info = leaderboard.load_results(self.run_dir)
        self.records: list[dict] = self.df.to_dict("records")
        self.store = StageIndex(Path(store) if store else self.run_dir / "store")
        self.manager = manager
        self.suite = None
        if self.info.get("suite_data"):
            from benchbase.suite import parse_suite

            try:
                self.suite = parse_suite(self.info["suite_data"], self.info.get("suite_source", "<run.json>"))
            except Exception:  # an old or hand-edited run.json: tables and plots still work
                self.suite = None
        self.cells = self._cells()
        self._dataset = None
        self._clean: dict[str, Any] = {}

    # -- cells and their stage keys -----------------------------------------------------
    def _cells(self) -> list[CellView]:
        cells: dict[tuple, CellView] = {}
        for rec in self.records:
            ident = (rec["identity"], int(rec["seed"]), rec["attack"], rec["purifier"], rec["defense"],
                     rec["personalizer"])
            cell = cells.setdefault(ident, CellView(*ident))
            cell.records.append(rec)
        for cell in cells.values():
            cell.keys = self._keys(cell)
        return list(cells.values())

    def _walk(self, keys: dict[str, str | None]) -> None:
        """Fill upstream keys from the key parts of the stages already known."""
        links = (("generate", "personalize"), ("personalize", "purify"), ("purify", "protect"))
        for _ in range(2):
            for down, up in links:
                meta = self.store.get(down, keys.get(down))
                if meta and not keys.get(up) and meta["parts"].get(up):
                    keys[up] = meta["parts"][up]

    def _keys(self, cell: CellView) -> dict[str, str | None]:
        keys: dict[str, str | None] = {s: None for s in STAGES[:4]}
        for rec in cell.records:
            stages = rec.get("stages")
            if isinstance(stages, dict):  # written by a runner that records them
                keys.update({k: v for k, v in stages.items() if k in keys and v})
            meta = self.store.get("score", rec.get("key") if isinstance(rec.get("key"), str) else None)
            if meta:
                for name, key in meta["parts"].get("inputs", {}).items():
                    stage = {"protected": "protect", "purified": "purify", "generated": "generate"}.get(name)
                    if stage and not keys.get(stage):
                        keys[stage] = key
        self._walk(keys)
        if self.suite is not None:
            self._match(cell, keys)
            self._walk(keys)
        return keys

    def _match(self, cell: CellView, keys: dict) -> None:
        """Find stage folders no score pointed to, by their key parts (the metrics of the
        run did not read them, e.g. a suite with only protected-image metrics)."""
        suite = self.suite
        attack = next((s for s in suite.attacks if s.label == cell.attack), None)
        chain = next((c for c in suite.purifiers if suite.purifier_label(c) == cell.purifier), None)
        backend = self.info.get("backend", {}).get("fingerprint")

        def latest(candidates: list[dict]) -> str | None:
            return max(candidates, key=lambda m: m.get("finished", 0))["key"] if candidates else None

        if not keys.get("protect") and attack is not None:
            fingerprint = self.fingerprint(cell.identity)
            keys["protect"] = latest([
                m for m in self.store.meta.get("protect", {}).values()
                if _spec_matches(attack, m["parts"].get("attack")) and m["parts"].get("seed") == cell.seed
                and (fingerprint is None or m["parts"].get("identity") == fingerprint)
                and (backend is None or m["parts"].get("backend") == backend)
                and bool(m["parts"].get("threat")) == bool(attack.adaptive)])
        if not keys.get("purify") and keys.get("protect") and chain is not None:
            keys["purify"] = latest([
                m for m in self.store.meta.get("purify", {}).values()
                if m["parts"].get("protect") == keys["protect"] and m["parts"].get("seed") == cell.seed
                and len(m["parts"].get("purifiers", [])) == len(chain)
                and all(_spec_matches(s, c) for s, c in zip(chain, m["parts"]["purifiers"]))])
        if not keys.get("generate") and keys.get("purify"):
            personalizer = next((s for s in suite.personalizers if s.label == cell.personalizer), None)
            defense = next((s for s in suite.defenses if s.label == cell.defense), None)
            found = []
            for m in self.store.meta.get("personalize", {}).values():
                p = m["parts"]
                if (p.get("purify") == keys["purify"] and p.get("seed") == cell.seed and defense is not None
                        and personalizer is not None and _spec_matches(defense, p.get("defense"))
                        and p.get("personalizer", {}).get("name") == personalizer.name):
                    found.append(m)
            keys["personalize"] = keys.get("personalize") or latest(found)
            keys["generate"] = latest([m for m in self.store.meta.get("generate", {}).values()
                                       if m["parts"].get("personalize") == keys.get("personalize")])

    # -- clean images -------------------------------------------------------------------
    def dataset(self):
        if self._dataset is None and self.suite is not None:
            from benchbase.plugins import get_plugin_manager

            pm = self.manager or get_plugin_manager()
            self._dataset = pm.create("datasets", self.suite.dataset.name, self.suite.dataset.params)
        return self._dataset

    def fingerprint(self, identity: str) -> str | None:
        try:
            return self.dataset().fingerprint(identity) if self.dataset() else None
        except Exception:
            return None

    def resolution(self) -> int | None:
        for meta in self.store.meta.get("protect", {}).values():
            if meta["parts"].get("resolution"):
                return int(meta["parts"]["resolution"])
        return None

    def clean(self, identity: str) -> tuple[list[np.ndarray], list[str]] | str:
        """Clean set_B of an identity as uint8 HWC arrays and their file stems, or the reason
        it cannot be rebuilt."""
        if identity not in self._clean:
            try:
                dataset, resolution = self.dataset(), self.resolution()
                if dataset is None or resolution is None:
                    raise DataError("run.json has no suite or the store no protect stage")
                data = dataset.load(identity, resolution)
                from benchbase.images import to_uint8  # the runner's rounding, so L∞ matches its PNGs
                from benchbase.pipeline import image_names  # the names the runner saves set_B under

                self._clean[identity] = (list(to_uint8(data.set_B)), image_names(data))
            except Exception as exc:  # the report still shows everything else
                self._clean[identity] = f"clean images unavailable: {type(exc).__name__}: {exc}"
        return self._clean[identity]


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images; identical images count as 100 dB (as the psnr metric)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) / 255.0**2
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(1.0 / mse))


def linf_levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ---------------------------------------------------------------------------------------
# Thumbnails and heat maps
# ---------------------------------------------------------------------------------------


class Thumbs:
    """Writes small JPEG thumbnails and PNG heat maps into ``out/thumbs``, once per source."""

    def __init__(self, out_dir: Path, size: int = THUMB_SIZE):
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / "thumbs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.written: set[str] = set()

    def _name(self, tag: str, suffix: str) -> str:
        return hashlib.sha1(tag.encode()).hexdigest()[:20] + suffix

    def _resize(self, img: Image.Image, resample) -> Image.Image:
        w, h = img.size
        scale = self.size / max(w, h)
        if scale >= 1 and resample != Image.NEAREST:
            return img
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)

    def image(self, array: np.ndarray, tag: str) -> str:
        """A JPEG thumbnail (quality 90: the heat map, not the thumbnail, shows the
        perturbation); returns its path relative to the report folder."""
        name = self._name(tag, ".jpg")
        if name not in self.written:
            img = self._resize(Image.fromarray(array), Image.LANCZOS)
            img.save(self.folder / name, "JPEG", quality=90)
            self.written.add(name)
        return f"thumbs/{name}"

    def heat(self, a: np.ndarray, b: np.ndarray, scale: float, tag: str) -> str:
        """|a − b| (max over channels, in 8-bit levels) / scale through the magma colour map,
        enlarged with nearest neighbours so single-pixel structure stays visible."""
        from matplotlib import colormaps

        name = self._name(f"heat|{scale}|{tag}", ".png")
        if name not in self.written:
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1).astype(np.float64)
            rgba = colormaps["magma"](np.clip(diff / max(scale, 1e-9), 0, 1))
            img = Image.fromarray((rgba[..., :3] * 255 + 0.5).astype(np.uint8))
            if max(img.size) != self.size:
                img = self._resize(img, Image.NEAREST)
            img.save(self.folder / name, "PNG", optimize=True)
            self.written.add(name)
        return f"thumbs/{name}"

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


# ---------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def href(target: Path, out_dir: Path) -> str:
    """A relative URL from the report folder to ``target`` (works from disk and served)."""
    rel = os.path.relpath(Path(target).resolve(), Path(out_dir).resolve())
    return quote(Path(rel).as_posix())


def _number(text: str) -> float | None:
    try:
        return float(str(text).split(" ")[0])
    except ValueError:
        return None


def table_html(df: pd.DataFrame, table_id: str, notes: dict[tuple[int, str], str] | None = None,
               caption: str = "") -> str:
    """A sortable table: numbers carry ``data-v`` so the inline script sorts them as numbers;
    a status (unavailable, incomplete, n/a) is a text cell with its reason on hover."""
    notes = notes or {}
    head = "".join(f'<th scope="col" title="click to sort">{esc(c)}</th>' for c in df.columns)
    rows = []
    for i, (_, row) in enumerate(df.iterrows()):
        cells = []
        for col in df.columns:
            text = "" if row[col] is None or (isinstance(row[col], float) and math.isnan(row[col])) else str(row[col])
            value = _number(text)
            note = notes.get((i, col))
            attrs = ""
            if value is not None:
                attrs += f' data-v="{value!r}" class="num"'
            elif text.startswith(("unavailable", "incomplete", "n/a", "INCOMPLETE")):
                attrs += f' class="status {esc(text.split()[0].lower().strip("()"))}"'
            if note:
                attrs += f' title="{esc(note)}"'
            cells.append(f"<td{attrs}>{esc(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<table class="sortable" id="{esc(table_id)}">{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _cell_notes(view: pd.DataFrame, numeric: pd.DataFrame) -> dict[tuple[int, str], str]:
    """Reasons of non-ok cells of the cells view (its rows follow the numeric table's)."""
    notes = {}
    for col in view.columns:
        metric = col.rsplit(" ", 1)[0] if col.endswith(("↑", "↓")) else col
        note_col = f"{metric}|note"
        if note_col not in numeric.columns:
            continue
        for i, note in enumerate(numeric[note_col].tolist()):
            if isinstance(note, str) and note:
                notes[(i, col)] = note
    return notes


SCRIPT = """
// Sortable tables: click a header; numbers (data-v) sort as numbers, statuses last.
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var xv = x.hasAttribute('data-v') ? parseFloat(x.getAttribute('data-v')) : null;
        var yv = y.hasAttribute('data-v') ? parseFloat(y.getAttribute('data-v')) : null;
        if (xv !== null && yv !== null) return asc ? xv - yv : yv - xv;
        if (xv !== null) return -1;
        if (yv !== null) return 1;
        var r = x.textContent.localeCompare(y.textContent);
        return asc ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.status { color: #888; font-style: italic; } td.unavailable { background: #f6f6f6; }
td.incomplete, td.INCOMPLETE { background: #fff2e0; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
.warn { background: #fff6d6; padding: 0.5em 1em; border-left: 4px solid #e0b000; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; }
figure.img { margin: 0; width: var(--thumb); font-size: 11px; color: #444; }
figure.img img { width: var(--thumb); height: auto; image-rendering: auto; display: block; }
figure.heat img { image-rendering: pixelated; }
.row { display: flex; gap: 1em; align-items: flex-start; margin: 4px 0; }
.rowlabel { width: 11em; flex: none; font-weight: 600; font-size: 12px; }
.plots img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f7f7f7; padding: 0.6em; overflow: auto; max-height: 30em; }
"""


def figure(thumb: str, link: str | None, caption: str, title: str, kind: str = "") -> str:
    img = f'<img src="{esc(thumb)}" alt="{esc(caption)}" title="{esc(title)}" loading="lazy">'
    if link:
        img = f'<a href="{esc(link)}">{img}</a>'
    return f'<figure class="img {kind}">{img}<figcaption>{esc(caption)}</figcaption></figure>'


def row(label: str, items: Iterable[str], note: str = "") -> str:
    body = "".join(items) or f'<span class="status">{esc(note or "none")}</span>'
    return f'<div class="row"><div class="rowlabel">{esc(label)}</div><div class="grid">{body}</div></div>'


# ---------------------------------------------------------------------------------------
# Per-image scores
# ---------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def per_image_scores(records: list[dict]) -> dict[str, dict]:
    """``{"protected"|"purified"|"clean": {metric: [values]}, "generated": {prompt: {metric: [values]}}}``
    from the ``per_image`` details metrics record (ordered as the stage folder's sorted files)."""
    out: dict[str, dict] = {"generated": defaultdict(dict)}
    for rec in records:
        details = rec.get("details") if isinstance(rec.get("details"), dict) else {}
        per_image = details.get("per_image")
        if rec.get("status") != "ok" or per_image is None:
            continue
        if isinstance(per_image, dict):
            for prompt, values in per_image.items():
                out["generated"][prompt][rec["metric"]] = values
        elif isinstance(per_image, list):
            of = details.get("of") or "protected"
            out.setdefault(of, {})[rec["metric"]] = per_image
    return out


def _score_text(scores: dict[str, list], index: int, extra: dict[str, Any] | None = None) -> str:
    parts = [f"{k} {_fmt(v)}" for k, v in (extra or {}).items()]
    for metric, values in scores.items():
        if isinstance(values, list) and index < len(values):
            parts.append(f"{metric} {_fmt(values[index])}")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, Agg, SVG)
# ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "benchbase", "figure.dpi": 100,
                         "font.size": 9})
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _boxes(ax, groups: dict[str, list[float]], rng: np.random.Generator) -> None:
    labels = list(groups)
    data = [[v for v in groups[k] if v is not None and math.isfinite(v)] for k in labels]
    positions = list(range(1, len(labels) + 1))
    filled = [(p, d) for p, d in zip(positions, data) if d]
    if filled:
        ax.boxplot([d for _, d in filled], positions=[p for p, _ in filled], widths=0.5, showfliers=False)
        for p, d in filled:  # every value as a dot: with few identities a box alone misleads
            ax.scatter(p + rng.uniform(-0.12, 0.12, len(d)), d, s=12, alpha=0.7, color="tab:blue", zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)


def plot_distributions(df: pd.DataFrame, out_dir: Path) -> list[tuple[str, Path]]:
    """One SVG per metric: the value of each (identity, seed) record — what leaderboards
    average — grouped by attack and purifier (and defense/personalizer when the suite has
    several)."""
    plt = _pyplot()
    ok = df[df["status"] == "ok"]
    extra = [c for c in ("defense", "personalizer") if df[c].nunique() > 1]
    out = []
    directions = df.groupby("metric")["direction"].first().to_dict()
    for i, metric in enumerate(dict.fromkeys(df["metric"])):
        sub = ok[ok["metric"] == metric]
        if not len(sub):
            continue
        groups: dict[str, list[float]] = {}
        for _, r in sub.iterrows():
            label = " | ".join(str(r[c]) for c in ("attack", "purifier", *extra))
            groups.setdefault(label, []).append(float(r["value"]))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(groups) + 1.5), 3.2))
        _boxes(ax, groups, np.random.default_rng(i))
        arrow = leaderboard.ARROW.get(directions.get(metric), "")
        ax.set_title(f"{metric} {arrow} per attack | purifier" + (" | " + " | ".join(extra) if extra else ""))
        ax.set_ylabel(metric)
        out.append((f"{metric} {arrow}".strip(), _save(fig, out_dir / f"dist-{_safe(metric)}.svg")))
    return out


def clip_alignment_values(df: pd.DataFrame) -> dict[str, list[float]]:
    """Per-image CLIP alignment by image set: clean, protected per attack, purified per
    attack | purifier (clip-align records, deduplicated by score key: one clean score is
    shared by every cell of an identity)."""
    sub = df[(df["metric_name"] == "clip-align") & (df["status"] == "ok")]
    groups: dict[str, list[float]] = {}
    seen: set = set()
    for _, r in sub.iterrows():
        details = r["details"] if isinstance(r.get("details"), dict) else {}
        of = details.get("of", "protected")
        if of == "generated":
            continue
        label = {"clean": "clean", "protected": f"protected: {r['attack']}",
                 "purified": f"purified: {r['attack']} | {r['purifier']}"}.get(of, of)
        dedup = (label, r["identity"], r["seed"], details.get("caption"))
        if dedup in seen:
            continue
        seen.add(dedup)
        values = details.get("per_image")
        values = values if isinstance(values, list) and values else [r["value"]]
        groups.setdefault(label, []).extend(float(v) for v in values if v is not None)
    order = sorted(groups, key=lambda k: (0 if k == "clean" else 1 if k.startswith("protected") else 2, k))
    return {k: groups[k] for k in order}


def plot_clip_alignment(df: pd.DataFrame, out_dir: Path) -> Path | None:
    groups = clip_alignment_values(df)
    if not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(groups) + 1.5), 3.2))
    _boxes(ax, groups, np.random.default_rng(0))
    ax.set_title("CLIP image–prompt alignment: clean vs protected vs purified")
    ax.set_ylabel("cos(image, prompt)")
    return _save(fig, out_dir / "clip-alignment.svg")


def realign_values(run: RunData) -> list[dict]:
    """The realign purifier's alignment before/after per image, from purify stage info."""
    out = []
    for cell in run.cells:
        meta = run.store.get("purify", cell.keys.get("purify"))
        if not meta:
            continue
        for label, info in (meta.get("info", {}).get("purifiers") or {}).items():
            r = info.get("realign") if isinstance(info, dict) else None
            if isinstance(r, dict) and r.get("alignment_before") and r.get("alignment_after"):
                out.append({"attack": cell.attack, "purifier": label, "identity": cell.identity,
                            "before": r["alignment_before"], "after": r["alignment_after"],
                            "clean_range": r.get("clean_range"), "strength": r.get("strength")})
    unique = {json.dumps(v, sort_keys=True): v for v in out}  # one purify stage serves several cells
    return list(unique.values())


def plot_realign(values: list[dict], out_dir: Path) -> Path | None:
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    attacks = list(dict.fromkeys(v["attack"] for v in values))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lows = []
    for v in values:
        c = colours[attacks.index(v["attack"]) % len(colours)]
        ax.scatter(v["before"], v["after"], s=14, color=c, label=v["attack"])
        if v.get("clean_range"):
            lows.append(v["clean_range"][0])
    lo = min(min(min(v["before"]), min(v["after"])) for v in values)
    hi = max(max(max(v["before"]), max(v["after"])) for v in values)
    ax.plot([lo, hi], [lo, hi], color="#999", lw=0.8, ls="--")
    if lows:
        ax.axhline(float(np.mean(lows)), color="tab:green", lw=0.8, label="clean range (low)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_xlabel("alignment before realign")
    ax.set_ylabel("alignment after realign")
    ax.set_title("realign: per-image CLIP alignment")
    return _save(fig, out_dir / "realign.svg")


def stage_costs(run: RunData) -> pd.DataFrame:
    """Seconds (and peak memory where recorded) of each stage folder this run used: the
    cells' own stages, their scores, and the shared stages (class images, surrogates) of the
    store."""
    used: dict[str, set] = defaultdict(set)
    for cell in run.cells:
        for stage, key in cell.keys.items():
            if key:
                used[stage].add(key)
        for rec in cell.records:
            if isinstance(rec.get("key"), str):
                used["score"].add(rec["key"])
    own = own_seconds([m for metas in run.store.meta.values() for m in metas.values()])
    rows = []
    for stage, metas in run.store.meta.items():
        for key, meta in metas.items():
            if stage in STAGES and key not in used[stage]:
                continue
            rows.append({"stage": stage, "key": key, "seconds": own.get((stage, key), 0.0),
                         "inclusive_seconds": float(meta.get("seconds") or 0.0),
                         "peak_memory_mb": _find_memory(meta)})
    return pd.DataFrame(rows, columns=["stage", "key", "seconds", "inclusive_seconds", "peak_memory_mb"])


def own_seconds(metas: list[dict]) -> dict[tuple[str, str], float]:
    """Each stage's time without the upstream stages it computed on demand.

    The runner evaluates stages from the scores backwards, so the first score of a cell
    times the generation, training, purification and protection it triggered; its
    ``seconds`` are inclusive. A stage ran in ``[finished − seconds, finished]``; the time
    covered by other stages' intervals nested inside it is subtracted."""
    spans = sorted(((float(m.get("finished", 0)) - float(m.get("seconds") or 0), float(m.get("finished", 0)),
                     (m.get("stage"), m.get("key"))) for m in metas if m.get("finished")), key=lambda t: t[0])
    starts = [t[0] for t in spans]
    out: dict[tuple[str, str], float] = {}
    tol = 1e-3  # 'finished' and 'seconds' come from two clocks
    for i, (start, end, ident) in enumerate(spans):
        lo, hi = bisect_left(starts, start - tol), bisect_right(starts, end)
        inner = [(s, e) for j, (s, e, _) in enumerate(spans[lo:hi], lo) if j != i and e <= end + tol]
        covered, cursor = 0.0, start
        for s, e in sorted(inner):  # the length of the union of the nested intervals
            s, e = max(s, cursor), min(e, end)
            if e > s:
                covered += e - s
                cursor = e
        out[ident] = max(0.0, (end - start) - covered)
    return out


def _find_memory(meta: dict) -> float | None:
    for where in (meta, meta.get("info") or {}):
        for k in MEMORY_KEYS:
            if isinstance(where.get(k), (int, float)):
                return float(where[k])
    return None


def plot_costs(costs: pd.DataFrame, out_dir: Path) -> Path | None:
    if not len(costs):
        return None
    plt = _pyplot()
    order = [s for s in (*STAGES[:4], "score") if s in set(costs["stage"])]
    order += sorted(set(costs["stage"]) - set(order))
    has_memory = costs["peak_memory_mb"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(9 if has_memory else 5.5, 3.2), squeeze=False)
    ax = axes[0][0]
    totals = [costs[costs["stage"] == s]["seconds"].sum() for s in order]
    counts = [int((costs["stage"] == s).sum()) for s in order]
    bars = ax.bar(order, totals, color="tab:blue")
    for b, n in zip(bars, counts):
        ax.annotate(f"{n}×", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("seconds (sum over stage folders)")
    ax.set_title("own time per stage, upstream excluded (n× = folders)")
    ax.tick_params(axis="x", rotation=30)
    if has_memory:
        ax2 = axes[0][1]
        peaks = [costs[costs["stage"] == s]["peak_memory_mb"].max() for s in order]
        ax2.bar(order, [0 if p is None or not math.isfinite(p) else p for p in peaks], color="tab:orange")
        ax2.set_ylabel("peak memory (MB)")
        ax2.set_title("peak memory per stage")
        ax2.tick_params(axis="x", rotation=30)
    return _save(fig, out_dir / "cost.svg")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def tables_section(run: RunData) -> str:
    views = leaderboard.build(run.run_dir)
    numeric = views["_numeric"]
    parts = ['<h2 id="tables">Leaderboard</h2>',
             '<p>Mean over identities ± 95% interval (t·sd/√n), the same numbers as '
             '<code>benchbase leaderboard</code>. ↑ = higher favours the protection, ↓ = lower favours '
             'the protection. Click a column to sort; hover a status for its reason.</p>']
    for name, title in leaderboard.TITLES.items():
        notes = _cell_notes(views[name], numeric) if name == "cells" else {}
        parts.append(f"<h3>{esc(title)}</h3>" + table_html(views[name], f"table-{name}", notes))
    df = run.df
    unavailable = df[df["status"] == "unavailable"].drop_duplicates("metric")
    if len(unavailable):
        parts.append("<h3>Unavailable metrics</h3><ul>" + "".join(
            f"<li><code>{esc(r.metric)}</code>: {esc(r.error)}</li>" for r in unavailable.itertuples()) + "</ul>")
    failed = df[df["status"] == "failed"]
    if len(failed):
        parts.append(f"<h3>Failures</h3><p>{len(failed)} records failed.</p><ul>" + "".join(
            f"<li>{esc(r.identity)} {esc(r.attack)} / {esc(r.purifier)} / {esc(r.defense)} / "
            f"{esc(r.personalizer)} <code>{esc(r.metric)}</code>: {esc(r.error)}</li>"
            for r in failed.head(20).itertuples()) + "</ul>")
    return "\n".join(parts)


def plots_section(run: RunData, out_dir: Path) -> str:
    plots = out_dir / "plots"
    parts = ['<h2 id="plots">Plots</h2><div class="plots">']

    def img(path: Path, alt: str) -> str:
        return f'<figure><img src="{esc(href(path, out_dir))}" alt="{esc(alt)}"><figcaption>{esc(alt)}</figcaption></figure>'

    parts.append("<h3>Metric distributions per attack and purifier</h3>")
    dists = plot_distributions(run.df, plots)
    parts += [img(p, f"distribution of {name}") for name, p in dists] or ["<p>No metric has a value.</p>"]
    parts.append("<h3>CLIP image–prompt alignment (DiffShortcut diagnostic)</h3>")
    clip = plot_clip_alignment(run.df, plots)
    parts.append(img(clip, "CLIP alignment of clean, protected and purified images") if clip else
                 "<p>No <code>clip-align</code> metric with values in this run (add e.g. "
                 "<code>{ name = \"clip-align\", of = \"protected\" }</code> and <code>of = \"clean\"</code>, "
                 "<code>of = \"purified\"</code> to the suite).</p>")
    realign = plot_realign(realign_values(run), plots)
    if realign:
        parts.append(img(realign, "realign: alignment before and after, per image"))
    parts.append("<h3>Cost per stage</h3>")
    costs = stage_costs(run)
    cost = plot_costs(costs, plots)
    if cost:
        parts.append(img(cost, "seconds per stage"))
        summary = costs.groupby("stage")["seconds"].agg(["count", "sum", "mean", "max"]).reset_index()
        summary.columns = ["stage", "folders", "seconds (sum)", "seconds (mean)", "seconds (max)"]
        parts.append("<p>Own time of each stage folder: the seconds its <code>_done.json</code> records, less "
                     "the upstream stages it computed on demand (nested in its time span). Cached stages "
                     "count the time of the run that computed them.</p>")
        summary = summary.round(2)
        if costs["peak_memory_mb"].notna().any():
            summary["peak memory MB"] = summary["stage"].map(costs.groupby("stage")["peak_memory_mb"].max())
        else:
            parts.append("<p>Peak memory: not recorded by this run's stages.</p>")
        parts.append(table_html(summary, "table-cost"))
    else:
        parts.append("<p>No stage folder found in the store.</p>")
    parts.append("</div>")
    return "\n".join(parts)


def _cell_heat_scale(meta: dict | None) -> float:
    eps = (meta or {}).get("info", {}).get("eps_levels")
    return float(eps) if isinstance(eps, (int, float)) and eps > 0 else 16.0


def gallery_section(run: RunData, out_dir: Path, thumbs: Thumbs, max_samples: int = MAX_SAMPLES) -> str:
    parts = ['<h2 id="images">Images</h2>',
             f"<p>Thumbnails ({thumbs.size} px, JPEG) link to the original PNGs. Heat maps: per-pixel "
             "|protected − clean| (max over RGB, in 8-bit levels) divided by the attack's budget ε "
             "(16 levels when it has none), magma colour map from 0 (black) to ε (yellow); for purified "
             "images |purified − clean| on the same scale. Scores under each image (and on hover): PSNR (dB) "
             "and L∞ (levels) against its clean image, computed here, then the per-image values the run's "
             "metrics recorded.</p>"]
    by_identity: dict[str, list[CellView]] = defaultdict(list)
    for cell in run.cells:
        by_identity[cell.identity].append(cell)
    for n_id, (identity, cells) in enumerate(by_identity.items()):
        parts.append(f'<details class="identity" {"open" if n_id == 0 else ""}><summary>identity '
                     f'{esc(identity)} ({len(cells)} cells)</summary>')
        clean = run.clean(identity)
        clean_by_stem: dict[str, np.ndarray] = {}
        if isinstance(clean, str):
            parts.append(f'<p class="warn">{esc(clean)}</p>')
        else:
            arrays, stems = clean
            clean_by_stem = dict(zip(stems, arrays))
            scores = per_image_scores([r for c in cells for r in c.records]).get("clean", {})
            items = [figure(thumbs.image(a, f"clean|{identity}|{s}"), None, f"{s}\n{_score_text(scores, i)}",
                            f"clean {s} (rebuilt from the dataset) {_score_text(scores, i)}")
                     for i, (a, s) in enumerate(sorted(zip(arrays, stems), key=lambda t: t[1]))]
            parts.append(row("clean set_B", items))
        seen_attack: set = set()
        for cell in cells:
            parts.append(_cell_html(run, cell, out_dir, thumbs, clean_by_stem, max_samples,
                                    show_protected=(cell.seed, cell.attack) not in seen_attack))
            seen_attack.add((cell.seed, cell.attack))
        parts.append("</details>")
    return "\n".join(parts)


def _images_row(label: str, folder: Path | None, kind: str, cell: CellView, out_dir: Path, thumbs: Thumbs,
                clean: dict[str, np.ndarray], scores: dict[str, list], scale: float) -> str:
    if folder is None or not (folder / "images").is_dir():
        return row(label, [], f"{kind} stage folder not found")
    files = sorted((folder / "images").glob("*.png"))
    items, heats = [], []
    for i, path in enumerate(files):
        arr = _read(path)
        base = clean.get(path.stem)
        extra = {}
        if base is not None and base.shape == arr.shape:
            extra = {"PSNR": image_psnr(arr, base), "L∞": linf_levels(arr, base)}
        if extra and extra["L∞"] > 0:  # an all-black map says nothing the L∞ 0 caption does not
            heats.append(figure(thumbs.heat(arr, base, scale, str(path)), href(path, out_dir),
                                f"|{kind} − clean| / {scale:g}", f"heat map of {path.name}", "heat"))
        text = _score_text(scores, i, extra)
        items.append(figure(thumbs.image(arr, str(path)), href(path, out_dir), f"{path.stem}: {text}",
                            f"{kind} {path.name} — {text}"))
    out = row(label, items)
    if heats:
        out += row(f"{label}: heat map", heats)
    return out


def _cell_html(run: RunData, cell: CellView, out_dir: Path, thumbs: Thumbs, clean: dict[str, np.ndarray],
               max_samples: int, show_protected: bool) -> str:
    keys = cell.keys
    protect_meta = run.store.get("protect", keys.get("protect"))
    scale = _cell_heat_scale(protect_meta)
    scores = per_image_scores(cell.records)
    parts = [f'<details class="cell" open><summary>{esc(cell.label)} (seed {cell.seed})</summary>']
    summary = []
    for rec in cell.records:
        value = _fmt(rec.get("value")) if rec.get("status") == "ok" else rec.get("status")
        summary.append(f'<span title="{esc(rec.get("error") or "")}"><code>{esc(rec["metric"])}</code> '
                       f'{esc(value)}</span>')
    parts.append("<p>" + " · ".join(summary) + "</p>")
    if protect_meta:
        info = protect_meta.get("info", {})
        parts.append(f"<p>protect: ε {esc(info.get('eps_levels'))} levels, measured L∞ {esc(info.get('linf_levels'))}, "
                     f"L2 {esc(_fmt(info.get('l2_levels')))} levels, {esc(protect_meta.get('seconds'))} s</p>")
    if show_protected:
        parts.append(_images_row(f"protected ({cell.attack})", run.store.path("protect", keys.get("protect")),
                                 "protected", cell, out_dir, thumbs, clean, scores.get("protected", {}), scale))
    else:
        parts.append(f'<p class="status">protected images of {esc(cell.attack)}: shown above (one protection '
                     'serves every purifier).</p>')
    if cell.purifier == "none":  # the purify stage of 'none' holds the protected images again
        parts.append('<p class="status">no purifier: the personalizer trained on the protected images.</p>')
    else:
        parts.append(_images_row(f"purified ({cell.purifier})", run.store.path("purify", keys.get("purify")),
                                 "purified", cell, out_dir, thumbs, clean, scores.get("purified", {}), scale))
    gen = run.store.path("generate", keys.get("generate"))
    if gen is None or not (gen / "prompts.json").is_file():
        parts.append(row("generated", [], "generate stage folder not found"))
    else:
        index = json.loads((gen / "prompts.json").read_text())
        for prompt, sub in index.items():
            files = sorted((gen / sub).glob("*.png"))
            prompt_scores = scores["generated"].get(prompt, {})
            items = []
            for i, path in enumerate(files[:max_samples]):
                text = _score_text(prompt_scores, i)
                items.append(figure(thumbs.image(_read(path), str(path)), href(path, out_dir),
                                    f"{path.stem}: {text}" if text else path.stem,
                                    f"{prompt} — {path.name} {text}"))
            more = (f' <a href="{esc(href(gen / sub, out_dir))}">all {len(files)}</a>'
                    if len(files) > max_samples else "")
            per_prompt = [f"{r['metric']} {_fmt((r.get('per_prompt') or {}).get(prompt))}" for r in cell.records
                          if isinstance(r.get("per_prompt"), dict) and prompt in r["per_prompt"]]
            label = f"“{prompt}”" + (f" ({'; '.join(per_prompt)})" if per_prompt else "")
            parts.append(row(label, items) + more)
    parts.append("</details>")
    return "\n".join(parts)


def provenance_section(run: RunData) -> str:
    info = run.info

    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) if isinstance(t, (int, float)) else "?"

    backend = info.get("backend", {})
    counts = run.df["status"].value_counts().to_dict()
    rows = [
        ("suite", f"{info.get('suite', '?')} ({info.get('suite_source', '?')})"),
        ("suite hash", info.get("suite_hash")), ("status", info.get("status")),
        ("started", when(info.get("started"))), ("updated", when(info.get("updated"))),
        ("run time", f"{info.get('seconds')} s" if info.get("seconds") is not None else "?"),
        ("model", backend.get("description")), ("backend fingerprint", backend.get("fingerprint")),
        ("device", info.get("device")), ("GPU", info.get("cuda_device") or "—"), ("dtype", info.get("dtype")),
        ("seeds", info.get("seeds")), ("cells per identity", info.get("n_cells")),
        ("identities", ", ".join(map(str, dict.fromkeys(run.df["identity"])))),
        ("records", ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))),
        ("stages executed / cached (last invocation)", f"{info.get('executed')} / {info.get('cached')}"),
        ("platform", info.get("platform")), ("python", info.get("python")),
    ]
    parts = ['<h2 id="provenance">Provenance</h2>',
             pd.DataFrame(rows, columns=["field", "value"]).pipe(lambda d: table_html(d.astype(str), "table-provenance"))]
    packages = info.get("packages") or {}
    if packages:
        parts.append("<h3>Packages</h3>" + table_html(
            pd.DataFrame(sorted(packages.items()), columns=["package", "version"]), "table-packages"))
    plugins = info.get("plugins") or {}
    rows = [{"family": fam, "component": name, "version": e.get("version"), "plugin": e.get("plugin"),
             "distribution": f"{e.get('distribution') or '—'} {e.get('distribution_version') or ''}".strip()}
            for fam, entries in plugins.items() for name, e in entries.items()]
    if rows:
        parts.append("<h3>Components</h3>" + table_html(pd.DataFrame(rows), "table-plugins"))
    parts.append("<h3>Suite</h3><pre>" + esc(json.dumps(info.get("suite_data", {}), indent=1)) + "</pre>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def write(run_dir: Path, out_dir: Path | None = None, store: Path | None = None, thumb_size: int = THUMB_SIZE,
          max_samples: int = MAX_SAMPLES, manager=None) -> Path:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``) and
    return the path of its ``index.html``."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS).is_file():
        raise DataError(f"{run_dir} has no {RESULTS}: is it a benchbase run folder? (run `benchbase run` first)")
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunData(run_dir, store=store, manager=manager)
    thumbs = Thumbs(out_dir, thumb_size)
    backend = run.info.get("backend", {}).get("description", "")
    warn = ('<p class="warn"><b>Random-weight model: these numbers and images test the machinery, not the '
            'science.</b></p>' if ("RANDOM" in backend or "tiny" in backend) else "")
    if not (run_dir / RUN_JSON).is_file():
        warn += f'<p class="warn">{RUN_JSON} is missing: no provenance, no clean images.</p>'
    body = [
        f"<h1>benchbase report: suite <code>{esc(run.info.get('suite', '?'))}</code> "
        f"(hash {esc(run.info.get('suite_hash', '?'))})</h1>",
        f"<p>{esc(backend)} · device {esc(run.info.get('device', '?'))} · status {esc(run.info.get('status', '?'))}"
        f" · {run.df['identity'].nunique()} identities · {len(run.cells)} cells</p>", warn,
        '<nav><a href="#tables">Leaderboard</a><a href="#plots">Plots</a><a href="#images">Images</a>'
        '<a href="#provenance">Provenance</a></nav>',
        tables_section(run), plots_section(run, out_dir), gallery_section(run, out_dir, thumbs, max_samples),
        provenance_section(run),
        f"<footer><p>Written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by <code>benchbase report</code>; "
        f"thumbnails {thumbs.total_bytes() / 1e6:.2f} MB.</p></footer>",
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>benchbase report: {esc(run.info.get('suite', run_dir.name))}</title>"
            f"<style>:root {{ --thumb: {thumb_size}px; }}{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def serve_root(index: Path, run_dir: Path, store: Path | None = None) -> Path:
    """The folder to serve so that the report and the originals it links are both inside."""
    paths = [Path(index).resolve().parent, Path(run_dir).resolve()]
    if store:
        paths.append(Path(store).resolve())
    return Path(os.path.commonpath([str(p) for p in paths]))


def make_server(index: Path, run_dir: Path, port: int = 8000, store: Path | None = None):
    """An HTTP server bound to 127.0.0.1 only (never other interfaces) whose root holds the
    report and the originals it links; returns ``(server, url of index.html)``."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = serve_root(index, run_dir, store)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per thumbnail would drown the URL
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), partial(Quiet, directory=str(root)))
    url_path = quote(Path(os.path.relpath(Path(index).resolve(), root)).as_posix())
    return server, f"http://127.0.0.1:{server.server_address[1]}/{url_path}"


def serve(index: Path, run_dir: Path, port: int = 8000, store: Path | None = None, echo=print) -> None:
    """Serve the report until interrupted (Ctrl-C)."""
    server, url = make_server(index, run_dir, port, store)
    with server:
        echo(f"serving {url} (Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
