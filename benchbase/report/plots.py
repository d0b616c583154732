"""Plots (matplotlib, Agg, SVG): metric distributions, the figures components declare
(``FigureSpec``) and the cost of each stage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from benchbase import leaderboard
from benchbase.records import CELL_STAGES, FigureSpec, Record, Stage, dig
from benchbase.report.data import RunData
from benchbase.report.html import esc, href

STAGE_ORDER = [s.value for s in (*CELL_STAGES, Stage.SCORE)]
IMAGE_SETS = ("clean", "protected", "purified", "generated")


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


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


RASTER_DOTS = 5000


def _boxes(ax, groups: dict[str, list[float]], rng: np.random.Generator) -> None:
    labels = list(groups)
    data = [[v for v in groups[k] if v is not None and math.isfinite(v)] for k in labels]
    positions = list(range(1, len(labels) + 1))
    filled = [(p, d) for p, d in zip(positions, data) if d]
    if filled:
        ax.boxplot([d for _, d in filled], positions=[p for p, _ in filled], widths=0.5, showfliers=False)
        # every value as a dot: with few identities a box alone misleads. One scatter for all the
        # boxes (the same jitter draws, in the same order): a grid of many cells drew thousands
        xs = np.concatenate([p + rng.uniform(-0.12, 0.12, len(d)) for p, d in filled])
        # past RASTER_DOTS dots (a grid of many identities) the dots are an image inside the SVG:
        # a browser crawls over 100,000 SVG circles, and writing them took most of a report
        ax.scatter(xs, np.concatenate([np.asarray(d, dtype=float) for _, d in filled]), s=12, alpha=0.7,
                   color="tab:blue", zorder=3, rasterized=len(xs) > RASTER_DOTS)
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
        labels = zip(*(sub[c].astype(str).tolist() for c in ("attack", "purifier", *extra)))
        for label, value in zip(map(" | ".join, labels), sub["value"]):  # columns, not iterrows
            groups.setdefault(label, []).append(float(value))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(groups) + 1.5), 3.2))
        _boxes(ax, groups, np.random.default_rng(i))
        arrow = leaderboard.ARROW.get(directions.get(metric), "")
        ax.set_title(f"{metric} {arrow} per attack | purifier" + (" | " + " | ".join(extra) if extra else ""))
        ax.set_ylabel(metric)
        out.append((f"{metric} {arrow}".strip(), _save(fig, out_dir / f"dist-{_safe(metric)}.svg")))
    return out


# -- figures components declare ----------------------------------------------------------


def _image_set_label(of: str, rec: Record) -> str:
    """An image set depends on the cell fields upstream of it: protected images on the attack,
    purified ones on the attack and the purifier, generated ones on the whole cell."""
    return {"clean": "clean", "protected": f"protected: {rec.attack}",
            "purified": f"purified: {rec.attack} | {rec.purifier}",
            "generated": f"generated: {rec.attack} | {rec.purifier} | {rec.defense} | {rec.personalizer}"}.get(of, of)


def _numbers(values) -> list[float]:
    if isinstance(values, dict):  # per eval prompt
        return [v for sub in values.values() for v in _numbers(sub)]
    if isinstance(values, (list, tuple)):
        return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if isinstance(values, (int, float)) and math.isfinite(values):
        return [float(values)]
    return []


def box_values(records: list[Record], labels: list[str], spec: FigureSpec) -> dict[str, list[float]]:
    """The values a ``boxes`` figure shows: per image set the metric scored (``details.of``),
    from the records of the metrics labelled ``labels``; a score shared by several cells (one
    clean score per identity, one protected score per attack) counts once."""
    groups: dict[str, list[float]] = {}
    seen: set = set()
    for rec in records:
        if rec.metric not in labels or rec.status != "ok":
            continue
        of = rec.details.get("of") or "generated"
        if spec.image_sets and of not in spec.image_sets:
            continue
        if rec.key is not None:
            if rec.key in seen:
                continue
            seen.add(rec.key)
        values = _numbers(dig(rec.to_json(), spec.values)) or _numbers(rec.value)
        groups.setdefault(_image_set_label(of, rec), []).extend(values)
    rank = {s: i for i, s in enumerate(IMAGE_SETS)}
    order = sorted(groups, key=lambda k: (rank.get(k.split(":")[0], len(IMAGE_SETS)), k))
    return {k: groups[k] for k in order}


def plot_boxes(groups: dict[str, list[float]], spec: FigureSpec, path: Path) -> Path | None:
    if not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(groups) + 1.5), 3.2))
    _boxes(ax, groups, np.random.default_rng(0))
    ax.set_title(spec.title)
    ax.set_ylabel(spec.ylabel)
    return _save(fig, path)


def scatter_values(run: RunData, labels: list[str], spec: FigureSpec) -> list[dict]:
    """The points a ``scatter`` figure of ``purify-info`` shows: for every purify stage of the
    run (once, however many cells share it) and every purifier of its chain labelled ``labels``,
    the lists at ``x`` and ``y`` of the info it recorded."""
    out, seen = [], set()
    for cell in run.cells:
        key = cell.keys.get("purify")
        meta = run.meta(Stage.PURIFY, key)
        if meta is None or key in seen:
            continue
        seen.add(key)
        for label, info in (meta.info.get("purifiers") or {}).items():
            if label not in labels:
                continue
            x, y = _numbers(dig(info, spec.x)), _numbers(dig(info, spec.y))
            if x and len(x) == len(y):
                line = dig(info, spec.hline) if spec.hline else None
                out.append({"attack": cell.attack, "purifier": label, "identity": cell.identity, "x": x, "y": y,
                            "hline": float(line) if isinstance(line, (int, float)) else None})
    return out


def plot_scatter(points: list[dict], spec: FigureSpec, path: Path) -> Path | None:
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    attacks = list(dict.fromkeys(p["attack"] for p in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for p in points:
        ax.scatter(p["x"], p["y"], s=14, color=colours[attacks.index(p["attack"]) % len(colours)], label=p["attack"])
    lo = min(min(min(p["x"]), min(p["y"])) for p in points)
    hi = max(max(max(p["x"]), max(p["y"])) for p in points)
    ax.plot([lo, hi], [lo, hi], color="#999", lw=0.8, ls="--")
    lines = [p["hline"] for p in points if p["hline"] is not None]
    if lines:
        ax.axhline(float(np.mean(lines)), color="tab:green", lw=0.8, label=spec.hline_label or spec.hline)
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_xlabel(spec.xlabel or spec.x)
    ax.set_ylabel(spec.ylabel or spec.y)
    ax.set_title(spec.title)
    return _save(fig, path)


def declared_figures(run: RunData, out_dir: Path) -> list[tuple[FigureSpec, Path | None]]:
    """Every figure the run's components declared (run.json ``figures``), drawn or None when
    the run recorded nothing for it."""
    out = []
    for i, (entry, spec) in enumerate(run.info.figure_specs()):
        labels = list(entry.get("labels") or [])
        path = out_dir / f"figure-{i}-{_safe(entry.get('name', ''))}.svg"
        if spec.kind == "scatter" and spec.source == "purify-info":
            out.append((spec, plot_scatter(scatter_values(run, labels, spec), spec, path)))
        elif spec.kind == "boxes" and spec.source == "records":
            out.append((spec, plot_boxes(box_values(run.records, labels, spec), spec, path)))
    return out


# -- budget curves -------------------------------------------------------------------------


def plot_curves(lines: list[dict], family: str, param: str, directions: dict, path: Path,
                visibility: set[str] = frozenset()) -> Path | None:
    """One panel per metric: each curve's mean over identities against the swept value, with its
    95% interval as error bars (``curve-<panel>-<line>``); ``noise`` dashed, the baseline at the
    same budgets; a metric in ``visibility`` (PSNR of the protected images) titled as the cost."""
    metrics = list(dict.fromkeys(m for line in lines for m, pts in line["points"].items() if pts))
    if not metrics:
        return None
    fig, axes = _panels(len(metrics), width=4.2, height=3.0)
    values = [v for line in lines for pts in line["points"].values() for v, _, _ in pts]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ticks = list(dict.fromkeys(values)) if not numeric else None
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        for j, line in enumerate(lines):
            pts = line["points"].get(metric) or []
            if not pts:
                continue
            xs = [v if numeric else ticks.index(v) for v, _, _ in pts]
            ys = [m for _, m, _ in pts]
            err = [0.0 if math.isnan(c) else c for _, _, c in pts]
            noise = line.get("name") == "noise"
            bars = ax.errorbar(xs, ys, yerr=err, marker="o", ms=3.5, capsize=3, lw=1.4,
                               ls="--" if noise else "-", color="tab:gray" if noise else None, label=line["label"])
            bars.lines[0].set_gid(f"curve-{i}-{j}")
        arrow = leaderboard.ARROW.get(directions.get(metric), "")
        title = f"{metric} {arrow}".strip()
        ax.set_title(_wrap(title + (" (visibility cost)" if metric in visibility else ""), 44))
        ax.set_xlabel(f"{family} {param}")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels([str(t) for t in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def curves_section(run: RunData, out_dir: Path, img) -> list[str]:
    """The budget curves of the run's swept entries (``benchbase.variants``), when it has some."""
    from benchbase import variants

    views = leaderboard.views_of(run.df, run.info)
    view = views.get("curves")
    if view is None or not len(view):
        return []
    directions = views["_directions"].iloc[0].to_dict() if len(views["_directions"]) else {}
    ok = run.df[run.df["status"] == "ok"]
    visibility = {m for m, g in ok.groupby("metric") if (g["metric_name"] == "psnr").all()
                  and all(isinstance(d, dict) and d.get("of", "protected") == "protected" for d in g["details"])}
    parts = ["<h3>Budget curves</h3>",
             "<p>Each metric against the swept parameter: mean over identities, error bars the 95% interval "
             "(the <em>curves</em> table). Dashed grey: <code>noise</code> at the same values; a PSNR of the "
             "protected images is the visibility cost of each budget.</p>"]
    for k, ((family, param), lines) in enumerate(variants.curve_lines(view).items()):
        path = plot_curves(lines, family, str(param), directions, out_dir / f"curves-{k}-{_safe(str(param))}.svg",
                           visibility)
        if path:
            parts.append(img(path, f"{family} {param}: metrics against the swept value"))
    return parts


# -- cost ----------------------------------------------------------------------------------


def stage_costs(run: RunData) -> pd.DataFrame:
    """Own seconds, inclusive seconds and peak memory of each stage folder this run used: the
    cells' stages, their scores, and the shared stages (class images, surrogates) of the store."""
    used: dict[str, set] = {s: set() for s in STAGE_ORDER}
    for cell in run.cells:
        for stage, key in cell.keys.items():
            if key:
                used[stage].add(key)
        for rec in cell.records:
            if rec.key:
                used[Stage.SCORE.value].add(rec.key)
    rows = []
    for stage, metas in run.metas.items():
        for key, meta in metas.items():
            if stage in used and key not in used[stage]:
                continue
            rows.append({"stage": stage, "key": key, "seconds": meta.seconds,
                         "inclusive_seconds": meta.inclusive_seconds, "peak_rss_mb": meta.peak_rss_mb,
                         "peak_cuda_memory_mb": meta.peak_cuda_memory_mb})
    columns = ["stage", "key", "seconds", "inclusive_seconds", "peak_rss_mb", "peak_cuda_memory_mb"]
    return pd.DataFrame(rows, columns=columns).astype({c: float for c in columns[2:]})


def cost_summary(costs: pd.DataFrame) -> pd.DataFrame:
    order = [s for s in STAGE_ORDER if s in set(costs["stage"])] + sorted(set(costs["stage"]) - set(STAGE_ORDER))
    rows = []
    for stage in order:
        sub = costs[costs["stage"] == stage]
        row = {"stage": stage, "folders": len(sub), "seconds (sum)": sub["seconds"].sum(min_count=1),
               "seconds (mean)": sub["seconds"].mean(), "seconds (max)": sub["seconds"].max(),
               "with upstream/shared (sum)": sub["inclusive_seconds"].sum(min_count=1),
               "peak RSS MB (max)": sub["peak_rss_mb"].max()}
        if costs["peak_cuda_memory_mb"].notna().any():
            row["peak CUDA MB (max)"] = sub["peak_cuda_memory_mb"].max()
        rows.append(row)
    return pd.DataFrame(rows).round(2)


def plot_costs(costs: pd.DataFrame, out_dir: Path) -> Path | None:
    if not len(costs) or costs["seconds"].isna().all():
        return None
    plt = _pyplot()
    order = [s for s in STAGE_ORDER if s in set(costs["stage"])] + sorted(set(costs["stage"]) - set(STAGE_ORDER))
    cuda = costs["peak_cuda_memory_mb"].notna().any()
    memory = "peak_cuda_memory_mb" if cuda else "peak_rss_mb"
    has_memory = costs[memory].notna().any()
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(9 if has_memory else 5.5, 3.2), squeeze=False)
    ax = axes[0][0]
    totals = [costs[costs["stage"] == s]["seconds"].sum() for s in order]
    counts = [int((costs["stage"] == s).sum()) for s in order]
    bars = ax.bar(order, totals, color="tab:blue")
    for b, n in zip(bars, counts):
        ax.annotate(f"{n}×", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("seconds (sum over stage folders)")
    ax.set_title("own time per stage (n× = folders)")
    ax.tick_params(axis="x", rotation=30)
    if has_memory:
        ax2 = axes[0][1]
        peaks = [costs[costs["stage"] == s][memory].max() for s in order]
        ax2.bar(order, [0 if p is None or not math.isfinite(p) else p for p in peaks], color="tab:orange")
        ax2.set_ylabel("peak CUDA memory (MB)" if cuda else "peak resident memory (MB, process high-water mark)")
        ax2.set_title("peak memory per stage")
        ax2.tick_params(axis="x", rotation=30)
    return _save(fig, out_dir / "cost.svg")


def plots_section(run: RunData, out_dir: Path) -> str:
    from benchbase.report.tables import frame_html

    plots = out_dir / "plots"
    parts = ['<h2 id="plots">Plots</h2><div class="plots">']

    def img(path: Path, alt: str) -> str:
        return (f'<figure><img src="{esc(href(path, out_dir))}" alt="{esc(alt)}">'
                f'<figcaption>{esc(alt)}</figcaption></figure>')

    parts.append("<h3>Metric distributions per attack and purifier</h3>")
    dists = plot_distributions(run.df, plots)
    parts += [img(p, f"distribution of {name}") for name, p in dists] or ["<p>No metric has a value.</p>"]
    parts += curves_section(run, plots, img)
    for spec, path in declared_figures(run, plots):
        parts.append(f"<h3>{esc(spec.title)}</h3>")
        parts.append(img(path, spec.title) if path else "<p>This run recorded no values for this figure.</p>")
    parts.append("<h3>Cost per stage</h3>")
    costs = stage_costs(run)
    cost = plot_costs(costs, plots)
    if len(costs):
        if cost:
            parts.append(img(cost, "seconds per stage"))
        parts.append("<p>Own time of each stage folder (its <code>_done.json</code> <code>seconds</code>: the "
                     "shared stages it computed inside, such as class images, not included; they have their "
                     "own row). Cached stages count the time of the run that computed them. Peak RSS is the "
                     "process's resident-memory high-water mark when the stage finished; peak CUDA memory is "
                     "what the stage itself allocated at most.</p>")
        parts.append(frame_html(cost_summary(costs), "table-cost"))
    else:
        parts.append("<p>No stage folder found in the store.</p>")
    parts.append("</div>")
    return "\n".join(parts)


# -- diagnostics ---------------------------------------------------------------------------

#: the most panels one diagnostics figure draws (a large grid would make it unreadable)
MAX_PANELS = 24


def _wrap(text: str, width: int = 48) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def _panels(n: int, width: float = 3.6, height: float = 2.8):
    plt = _pyplot()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _lines_and_mean(ax, trajectories: list[list[float]], xs_of, gid: str) -> None:
    """One thin line per trajectory (``gid-line-<j>``) and their step-wise mean, thick
    (``gid-mean``; over the trajectories that reach each step)."""
    for j, t in enumerate(trajectories):
        (line,) = ax.plot(xs_of(len(t)), t, lw=0.7, alpha=0.55, color="tab:gray")
        line.set_gid(f"{gid}-line-{j}")
    longest = max(len(t) for t in trajectories)
    padded = np.full((len(trajectories), longest), np.nan)
    for j, t in enumerate(trajectories):
        padded[j, :len(t)] = t
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step no identity reached
        mean = np.nanmean(padded, axis=0)
    (line,) = ax.plot(xs_of(longest), mean, lw=2.0, color="tab:red", marker="o" if longest < 12 else None,
                      ms=3, label=f"mean of {len(trajectories)}")
    line.set_gid(f"{gid}-mean")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_objectives(frame: pd.DataFrame, path: Path) -> Path | None:
    """Per attack (one panel each, at most ``MAX_PANELS``): its objective per outer iteration or
    PGD step, one thin line per identity (and seed) and the mean, named as the attack recorded
    it (``objective``: quantity and direction; ``points``: what one value is)."""
    if not len(frame):
        return None
    attacks = list(dict.fromkeys(frame["attack"]))[:MAX_PANELS]
    fig, axes = _panels(len(attacks))
    for i, (ax, attack) in enumerate(zip(axes, attacks)):
        sub = frame[frame["attack"] == attack]
        _lines_and_mean(ax, list(sub["trajectory"]), lambda n: np.arange(1, n + 1), f"objective-{i}")
        ax.set_title(_wrap(attack, 40))
        ax.set_ylabel(_wrap(sub["objective"].iloc[0], 40), fontsize=7)
        ax.set_xlabel(_wrap(sub["points"].iloc[0] or "recorded value", 48), fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def chain_label(row) -> str:
    return " | ".join(str(row[c]) for c in ("attack", "purifier", "defense", "personalizer"))


def plot_instance_losses(frame: pd.DataFrame, path: Path) -> Path | None:
    """Per personalize configuration (attack | purifier | defense | personalizer; one panel each,
    at most ``MAX_PANELS``): the victim's loss on its instance images over training, one thin line
    per identity (and seed) and the mean; a value is the mean of ``every`` steps (fewer for the
    last), drawn at the first of them."""
    frame = frame[frame["trajectory"].map(len) > 0]
    if not len(frame):
        return None
    labels = frame.apply(chain_label, axis=1)
    chains = list(dict.fromkeys(labels))[:MAX_PANELS]
    fig, axes = _panels(len(chains))
    for i, (ax, chain) in enumerate(zip(axes, chains)):
        sub = frame[labels == chain]
        every = int(sub["every"].iloc[0])
        _lines_and_mean(ax, list(sub["trajectory"]), lambda n, k=every: np.arange(n) * k + 1,
                        f"instance-loss-{i}")
        ax.set_title(_wrap(chain, 44), fontsize=8)
        ax.set_ylabel("instance loss (denoising MSE)", fontsize=7)
        ax.set_xlabel(f"training step (each value: the mean of {every} steps from it)" if every > 1
                      else "training step", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_latent_shifts(frame: pd.DataFrame, path: Path) -> Path | None:
    """A paired dot plot: per image set (the attack's protected images, or purified ones), one
    row; per identity a hollow dot at uniform noise's relative latent shift at the same budget,
    a filled one at the images' own, joined by a line (``latent-shift-<i>-pair-<j>``); the means
    as larger markers."""
    if not len(frame):
        return None
    plt = _pyplot()
    several = frame["metric"].nunique() > 1
    frame = frame.assign(row=frame["label"] if not several else frame["metric"] + ": " + frame["label"])
    rows = list(dict.fromkeys(frame["row"]))
    fig, ax = plt.subplots(figsize=(6.0, 0.55 * len(rows) + 1.4))
    for i, row in enumerate(rows):
        sub = frame[frame["row"] == row].groupby("identity", sort=False)[["shift", "noise_shift"]].mean()
        y = len(rows) - 1 - i
        jitter = np.linspace(-0.18, 0.18, len(sub)) if len(sub) > 1 else np.zeros(1)
        for j, ((_, r), dy) in enumerate(zip(sub.iterrows(), jitter)):
            (line,) = ax.plot([r["noise_shift"], r["shift"]], [y + dy, y + dy], color="tab:gray", lw=0.7, alpha=0.7)
            line.set_gid(f"latent-shift-{i}-pair-{j}")
            ax.scatter([r["noise_shift"]], [y + dy], s=16, facecolors="none", edgecolors="tab:blue", zorder=3)
            ax.scatter([r["shift"]], [y + dy], s=16, color="tab:red", zorder=3)
        ax.scatter([sub["noise_shift"].mean()], [y], s=70, marker="|", color="tab:blue", zorder=4, lw=2)
        ax.scatter([sub["shift"].mean()], [y], s=70, marker="|", color="tab:red", zorder=4, lw=2)
    ax.scatter([], [], s=16, facecolors="none", edgecolors="tab:blue", label="uniform noise, same L∞ budget")
    ax.scatter([], [], s=16, color="tab:red", label="the images (attack)")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_wrap(r, 40) for r in reversed(rows)])
    ax.set_xlabel("relative latent shift ‖μ(x′) − μ(x)‖ / ‖μ(x)‖ (VAE posterior mean)")
    ax.set_title("latent shift per identity: the images vs noise of the same budget")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
