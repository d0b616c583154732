"""Loading only data, never code; names from data never escape the run folder and never break
the markdown tables or the HTML report."""

import ast
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from benchbase import leaderboard
from benchbase.pipeline import Runner
from benchbase.stages import image_names, safe_stem
from benchbase.suite import parse_suite

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "benchbase").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def _unsafe_loads(path: Path) -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle and
    its relatives, numpy with allow_pickle, TorchScript archives, remote code from the hub."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal")
                   for n in names):
                found.append(f"{path.name}:{node.lineno}: imports a pickle-like module")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}

        def is_true(name: str) -> bool:
            return isinstance(kw.get(name), ast.Constant) and kw[name].value is True

        if func in ("torch.load", "torch.serialization.load") and not is_true("weights_only"):
            found.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
        if func in ("torch.jit.load", "pickle.load", "pickle.loads", "numpy.load", "np.load") and (
                func.startswith(("torch.jit", "pickle")) or is_true("allow_pickle")):
            found.append(f"{path.name}:{node.lineno}: {func}")
        if is_true("trust_remote_code"):
            found.append(f"{path.name}:{node.lineno}: trust_remote_code=True")
        if func in ("yaml.load", "yaml.unsafe_load") and "Loader" not in kw:
            found.append(f"{path.name}:{node.lineno}: {func} without a safe Loader")
    return found


def test_no_code_is_ever_loaded_from_a_file():
    assert len(SOURCES) > 40
    found = [line for path in SOURCES for line in _unsafe_loads(path)]
    assert not found, "\n".join(found)


def test_the_scanner_catches_what_it_must(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, pickle\nimport numpy as np\n"
                   "a = torch.load('x')\nb = torch.load('x', weights_only=False)\nc = pickle.loads(b'')\n"
                   "d = np.load('x', allow_pickle=True)\ne = f(trust_remote_code=True)\n"
                   "ok = torch.load('x', map_location='cpu', weights_only=True)\n")
    found = _unsafe_loads(bad)
    assert len(found) == 6, found  # the import, two torch.load, pickle.loads, np.load, remote code


def test_names_from_data_become_safe_path_components():
    for name in ("../../etc/passwd", "a/b\\c.png", "x\ny|z<script>.png", "..", "", "ümlaut photo.jpg", "\x00.png"):
        safe = safe_stem(name)
        assert re.fullmatch(r"[A-Za-z0-9._-]*", safe) and ".." not in safe.strip(".") or safe == "", (name, safe)
        assert "/" not in safe and "\\" not in safe and "\n" not in safe

    class Data:
        set_B = [0, 0, 0]
        files = {"set_B": ["../../evil.png", "a b|c.png", "\n.png"]}

    names = image_names(Data)
    assert names == ["000_evil", "001_a_b_c", "002"], names


def _png(path: Path, seed: int, size: int = 64) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


HOSTILE = "<script>alert(1)</script> a|b"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A full small run whose identity folder, file names, attack label and eval prompt carry
    HTML, a pipe and a line break."""
    tmp = tmp_path_factory.mktemp("hostile")
    ident = "id <b>x|y"
    for s, n in (("set_A", 2), ("set_B", 2), ("set_C", 2)):
        for i in range(n):
            # a file name cannot hold '/': HTML, a pipe and a line break it can
            _png(tmp / "data" / ident / s / f"<img src=x onerror=alert(1)> {i}|\n.png", seed=i + 10 * len(s))
    suite = parse_suite({
        "name": "hostile", "backend": {"name": "tiny"},
        "dataset": {"name": "folder", "root": str(tmp / "data"),
                    "eval_prompts": ["a photo of {identifier} <i>|</i>\nperson"]},
        "attacks": ["none", {"name": "noise", "eps": 4, "label": HOSTILE}],
        "personalizers": [{"name": "dreambooth", "max_train_steps": 1, "num_class_images": 1,
                           "class_inference_steps": 1, "num_images_per_prompt": 1, "num_inference_steps": 1}],
        "metrics": ["psnr", "ref-rmse"]}, "hostile.toml")
    run_dir = tmp / "run"
    summary = Runner(suite, run_dir, progress=False).run()
    return run_dir, summary


def test_a_run_writes_only_data_files(hostile_run):
    run_dir, summary = hostile_run
    assert not summary.failed, summary.failed[:1]
    allowed = {".json", ".jsonl", ".png", ".safetensors", ".txt", ".md", ".csv", ".lock"}
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.suffix or p.name for p in files}  # the run lock is the file ".lock" (no suffix)
    assert files and kinds <= allowed, sorted(kinds - allowed)
    for p in files:  # every path component the run wrote is plain (nothing from the data leaked in)
        rel = p.relative_to(run_dir)
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert p.resolve().is_relative_to(run_dir.resolve())


def test_markdown_tables_survive_pipes_and_line_breaks(hostile_run):
    run_dir, _ = hostile_run
    _, text = leaderboard.write(run_dir, run_dir.parent / "leaderboard")
    for block in re.split(r"\n\n+", text):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if not rows:
            continue
        widths = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) == 1, block  # every row has as many unescaped pipes as the header
    assert r"a\|b" in text


def test_the_html_report_escapes_names_from_data(hostile_run):
    from benchbase import report

    run_dir, _ = hostile_run
    index = report.write(run_dir, run_dir.parent / "report")
    html = index.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<b>x" not in html and "<i>|</i>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for p in index.parent.rglob("*"):
        assert p.resolve().is_relative_to(index.parent.resolve())


def test_identity_names_cannot_point_outside_the_dataset(tmp_path):
    from benchbase.errors import ConfigError
    from benchbase.plugins import get_plugin_manager

    for name in ("../outside", "/etc", "a/b", "..", ""):
        with pytest.raises(ConfigError, match="not an identity folder name"):
            get_plugin_manager().create("datasets", "folder", {"root": str(tmp_path), "identities": [name]})
    with pytest.raises(ConfigError, match="placeholders are"):
        get_plugin_manager().create("datasets", "folder", {"root": str(tmp_path), "eval_prompts": ["a {style}"]})


def test_suite_and_result_files_are_text_formats(hostile_run):
    run_dir, _ = hostile_run
    json.loads((run_dir / "run.json").read_text())
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        json.loads(line)
