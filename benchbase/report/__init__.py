"""``benchbase report RUN_DIR``: a static HTML report of a run (tables, image grids, plots).

The report is one folder (``RUN_DIR/report`` by default) that opens from disk with no
server and no network: ``index.html`` with inline CSS and a few lines of inline
JavaScript (sortable tables), ``thumbs/`` with small JPEG thumbnails and PNG heat maps,
``plots/`` with matplotlib SVGs. Full-size images are *linked* (relative paths into the
run's store), never copied, so a report of a full suite stays a few MB per identity.

Everything comes from what the run wrote, read through ``benchbase.records``:

- ``tables``: the rendered views of :mod:`benchbase.leaderboard` — the very numbers
  ``benchbase leaderboard`` prints, contrasts included;
- ``plots``: metric distributions, the figures the run's components declared
  (``Component.report_figures``, recorded in run.json) and each stage's cost (own seconds,
  peak memory) from its ``_done.json``;
- ``page``'s Diagnostics section: the attacks' objective trajectories, the victims' instance
  loss and the latent shift against noise of the same budget (``benchbase.diagnostics``, drawn
  by ``plots``);
- ``gallery``: each cell's stage folders, named by its records' ``stages`` keys (the clean
  images are the ``clean`` stage);
- ``page``: the page, provenance, and a local server.
"""

from benchbase.report.data import CellView, RunData, per_image_scores, score_text
from benchbase.report.gallery import Thumbs, image_psnr, linf_levels
from benchbase.report.html import esc, href
from benchbase.report.page import make_server, serve, serve_root, write
from benchbase.report.tables import frame_html, table_html

__all__ = ["CellView", "RunData", "Thumbs", "esc", "frame_html", "href", "image_psnr", "linf_levels",
           "make_server", "per_image_scores", "score_text", "serve", "serve_root", "table_html", "write"]
