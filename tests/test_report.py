"""``benchbase report``: HTML/plot builders, a tiny run's report checked by structure, and the
same report rendered in headless Chromium (skipped only where Chromium or selenium is absent)."""

import os
import subprocess
import sys
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest

from benchbase import hookimpl, leaderboard, report
from benchbase.components import Metric
from benchbase.errors import WeightsUnavailableError

CHROMIUM = Path(os.environ.get("BENCHBASE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("BENCHBASE_CHROMEDRIVER", "/usr/bin/chromedriver"))


# ---------------------------------------------------------------------------------------
# HTML structure, via html.parser
# ---------------------------------------------------------------------------------------


class Page(HTMLParser):
    """Collects what the tests look at: tables (id -> header + rows of cell texts and
    attributes), images, links, and whether every opened tag was closed."""

    VOID = {"img", "meta", "br", "hr", "input", "link"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, dict] = {}
        self.images: list[dict] = []
        self.links: list[str] = []
        self.figures = 0
        self.stack: list[str] = []
        self.errors: list[str] = []
        self._table = self._row = self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = {"header": [], "rows": [], "attrs": []}
            self.tables[a.get("id", f"table{len(self.tables)}")] = self._table
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"text": "", "tag": tag, **a}
        elif tag == "img":
            self.images.append(a)
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "figure":
            self.figures += 1

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if all(c["tag"] == "th" for c in self._row):
                self._table["header"] = [c["text"] for c in self._row]
            else:
                self._table["rows"].append([c["text"] for c in self._row])
                self._table["attrs"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


# ---------------------------------------------------------------------------------------
# Unit tests of the builders
# ---------------------------------------------------------------------------------------


def test_table_html_numbers_sort_as_numbers_and_statuses_keep_their_reason():
    from benchbase.leaderboard import Column, Table

    attack, ism, n = Column("attack"), Column("ism ↓"), Column("n identities")
    attack.add("<b>x</b>"), attack.add("noise")
    ism.add("0.412 ± 0.020", value=0.412), ism.add("unavailable", status="unavailable",
                                                   note="unavailable: dlib — install it")
    n.add(3, value=3), n.add(3, value=3)
    page = Page(report.table_html(Table("t", "", [attack, ism, n]), "t"))
    assert not page.errors
    table = page.tables["t"]
    assert table["header"] == ["attack", "ism ↓", "n identities"]
    assert table["rows"][0] == ["<b>x</b>", "0.412 ± 0.020", "3"]  # escaped, shown as text
    first, second = table["attrs"]
    assert float(first[1]["data-v"]) == pytest.approx(0.412) and "num" in first[1]["class"]
    assert "data-v" not in second[1] and "unavailable" in second[1]["class"]
    assert second[1]["title"] == "unavailable: dlib — install it"


def test_rendered_views_come_from_numbers_not_from_display_strings():
    """The views are numeric; text appears only when rendering, and every number a table shows
    is the view's own number (nothing is parsed back from a string)."""
    rows = []
    for identity, offset in (("a", 0.0), ("b", 0.1)):
        for attack, value in (("none", 0.5), ("noise", 0.3)):
            rows.append({"identity": identity, "seed": 0, "attack": attack, "purifier": "none", "defense": "none",
                         "personalizer": "db", "metric": "ism", "direction": "lower", "status": "ok",
                         "value": value + offset, "error": None})
    table, directions = leaderboard.cell_table(pd.DataFrame(rows))
    assert table["ism|mean"].tolist() == pytest.approx([0.55, 0.35])
    views = {"cells": table, "attacks": leaderboard.attacks_view(table, directions),
             "purifiers": leaderboard.purifiers_view(table, directions), "_directions": pd.DataFrame([directions])}
    assert all(pd.api.types.is_float_dtype(views["attacks"][c]) for c in ("ism|base|mean", "ism|worst|mean"))
    tables = leaderboard.render(views)
    col = tables["cells"].column("ism ↓")
    assert col.values == pytest.approx([0.55, 0.35]) and col.text[0].startswith("0.550 ± ")
    worst = tables["purifiers"].column("ism ↓ worst")
    assert worst.text == ["0.350"] and worst.values == pytest.approx([0.35])


def test_per_image_scores_follow_the_image_set_each_metric_scored():
    records = [
        {"metric": "psnr", "status": "ok", "details": {"of": "protected", "per_image": [30.0, 31.0]}},
        {"metric": "psnr-pur", "status": "ok", "details": {"of": "purified", "per_image": [40.0, 41.0]}},
        {"metric": "ref-rmse", "status": "ok", "details": {"per_image": {"a photo": [1.0, 2.0]}}},
        {"metric": "ism", "status": "unavailable", "details": None},
    ]
    from benchbase.records import Record

    base = {"suite": "s", "suite_hash": "h", "identity": "a", "seed": 0, "attack": "none", "purifier": "none",
            "defense": "none", "personalizer": "db", "attack_name": "none", "adaptive": False,
            "metric_name": "m", "direction": "higher"}
    scores = report.per_image_scores([Record.from_json({**base, **r}) for r in records])
    assert scores["protected"] == {"psnr": [30.0, 31.0]}
    assert scores["purified"] == {"psnr-pur": [40.0, 41.0]}
    assert scores["generated"]["a photo"] == {"ref-rmse": [1.0, 2.0]}
    assert report.score_text(scores["protected"], 1, {"L∞": 8}) == "L∞ 8 · psnr 31"


def test_heat_map_scales_the_perturbation_to_the_budget(tmp_path):
    from matplotlib import colormaps

    clean = np.full((16, 16, 3), 100, np.uint8)
    protected = clean.copy()
    protected[:8] += 8  # the top half at the full budget, the bottom half untouched
    thumbs = report.Thumbs(tmp_path, size=32)
    path = tmp_path / thumbs.heat(protected, clean, 8.0, "t")
    heat = np.asarray(__import__("PIL.Image").Image.open(path).convert("RGB")).astype(int)
    assert heat.shape == (32, 32, 3)  # enlarged with nearest neighbours to the thumbnail size
    top = (np.array(colormaps["magma"](1.0)[:3]) * 255).round()
    bottom = (np.array(colormaps["magma"](0.0)[:3]) * 255).round()
    assert np.abs(heat[:16] - top).max() <= 1 and np.abs(heat[16:] - bottom).max() <= 1
    big = np.zeros((300, 200, 3), np.uint8)
    thumb = tmp_path / thumbs.image(big, "big")
    assert thumb.suffix == ".jpg" and max(__import__("PIL.Image").Image.open(thumb).size) == 32


def test_image_psnr_and_linf_match_the_definitions():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 51
    mse = 51.0**2 / (4 * 4 * 3) / 255**2
    assert report.image_psnr(a, b) == pytest.approx(10 * np.log10(1 / mse))
    assert report.image_psnr(a, a) == 100.0 and report.linf_levels(a, b) == 51


def test_href_is_relative_and_url_quoted(tmp_path):
    target = tmp_path / "run dir" / "store" / "protect" / "a#b.png"
    assert report.href(target, tmp_path / "run dir" / "report") == "../store/protect/a%23b.png"


def _svg_text(path: Path) -> str:
    root = ElementTree.parse(path).getroot()  # well-formed XML, or this raises
    assert root.tag.endswith("svg")
    return " ".join(t for t in root.itertext())


def _records(rows):
    from benchbase.records import Record

    base = {"suite": "s", "suite_hash": "h", "defense": "none", "personalizer": "db", "seed": 0,
            "adaptive": False, "attack_name": "x"}
    return [Record.from_json({**base, **r}) for r in rows]


def test_plots_are_svgs_naming_what_they_show(tmp_path):
    from benchbase.report import plots
    from benchbase_plugins.metrics.clip import CLIPAlignment
    from benchbase_plugins.purifiers.realign import Realign

    rows = []
    for attack, purifier, base in [("none", "none", 0.30), ("noise", "none", 0.20), ("noise", "jpeg", 0.26)]:
        for identity in ("a", "b"):
            rows.append({"metric": "psnr", "metric_name": "psnr", "direction": "higher", "status": "ok",
                         "value": 30 + base, "attack": attack, "purifier": purifier, "identity": identity,
                         "key": f"psnr-{attack}-{purifier}-{identity}"})
            of = "protected" if purifier == "none" else "purified"
            rows.append({"metric": f"clip-{of}", "metric_name": "clip-align", "direction": "lower", "status": "ok",
                         "value": base, "attack": attack, "purifier": purifier, "identity": identity,
                         "details": {"of": of, "per_image": [base, base + 0.01]},
                         "key": f"clip-{attack}-{purifier}-{identity}"})
            # the clean score is shared by every cell of an identity: one key per identity
            rows.append({"metric": "clip-clean", "metric_name": "clip-align", "direction": "lower", "status": "ok",
                         "value": 0.31, "attack": attack, "purifier": purifier, "identity": identity,
                         "details": {"of": "clean", "per_image": [0.31, 0.32]}, "key": f"clean-{identity}"})
    records = _records(rows)
    (spec,) = CLIPAlignment.report_figures
    groups = plots.box_values(records, ["clip-protected", "clip-purified", "clip-clean"], spec)
    assert list(groups) == ["clean", "protected: noise", "protected: none", "purified: noise | jpeg"]
    assert sorted(groups["clean"]) == [0.31, 0.31, 0.32, 0.32]  # counted once per identity
    assert groups["purified: noise | jpeg"] == [0.26, 0.27, 0.26, 0.27]
    clip = plots.plot_boxes(groups, spec, tmp_path / "clip.svg")
    assert "clean" in _svg_text(clip) and "purified: noise | jpeg" in _svg_text(clip)
    assert plots.box_values(records, ["psnr"], spec) == {}  # not one of the figure's image sets
    df = pd.DataFrame([r.to_json() for r in records])
    dists = plots.plot_distributions(df, tmp_path)
    assert [name for name, _ in dists] == ["psnr ↑", "clip-protected ↓", "clip-clean ↓", "clip-purified ↓"]
    assert "noise | jpeg" in _svg_text(dists[0][1])
    (scatter,) = Realign.report_figures
    points = [{"attack": "noise", "purifier": "realign", "identity": "a", "x": [0.1, 0.2], "y": [0.25, 0.3],
               "hline": 0.24}]
    assert "alignment after realign" in _svg_text(plots.plot_scatter(points, scatter, tmp_path / "r.svg"))
    costs = pd.DataFrame([{"stage": "protect", "key": "k1", "seconds": 2.0, "inclusive_seconds": 2.0,
                           "peak_rss_mb": 300.0, "peak_cuda_memory_mb": 900.0},
                          {"stage": "generate", "key": "k2", "seconds": 5.0, "inclusive_seconds": 6.0,
                           "peak_rss_mb": 400.0, "peak_cuda_memory_mb": None}])
    assert "peak CUDA memory (MB)" in _svg_text(plots.plot_costs(costs, tmp_path))
    assert plots.cost_summary(costs)["peak CUDA MB (max)"].tolist()[0] == 900.0


def test_stage_cost_is_own_time_and_nested_stages_are_subtracted(tmp_path):
    """A stage that computes a shared stage inside it (class images inside fine-tuning)
    records its own time, and the time with the nested stage as ``inclusive_seconds``."""
    import time

    from benchbase.store import Store

    store = Store(tmp_path)

    def inner(folder):
        time.sleep(0.3)
        (folder / "x.txt").write_text("x")

    def outer(folder):
        time.sleep(0.2)
        store.shared_stage("class_images", {"n": 1}, inner)
        (folder / "y.txt").write_text("yy")
        return {"ok": True}

    path = store.compute("personalize", "k" * 24, {"p": 1}, outer)
    meta = store.meta("personalize", "k" * 24)
    (inner_meta,) = store.metas()["class_images"].values()
    assert meta.seconds >= 0.2 and inner_meta.seconds >= 0.3
    assert meta.inclusive_seconds == pytest.approx(meta.seconds + inner_meta.inclusive_seconds, abs=0.002)
    assert meta.files == {"y.txt": 2} and not meta.missing_files(path)
    assert meta.peak_rss_mb > 0 and meta.peak_cuda_memory_mb is None  # no CUDA here


def test_help_imports_neither_torch_nor_matplotlib():
    code = ("import sys; from click.testing import CliRunner; from benchbase.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert 'report' in r.output, r.output; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'benchbase.report') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------
# A tiny run and its report
# ---------------------------------------------------------------------------------------


class NeedsWeights(Metric):
    # reads "purified" so each cell has its own score key: the runner re-raises a cached
    # failure of a shared key without its cause, which turns "unavailable" into "failed"
    reads = ("purified", "clean")

    def score(self, inputs, ctx):
        raise WeightsUnavailableError("unavailable: imaginary-net — put its weights in ~/imaginary")


class ReportTestPlugin:
    @hookimpl
    def register_metrics(self, register):
        register("needs-weights", NeedsWeights)


def _manager():
    from benchbase.plugins import PluginManager

    pm = PluginManager()
    pm.register(ReportTestPlugin(), name="report-test-plugin")
    return pm


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One identity, 2 attacks x 2 purifiers, DreamBooth for one step, 2 samples per prompt."""
    from benchbase.pipeline import Runner
    from benchbase.suite import parse_suite

    suite = parse_suite({
        "name": "report-tiny", "backend": {"name": "tiny"},
        "dataset": {"name": "sample", "identities": ["astronaut"]},
        "attacks": ["none", {"name": "noise", "eps": 8}], "purifiers": ["none", "jpeg"],
        "personalizers": [{"name": "dreambooth", "max_train_steps": 1, "num_class_images": 1,
                           "class_inference_steps": 1, "num_images_per_prompt": 2, "num_inference_steps": 1}],
        "metrics": ["psnr", "ref-rmse", {"name": "clip-align", "label": "clip-clean", "of": "clean", "model": "tiny"},
                    {"name": "clip-align", "label": "clip-protected", "of": "protected", "model": "tiny"},
                    {"name": "clip-align", "label": "clip-purified", "of": "purified", "model": "tiny"},
                    "needs-weights"],
        "contrasts": [{"label": "noise lowers PSNR", "metric": "psnr", "a": {"attack": "none"},
                       "b": {"attack": "noise"}}],
    })
    run_dir = tmp_path_factory.mktemp("report-run")
    summary = Runner(suite, run_dir, manager=_manager(), progress=False).run()
    assert not summary.failed, summary.failed[:2]
    index = report.write(run_dir)
    return run_dir, index


def _local(url: str, base: Path) -> Path:
    return (base / unquote(url)).resolve()


def test_report_tables_are_the_leaderboard_numbers(tiny_run):
    run_dir, index = tiny_run
    page = Page(index.read_text())
    assert not page.errors and not page.stack, page.errors[:3]
    tables = leaderboard.render(leaderboard.build(run_dir))
    assert list(tables) == ["contrasts", "cells", "attacks", "purifiers"]  # the suite's contrasts too
    for name, rendered in tables.items():
        table = page.tables[f"table-{name}"]
        frame = rendered.frame()
        assert table["header"] == list(frame.columns)
        assert table["rows"] == [["" if v != v else str(v) for v in r] for r in frame.itertuples(index=False)]
        for j, col in enumerate(rendered.columns):  # each shown number is the view's number
            shown = [float(a[j]["data-v"]) if "data-v" in a[j] else None for a in table["attrs"]]
            assert shown == col.values
    contrast = page.tables["table-contrasts"]
    assert contrast["rows"][0][0] == "noise lowers PSNR" and "a − b" in contrast["header"]
    cells = page.tables["table-cells"]
    col = cells["header"].index("needs-weights ↑")
    assert {r[col] for r in cells["rows"]} == {"unavailable"}
    assert all("imaginary-net" in a[col]["title"] for a in cells["attrs"])
    psnr = cells["header"].index("psnr ↑")
    assert all("data-v" in a[psnr] for a in cells["attrs"])
    assert "n identities" in cells["header"] and any("worst" in h for h in page.tables["table-attacks"]["header"])
    assert "imaginary-net" in index.read_text()  # the unavailable-metrics list
    prov = dict(page.tables["table-provenance"]["rows"])
    assert prov["suite"].startswith("report-tiny") and prov["device"] == "cpu" and prov["seeds"] == "[0]"
    assert "torch" in dict(page.tables["table-packages"]["rows"])


def test_report_grid_plots_and_links(tiny_run):
    run_dir, index = tiny_run
    out = index.parent
    page = Page(index.read_text())
    srcs = [i["src"] for i in page.images]
    thumbs = [s for s in srcs if s.startswith("thumbs/")]
    plots = [s for s in srcs if s.startswith("plots/")]
    # clean 4 + protected 2x4 (+ heat) + purified 4 cells x 4 (+ heat) + generated 4 cells x 2 prompts x 2
    titles = [i["title"] for i in page.images if i["src"].startswith("thumbs/")]
    assert sum(t.startswith("clean ") for t in titles) == 4
    assert sum(t.startswith("protected ") for t in titles) == 8
    assert sum(t.startswith("purified ") for t in titles) == 8  # the 'none' purifier would repeat 'protected'
    assert sum(" — " in t and t.startswith("a ") for t in titles) == 4 * 2 * 2
    noisy = [t for t in titles if t.startswith("protected ") and "L∞ 8" in t]
    assert len(noisy) == 4 and all("PSNR" in t and "psnr" in t for t in noisy)  # computed + recorded
    assert len(thumbs) >= 40 and len(plots) >= 4
    assert any("clip-align" in p for p in plots) and any("cost" in p for p in plots)
    for p in plots:
        _svg_text(out / p)
    # every image and link resolves to a file (thumbnails inside, originals in the store)
    for url in srcs + [h for h in page.links if not h.startswith(("#", "http"))]:
        assert _local(url, out).exists(), url
    originals = [h for h in page.links if h.startswith("../store/")]
    assert originals and all(_local(h, out).is_relative_to(run_dir.resolve()) for h in originals)
    assert not list(out.rglob("*.png")) or all(p.parent.name == "thumbs" for p in out.rglob("*.png"))
    size = sum(p.stat().st_size for p in (out / "thumbs").iterdir())
    assert size < 3e6, f"thumbnails weigh {size / 1e6:.1f} MB for one identity"


def test_cells_take_their_stage_folders_from_the_records(tiny_run):
    """Each cell's folders are the keys its records name; the clean images are the clean stage,
    equal to the dataset's set_B (the report never loads the dataset itself)."""
    from benchbase.images import to_uint8
    from benchbase.pipeline import image_names
    from benchbase.testing import sample_identity

    run_dir, _ = tiny_run
    run = report.RunData(run_dir)
    assert len(run.cells) == 4
    for cell in run.cells:
        assert all(cell.keys.values()), cell.keys
        assert cell.keys == {**cell.records[0].stages}
        assert all(run.path(stage, key) is not None for stage, key in cell.keys.items())
    arrays, stems = run.clean(run.cells[0])
    identity = sample_identity("astronaut", resolution=64)
    assert stems == image_names(identity)
    expected = to_uint8(identity.set_B)
    assert all(np.array_equal(a, e) for a, e in zip(arrays, expected))


def test_cli_report_and_local_server(tiny_run, tmp_path):
    from click.testing import CliRunner

    from benchbase.cli import main

    run_dir, _ = tiny_run
    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(out), "--thumb-size", "64"])
    assert result.exit_code == 0, result.output
    index = out / "index.html"
    assert index.is_file() and "--thumb: 64px" in index.read_text()
    server, url = report.make_server(index, run_dir, port=0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        original = next(h for h in Page(page).links if "/store/" in h)
        base = url.rsplit("/", 1)[0] + "/"
        assert urllib.request.urlopen(base + original, timeout=10).status == 200
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------
# Headless Chromium
# ---------------------------------------------------------------------------------------


def _browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium is not installed ({CHROMIUM} missing; CI installs Debian's `chromium` "
                    "and `chromium-driver` packages)")
    if not CHROMEDRIVER.is_file():
        pytest.skip(f"chromedriver is not installed ({CHROMEDRIVER} missing; Debian package `chromium-driver`)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'selenium>=4.10')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--allow-file-access-from-files"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    service = Service(executable_path=str(CHROMEDRIVER))
    return webdriver.Chrome(options=options, service=service)


LOAD_ALL = """
const done = arguments[arguments.length - 1];
const urls = Array.from(new Set(arguments[0]));
Promise.all(urls.map(u => new Promise(resolve => {
  const img = new Image();
  img.onload = () => resolve([u, img.naturalWidth]);
  img.onerror = () => resolve([u, 0]);
  img.src = u;
}))).then(done);
"""


def test_report_renders_in_headless_chromium(tiny_run):
    _, index = tiny_run
    driver = _browser()
    try:
        driver.set_script_timeout(60)
        driver.get(index.resolve().as_uri())
        assert "benchbase report" in driver.title
        # tables: present, filled, and sortable by clicking a header
        for name in ("cells", "attacks", "purifiers"):
            rows = driver.find_elements("css selector", f"#table-{name} tbody tr")
            assert rows, name
        col = [th.text for th in driver.find_elements("css selector", "#table-cells th")].index("psnr ↑")
        header = driver.find_elements("css selector", "#table-cells th")[col]
        values = lambda: [float(td.get_attribute("data-v")) for td in driver.find_elements(
            "css selector", f"#table-cells tbody tr td:nth-child({col + 1})")]
        header.click()
        assert values() == sorted(values())
        header.click()
        assert values() == sorted(values(), reverse=True)
        # every <img> (thumbnails, heat maps, plots) decoded: none broken
        # thumbnails are lazy (a full suite has thousands): load them all, then wait for each
        images = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const all = Array.from(document.images); all.forEach(i => { i.loading = 'eager'; });"
            "Promise.all(all.map(i => i.decode().catch(() => null))).then(() => done("
            "all.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])));")
        assert len(images) >= 44
        broken = [src for src, complete, width in images if not (complete and width > 0)]
        assert not broken, broken[:5]
        assert any(src.startswith("plots/") for src, _, _ in images)
        grid = driver.find_elements("css selector", "details.identity .grid figure img")
        assert len(grid) >= 40
        # every link to an original image loads in the browser too
        links = driver.execute_script(
            "return Array.from(document.querySelectorAll('a[href$=\".png\"]')).map(a => a.href);")
        loaded = driver.execute_async_script(LOAD_ALL, links)
        assert links and all(width > 0 for _, width in loaded), [u for u, w in loaded if not w][:5]
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------
# Diagnostics: attack objectives, victims' instance loss, latent shift vs noise
# ---------------------------------------------------------------------------------------


def _ids_in(svg: Path, prefix: str) -> list[str]:
    root = ElementTree.parse(svg).getroot()
    return [e.get("id") for e in root.iter() if (e.get("id") or "").startswith(prefix)]


def test_diagnostics_tables_count_a_shared_stage_once_and_pair_per_identity(tmp_path):
    """A protect stage shared by two purifiers' cells is one trajectory; the objective's change
    and the latent shift's excess over noise are paired per identity; the figures draw one line
    per identity plus the mean."""
    from benchbase import diagnostics
    from benchbase.report import plots

    rows, infos = [], {}
    for identity, (first, last, final, shift, noise) in {"a": (1.0, 1.2, 0.30, 0.50, 0.10),
                                                         "b": (2.0, 2.1, 0.40, 0.40, 0.20)}.items():
        infos["protect", f"p-{identity}"] = {"objective": "L (maximised)", "objective_points": "one per PGD step",
                                             "objective_trajectory": [first, (first + last) / 2, last]}
        for purifier in ("none", "jpeg"):
            infos["personalize", f"ft-{identity}-{purifier}"] = {
                "final_instance_loss": final + (purifier == "jpeg"), "instance_loss_trajectory": [0.5, final],
                "instance_loss_every": 10}
            stages = {"protect": f"p-{identity}", "personalize": f"ft-{identity}-{purifier}"}
            rows.append({"metric": "latent-shift", "metric_name": "latent-shift", "direction": "higher",
                         "status": "ok", "value": shift, "attack": "aspl", "purifier": purifier,
                         "identity": identity, "key": f"ls-{identity}", "stages": stages,
                         "details": {"of": "protected", "noise_shift": noise, "linf_levels": 6.0}})
    df = pd.DataFrame([r.to_json() for r in _records(rows)])
    diag = diagnostics.collect(df, lambda stage, key: infos.get((stage, key)))
    assert len(diag.objectives) == 2 and len(diag.latent_shifts) == 2  # not once per purifier
    assert len(diag.instance_losses) == 4
    (obj,) = diagnostics.objective_summary(diag.objectives).to_dict("records")
    assert obj["identities"] == 2 and obj["change_mean"] == pytest.approx(0.15)
    assert obj["change_ci95"] == pytest.approx(leaderboard.t95(2) * np.std([0.2, 0.1], ddof=1) / np.sqrt(2))
    loss = diagnostics.instance_loss_summary(diag.instance_losses)
    assert loss["final_mean"].tolist() == pytest.approx([0.35, 1.35])
    (ls,) = diagnostics.latent_shift_summary(diag.latent_shifts).to_dict("records")
    assert ls["diff_mean"] == pytest.approx(0.3) and ls["ratio"] == pytest.approx(0.45 / 0.15)
    objective = plots.plot_objectives(diag.objectives, tmp_path / "o.svg")
    assert len(_ids_in(objective, "objective-0-line-")) == 2 and _ids_in(objective, "objective-0-mean")
    assert "L (maximised)" in _svg_text(objective)
    losses = plots.plot_instance_losses(diag.instance_losses, tmp_path / "i.svg")
    assert [len(_ids_in(losses, f"instance-loss-{i}-line-")) for i in range(3)] == [2, 2, 0]
    assert len(_ids_in(plots.plot_latent_shifts(diag.latent_shifts, tmp_path / "l.svg"), "latent-shift-0-pair-")) == 2
    # nothing recorded: no figure, no section in the leaderboard
    none = diagnostics.collect(df.assign(metric_name="psnr"), lambda stage, key: None)
    assert none.empty and diagnostics.markdown(none) == ""
    assert plots.plot_objectives(none.objectives, tmp_path / "x.svg") is None


@pytest.fixture(scope="module")
def diag_run(tmp_path_factory):
    """Two identities, noise and ASPL (2 outer iterations), DreamBooth for 11 steps (two values of
    its instance-loss trajectory), the latent-shift metric."""
    from benchbase.pipeline import Runner
    from benchbase.suite import parse_suite

    suite = parse_suite({
        "name": "report-diagnostics", "backend": {"name": "tiny"},
        "dataset": {"name": "sample", "identities": ["astronaut", "hopper"]},
        "attacks": [{"name": "noise", "eps": 6}, {"name": "aspl", "max_train_steps": 2, "max_f_train_steps": 1,
                                                  "max_adv_train_steps": 2, "num_class_images": 1,
                                                  "class_inference_steps": 1}],
        "purifiers": ["none"],
        "personalizers": [{"name": "dreambooth", "max_train_steps": 11, "num_class_images": 1,
                           "class_inference_steps": 1, "num_images_per_prompt": 1, "num_inference_steps": 1}],
        "metrics": ["latent-shift", "ref-rmse"],
    })
    run_dir = tmp_path_factory.mktemp("diag-run")
    summary = Runner(suite, run_dir, progress=False).run()
    assert not summary.failed, summary.failed[:2]
    return run_dir, report.write(run_dir)


def test_report_diagnostics_of_a_run_with_an_attack_a_victim_and_latent_shift(diag_run):
    run_dir, index = diag_run
    out = index.parent
    text = index.read_text()
    page = Page(text)
    assert not page.errors and not page.stack, page.errors[:3]
    assert 'href="#diagnostics"' in text and 'id="diagnostics"' in text
    srcs = [i["src"] for i in page.images]
    assert {"plots/diag-objective.svg", "plots/diag-instance-loss.svg", "plots/diag-latent-shift.svg"} <= set(srcs)
    # the objective: ASPL only (noise optimises nothing), one line per identity + the mean, 2 values each
    objective = out / "plots" / "diag-objective.svg"
    assert len(_ids_in(objective, "objective-0-line-")) == 2 and not _ids_in(objective, "objective-1-")
    assert "surrogate denoising loss" in _svg_text(objective) and "maximised" in _svg_text(objective)
    run = report.RunData(run_dir)
    diag = run.diagnostics()
    assert set(diag.objectives["attack"]) == {"aspl"} and diag.objectives["trajectory"].map(len).tolist() == [2, 2]
    # the victim: one panel per configuration (noise, aspl), a line per identity, 11 steps = 2 values
    losses = out / "plots" / "diag-instance-loss.svg"
    assert [len(_ids_in(losses, f"instance-loss-{i}-line-")) for i in range(2)] == [2, 2]
    assert diag.instance_losses["trajectory"].map(len).tolist() == [2, 2, 2, 2]
    table = page.tables["table-diag-instance-loss"]
    assert [r[0] for r in table["rows"]] == ["noise", "aspl"] and {r[4] for r in table["rows"]} == {"2"}
    finals = [float(a[5]["data-v"]) for a in table["attrs"]]
    assert finals == pytest.approx(diag.instance_losses.groupby("attack", sort=False)["final"].mean().tolist())
    # the latent shift: a pair of dots per identity and attack, and the table's paired difference
    shift = out / "plots" / "diag-latent-shift.svg"
    assert [len(_ids_in(shift, f"latent-shift-{i}-pair-")) for i in range(2)] == [2, 2]
    rows = {r[1]: r for r in page.tables["table-diag-latent-shift"]["rows"]}
    assert set(rows) == {"noise", "aspl"}
    assert [r[0] for r in page.tables["table-diag-objective"]["rows"]] == ["aspl"]
    # the leaderboard prints the summaries as its own section
    _, md = leaderboard.write(run_dir, out.parent / "lb")
    diag_md = md.split("## Diagnostics", 1)[1]
    assert "| aspl" in diag_md.split("### Victim")[0] and "surrogate denoising loss" in diag_md
    assert diag_md.count("| dreambooth") == 2


def test_a_report_without_diagnostics_says_so(tiny_run, tmp_path):
    """A run whose store is not at hand (or that recorded no objective, no instance loss and no
    latent shift) still renders, each diagnostic replaced by one sentence."""
    run_dir, _ = tiny_run
    empty = tmp_path / "empty-store"
    empty.mkdir()
    index = report.write(run_dir, out_dir=tmp_path / "report", store=empty)
    text = index.read_text()
    page = Page(text)
    assert not page.errors and not page.stack, page.errors[:3]
    assert "recorded an objective trajectory" in text and "recorded the victim's instance loss" in text
    assert "has no <code>latent-shift</code> metric" in text
    assert not [i for i in page.images if "diag-" in i["src"]]
    _, md = leaderboard.write(run_dir, tmp_path / "lb")
    assert "## Diagnostics" in md  # the run's own store: its DreamBooth recorded the instance loss


def test_tiny_run_report_draws_the_victims_instance_loss(tiny_run):
    """The noise/none attacks record no objective; the one-step DreamBooth victims record their
    loss: one panel per configuration (2 attacks x 2 purifiers), one identity each."""
    run_dir, index = tiny_run
    page = Page(index.read_text())
    assert "plots/diag-instance-loss.svg" in [i["src"] for i in page.images]
    assert "plots/diag-objective.svg" not in [i["src"] for i in page.images]
    losses = index.parent / "plots" / "diag-instance-loss.svg"
    assert [len(_ids_in(losses, f"instance-loss-{i}-line-")) for i in range(5)] == [1, 1, 1, 1, 0]
    assert len(page.tables["table-diag-instance-loss"]["rows"]) == 4
