"""The report page: header, sections, provenance; and a local server for it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from benchbase.records import resolve_store
from benchbase.report.data import RunData
from benchbase.report.gallery import MAX_CELLS, MAX_SAMPLES, THUMB_SIZE, Thumbs, gallery_section
from benchbase.report.html import esc, href, static
from benchbase.report.plots import (
    MAX_PANELS,
    plot_instance_losses,
    plot_latent_shifts,
    plot_objectives,
    plots_section,
)
from benchbase.report.tables import frame_html, summary_html, tables_section


def _figure(path: Path, out_dir: Path, alt: str) -> str:
    return (f'<figure><img src="{esc(href(path, out_dir))}" alt="{esc(alt)}">'
            f'<figcaption>{esc(alt)}</figcaption></figure>')


def diagnostics_section(run: RunData, out_dir: Path) -> str:
    """Why a protection works or fails here: the attacks' objectives over their optimisation,
    the victims' loss on the instance images, the latent shift against noise of the same budget
    (``benchbase.diagnostics``; docs/report.md says how to read them)."""
    from benchbase import diagnostics

    diag = run.diagnostics()
    plots = out_dir / "plots"
    parts = ['<h2 id="diagnostics">Diagnostics</h2><div class="plots">',
             "<p>What the stages recorded besides images, to see <em>why</em> a protection works or fails "
             "in this world (read in docs/report.md, “Diagnostics”). Thin grey lines: one per identity; "
             "red: their mean.</p>"]
    parts.append("<h3>Attack objective over the optimisation</h3>")
    obj = diag.objectives
    if len(obj):
        attacks = obj["attack"].nunique()
        if attacks > MAX_PANELS:
            parts.append(f"<p>The first {MAX_PANELS} of {attacks} attacks are drawn.</p>")
        parts.append(_figure(plot_objectives(obj, plots / "diag-objective.svg"), out_dir,
                             "objective per outer iteration or PGD step, per attack"))
        parts.append("<p>First and last recorded value per attack, mean over identities ± 95% interval; "
                     "<em>last − first</em> is paired per identity.</p>")
        parts.append(summary_html(diagnostics.objective_summary(obj), "table-diag-objective",
                                  {"attack": "attack", "objective": "objective", "one value": "points"},
                                  {"first": "first", "last": "last", "last − first": "change"},
                                  {"n identities": "identities"}))
    else:
        parts.append("<p>No protect stage of this run recorded an objective trajectory (no surrogate or "
                     "frozen-model attack, or a run from before attacks recorded one).</p>")
    parts.append("<h3>Victim's loss on the instance images</h3>")
    loss = diag.instance_losses
    if len(loss):
        path = plot_instance_losses(loss, plots / "diag-instance-loss.svg")
        if path:
            parts.append(_figure(path, out_dir, "instance loss over training, per personalize configuration"))
        parts.append("<p>Final instance loss (the mean of the last 10 training steps) per configuration, "
                     "mean over identities ± 95% interval.</p>")
        parts.append(summary_html(diagnostics.instance_loss_summary(loss), "table-diag-instance-loss",
                                  {c: c for c in diagnostics.CHAIN}, {"final instance loss": "final"},
                                  {"n identities": "identities"}))
    else:
        parts.append("<p>No personalize stage of this run recorded the victim's instance loss.</p>")
    parts.append("<h3>Latent shift vs uniform noise of the same budget</h3>")
    shift = diag.latent_shifts
    if len(shift):
        parts.append(_figure(plot_latent_shifts(shift, plots / "diag-latent-shift.svg"), out_dir,
                             "relative VAE latent shift per identity: the images vs noise of the same budget"))
        parts.append("<p>Mean over identities ± 95% interval; <em>images − noise</em> is paired per "
                     "identity; ratio = mean shift / mean noise shift.</p>")
        parts.append(summary_html(diagnostics.latent_shift_summary(shift), "table-diag-latent-shift",
                                  {"metric": "metric", "images": "label"},
                                  {"latent shift": "shift", "noise, same budget": "noise_shift",
                                   "images − noise": "diff"},
                                  {"n identities": "identities", "L∞ (levels, max)": "linf_levels",
                                   "ratio": "ratio"}))
    else:
        parts.append("<p>This run has no <code>latent-shift</code> metric (add it to the suite's metrics to "
                     "compare each attack's latent shift with noise of the same budget).</p>")
    parts.append("</div>")
    return "\n".join(parts)


def provenance_section(run: RunData) -> str:
    info = run.info

    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) if isinstance(t, (int, float)) else "?"

    counts = run.df["status"].value_counts().to_dict()
    rows = [
        ("suite", f"{info.suite} ({info.suite_source or '?'})"),
        ("suite hash", info.suite_hash), ("status", info.status),
        ("started", when(info.started)), ("updated", when(info.updated)),
        ("run time", f"{info.seconds} s" if info.seconds is not None else "?"),
        ("model", info.backend.description), ("random weights", "yes" if info.backend.random_weights else "no"),
        ("backend fingerprint", info.backend.fingerprint),
        ("device", info.device), ("GPU", info.cuda_device or "—"), ("dtype", info.dtype),
        ("seeds", info.seeds), ("cells per identity", info.n_cells),
        ("identities", ", ".join(map(str, dict.fromkeys(run.df["identity"])))),
        ("records", ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))),
        ("executor", info.executor.name),
        ("stages executed / cached (last invocation)", f"{info.executed} / {info.cached}"),
        ("store", str(run.store_root)),
        ("platform", info.platform), ("python", info.python),
    ]
    parts = ['<h2 id="provenance">Provenance</h2>',
             frame_html(pd.DataFrame(rows, columns=["field", "value"]).astype(str), "table-provenance")]
    if info.packages:
        parts.append("<h3>Packages</h3>" + frame_html(
            pd.DataFrame(sorted(info.packages.items()), columns=["package", "version"]), "table-packages"))
    rows = [{"family": fam, "component": name, "version": e.get("version"), "plugin": e.get("plugin"),
             "distribution": f"{e.get('distribution') or '—'} {e.get('distribution_version') or ''}".strip()}
            for fam, entries in info.plugins.items() for name, e in entries.items()]
    if rows:
        parts.append("<h3>Components</h3>" + frame_html(pd.DataFrame(rows), "table-plugins"))
    parts.append("<h3>Suite</h3><pre>" + esc(json.dumps(info.suite_data, indent=1)) + "</pre>")
    return "\n".join(parts)


def write(run_dir: Path, out_dir: Path | None = None, store: Path | None = None, thumb_size: int = THUMB_SIZE,
          max_samples: int = MAX_SAMPLES, max_cells: int = MAX_CELLS) -> Path:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``) and
    return the path of its ``index.html``."""
    run_dir = Path(run_dir)
    run = RunData(run_dir, store=store)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbs(out_dir, thumb_size)
    info = run.info
    warn = ('<p class="warn"><b>Random-weight model: these numbers and images test the machinery, not the '
            'science.</b></p>' if info.backend.random_weights else "")
    if not run.has_run_json:
        warn += '<p class="warn">run.json is missing: no provenance.</p>'
    body = [
        f"<h1>benchbase report: suite <code>{esc(info.suite)}</code> (hash {esc(info.suite_hash)})</h1>",
        f"<p>{esc(info.backend.description)} · device {esc(info.device)} · status {esc(info.status)}"
        f" · {run.df['identity'].nunique()} identities · {len(run.cells)} cells</p>", warn,
        '<nav><a href="#tables">Leaderboard</a><a href="#plots">Plots</a>'
        '<a href="#diagnostics">Diagnostics</a><a href="#images">Images</a>'
        '<a href="#provenance">Provenance</a></nav>',
        tables_section(run), plots_section(run, out_dir), diagnostics_section(run, out_dir),
        gallery_section(run, out_dir, thumbs, max_samples, max_cells),
        provenance_section(run),
        f"<footer><p>Written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by <code>benchbase report</code>; "
        f"thumbnails {thumbs.total_bytes() / 1e6:.2f} MB.</p></footer>",
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>benchbase report: {esc(info.suite if info.suite != '?' else run_dir.name)}</title>"
            f"<style>:root {{ --thumb: {thumb_size}px; }}\n{static('style.css')}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>\n{static('sortable.js')}</script>\n</body></html>\n")
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

    root = serve_root(index, run_dir, resolve_store(run_dir, store))

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
