"""``benchbase report``: HTML/plot builders, a tiny run's report checked by structure, and the
same report rendered in headless Chromium (skipped only where Chromium or selenium is absent)."""

import json
import os
import shutil
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
    df = pd.DataFrame({"attack": ["<b>x</b>", "noise"], "ism ↓": ["0.412 ± 0.020", "unavailable"],
                       "n identities": [3, 3]})
    page = Page(report.table_html(df, "t", notes={(1, "ism ↓"): "unavailable: dlib — install it"}))
    assert not page.errors
    table = page.tables["t"]
    assert table["header"] == ["attack", "ism ↓", "n identities"]
    assert table["rows"][0] == ["<b>x</b>", "0.412 ± 0.020", "3"]  # escaped, shown as text
    first, second = table["attrs"]
    assert float(first[1]["data-v"]) == pytest.approx(0.412) and "num" in first[1]["class"]
    assert "data-v" not in second[1] and "unavailable" in second[1]["class"]
    assert second[1]["title"] == "unavailable: dlib — install it"


def test_per_image_scores_follow_the_image_set_each_metric_scored():
    records = [
        {"metric": "psnr", "status": "ok", "details": {"of": "protected", "per_image": [30.0, 31.0]}},
        {"metric": "psnr-pur", "status": "ok", "details": {"of": "purified", "per_image": [40.0, 41.0]}},
        {"metric": "ref-rmse", "status": "ok", "details": {"per_image": {"a photo": [1.0, 2.0]}}},
        {"metric": "ism", "status": "unavailable", "details": None},
    ]
    scores = report.per_image_scores(records)
    assert scores["protected"] == {"psnr": [30.0, 31.0]}
    assert scores["purified"] == {"psnr-pur": [40.0, 41.0]}
    assert scores["generated"]["a photo"] == {"ref-rmse": [1.0, 2.0]}
    assert report._score_text(scores["protected"], 1, {"L∞": 8}) == "L∞ 8 · psnr 31"


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


def test_plots_are_svgs_naming_what_they_show(tmp_path):
    rows = []
    for attack, purifier, base in [("none", "none", 0.30), ("noise", "none", 0.20), ("noise", "jpeg", 0.26)]:
        for identity in ("a", "b"):
            rows.append({"metric": "psnr", "metric_name": "psnr", "direction": "higher", "status": "ok",
                         "value": 30 + base, "attack": attack, "purifier": purifier, "defense": "none",
                         "personalizer": "db", "identity": identity, "seed": 0, "details": {}})
            of = "protected" if purifier == "none" else "purified"
            rows.append({"metric": f"clip-{of}", "metric_name": "clip-align", "direction": "lower", "status": "ok",
                         "value": base, "attack": attack, "purifier": purifier, "defense": "none",
                         "personalizer": "db", "identity": identity, "seed": 0,
                         "details": {"of": of, "per_image": [base, base + 0.01]}})
            rows.append({"metric": "clip-clean", "metric_name": "clip-align", "direction": "lower", "status": "ok",
                         "value": 0.31, "attack": attack, "purifier": purifier, "defense": "none",
                         "personalizer": "db", "identity": identity, "seed": 0,
                         "details": {"of": "clean", "per_image": [0.31, 0.32]}})
    df = pd.DataFrame(rows)
    groups = report.clip_alignment_values(df)
    # the clean score is shared by every cell of an identity: counted once per identity
    assert list(groups) == ["clean", "protected: noise", "protected: none", "purified: noise | jpeg"]
    assert sorted(groups["clean"]) == [0.31, 0.31, 0.32, 0.32]
    assert groups["purified: noise | jpeg"] == [0.26, 0.27, 0.26, 0.27]
    clip = report.plot_clip_alignment(df, tmp_path)
    assert "clean" in _svg_text(clip) and "purified: noise | jpeg" in _svg_text(clip)
    dists = report.plot_distributions(df, tmp_path)
    assert [name for name, _ in dists] == ["psnr ↑", "clip-protected ↓", "clip-clean ↓", "clip-purified ↓"]
    assert "noise | jpeg" in _svg_text(dists[0][1])
    realign = report.plot_realign([{"attack": "noise", "purifier": "realign", "identity": "a",
                                    "before": [0.1, 0.2], "after": [0.25, 0.3], "clean_range": [0.24, 0.33]}],
                                  tmp_path)
    assert "alignment after realign" in _svg_text(realign)
    costs = pd.DataFrame([{"stage": "protect", "key": "k1", "seconds": 2.0, "peak_memory_mb": 900.0},
                          {"stage": "generate", "key": "k2", "seconds": 5.0, "peak_memory_mb": None}])
    assert "peak memory (MB)" in _svg_text(report.plot_costs(costs, tmp_path))
    assert report.plot_clip_alignment(df[df["metric_name"] != "clip-align"], tmp_path) is None


def test_own_seconds_subtract_the_upstream_stages_computed_inside():
    # score (0-10 s) computed generate (1-9 s) which computed personalize (2-7 s); protect ran alone
    metas = [{"stage": "score", "key": "s", "seconds": 10.0, "finished": 110.0},
             {"stage": "generate", "key": "g", "seconds": 8.0, "finished": 109.0},
             {"stage": "personalize", "key": "p", "seconds": 5.0, "finished": 107.0},
             {"stage": "protect", "key": "a", "seconds": 3.0, "finished": 50.0}]
    own = report.own_seconds(metas)
    assert own == pytest.approx({("score", "s"): 2.0, ("generate", "g"): 3.0, ("personalize", "p"): 5.0,
                                 ("protect", "a"): 3.0})


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
    })
    run_dir = tmp_path_factory.mktemp("report-run")
    summary = Runner(suite, run_dir, manager=_manager(), progress=False).run()
    assert not summary.failed, summary.failed[:2]
    index = report.write(run_dir, manager=_manager())
    return run_dir, index


def _local(url: str, base: Path) -> Path:
    return (base / unquote(url)).resolve()


def test_report_tables_are_the_leaderboard_numbers(tiny_run):
    run_dir, index = tiny_run
    page = Page(index.read_text())
    assert not page.errors and not page.stack, page.errors[:3]
    views = leaderboard.build(run_dir)
    for name in ("cells", "attacks", "purifiers"):
        table = page.tables[f"table-{name}"]
        view = views[name]
        assert table["header"] == list(view.columns)
        assert table["rows"] == [[str(v) for v in r] for r in view.itertuples(index=False)]
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
    assert any("clip-alignment" in p for p in plots) and any("cost" in p for p in plots)
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


def test_stage_folders_are_found_without_score_keys(tiny_run, tmp_path):
    """A run whose records carry no keys (e.g. an older runner): the parts still lead to
    every stage folder of every cell."""
    run_dir, _ = tiny_run
    with_keys = report.RunData(run_dir, manager=_manager())
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "run.json", copy / "run.json")
    (copy / "store").symlink_to(run_dir / "store")
    lines = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    (copy / "results.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "key"}) + "\n"
                                                for r in lines))
    without = report.RunData(copy, manager=_manager())
    expected = {c.label: c.keys for c in with_keys.cells}
    assert all(all(k) for k in expected.values())
    assert {c.label: c.keys for c in without.cells} == expected


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
