"""The bad-input battery: what a new user gets wrong, tried through the `benchbase run` command.

Every case ends one of three documented ways, never in a traceback:

- ``error``: nothing runs; exit code 2 and one line per problem, each starting with "error:";
- ``cell``: the grid runs; the cells that need the bad input are recorded failed with one line
  naming the cause (no traceback file), and every other cell finishes ok;
- ``converted``: a documented conversion (e.g. grayscale -> RGB) and the cells finish ok.

docs/reliability.md lists the cases and their outcomes. The tiny backend, the sample/folder
datasets and the protect stage only (psnr of the protected images) keep it to about a minute.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from benchbase.cli import main

GOOD = "good"
SUITE = """
name = "battery"
device = "cpu"
backend = {backend}
dataset = {dataset}
attacks = {attacks}
personalizers = [{{ name = "dreambooth", max_train_steps = 1 }}]
metrics = [{{ name = "psnr", of = "protected" }}]
"""


def suite_text(backend='{ name = "tiny" }', dataset='{ name = "sample", identities = ["astronaut"], images_per_set = 1 }',
               attacks='["none", { name = "noise", eps = 4 }]', extra: str = "") -> str:
    return SUITE.format(backend=backend, dataset=dataset, attacks=attacks) + extra


def run_cli(tmp_path: Path, text: str | None, *args: str, env: dict | None = None, run_dir: Path | None = None):
    """`benchbase run` in-process; returns (exit code, stderr, stdout, records)."""
    argv = ["run"]
    if text is not None:
        suite = tmp_path / "suite.toml"
        suite.write_text(text)
        argv.append(str(suite))
    run_dir = run_dir or tmp_path / "run"
    argv += ["--run-dir", str(run_dir), "--no-progress", *args]
    result = CliRunner().invoke(main, argv, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in result.output
    records = []
    if (run_dir / "results.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return result.exit_code, result.stderr, result.stdout, records


def assert_error(code: int, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), lines
    assert needle in stderr, stderr


def png(path: Path, size=(64, 64), mode: str = "RGB", seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65535, (size[1], size[0]))).astype(np.uint16))
    elif mode != "RGBA":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def identity(root: Path, name: str, seed: int = 0, n: int = 1) -> Path:
    for s in ("set_A", "set_B", "set_C"):
        for i in range(n):
            png(root / name / s / f"{i}.png", seed=seed + i)
    return root / name


# -- dataset files: one run over many identities, each broken one way ----------------------------

def _corrupt(d):
    p = d / "set_B" / "0.png"
    p.write_bytes(p.read_bytes()[:200])


def _zero(d):
    (d / "set_B" / "0.png").write_bytes(b"")


def _text(d):
    (d / "set_B" / "0.png").write_text("not an image")


def _tiny(d):
    png(d / "set_B" / "0.png", size=(8, 8))


def _thin(d):
    png(d / "set_B" / "0.png", size=(2000, 10))


def _mode(mode, fmt=None, name="0.png"):
    def make(d):
        (d / "set_B" / "0.png").unlink()
        png(d / "set_B" / name, mode=mode, fmt=fmt)
    return make


def _missing_set(name):
    return lambda d: shutil.rmtree(d / name)


def _empty_set(name):
    def make(d):
        shutil.rmtree(d / name)
        (d / name).mkdir()
    return make


def _only_text(d):
    shutil.rmtree(d / "set_A")
    (d / "set_A").mkdir()
    (d / "set_A" / "notes.txt").write_text("x")


def _dangling(d):
    (d / "set_B" / "0.png").unlink()
    (d / "set_B" / "0.png").symlink_to(d / "nowhere.png")


def _odd_names(d):
    (d / "set_B" / "0.png").rename(d / "set_B" / "my photo |1| ü\n.png")


def _subfolder(d):
    png(d / "set_B" / "nested" / "x.png")  # folders inside a set are not images: ignored


def _wrong_suffix(d):
    (d / "set_B" / "0.png").rename(d / "set_B" / "0.jpg")  # a PNG named .jpg: Pillow reads the content


DATASET_FILES = {
    # identity: (how it is broken, outcome, text the record's error or the conversion must show)
    "corrupt-png": (_corrupt, "cell", "corrupt or truncated image"),
    "zero-byte": (_zero, "cell", "not an image file"),
    "text-as-png": (_text, "cell", "not an image file"),
    "tiny-image": (_tiny, "cell", "smaller than 16 px"),
    "thin-image": (_thin, "cell", "smaller than 16 px"),
    "missing-set-B": (_missing_set("set_B"), "cell", "set_B is missing"),
    "missing-set-C": (_missing_set("set_C"), "cell", "set_C is missing"),
    "empty-set-A": (_empty_set("set_A"), "cell", "set_A contains no images"),
    "only-text-set-A": (_only_text, "cell", "set_A contains no images"),
    "dangling-link": (_dangling, "cell", "set_B contains no images"),
    "grayscale": (_mode("L"), "converted", ""),
    "rgba": (_mode("RGBA"), "converted", ""),
    "palette": (_mode("P"), "converted", ""),
    "16-bit": (_mode("I;16"), "converted", ""),
    "cmyk-jpeg": (_mode("CMYK", "JPEG", "0.jpg"), "converted", ""),
    "odd-file-name": (_odd_names, "converted", ""),
    "nested-folder": (_subfolder, "converted", ""),
    "png-named-jpg": (_wrong_suffix, "converted", ""),
}


@pytest.fixture(scope="module")
def files_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files")
    data = tmp / "data"
    identity(data, GOOD, seed=100)
    for i, (name, (breaks, _, _)) in enumerate(DATASET_FILES.items()):
        breaks(identity(data, name, seed=i))
    (data / ".cache").mkdir()  # hidden folders are not identities
    code, stderr, stdout, records = run_cli(tmp, suite_text(dataset=f'{{ name = "folder", root = "{data}" }}'))
    return tmp, code, stderr, records


def test_dataset_files_run_finishes_for_every_good_identity(files_run):
    tmp, code, stderr, records = files_run
    assert code == 1, stderr  # everything written, then exit 1: some records failed
    assert stderr.strip().splitlines()[-1].startswith("error: ") and "records failed (" in stderr
    assert {r["identity"] for r in records} == {GOOD, *DATASET_FILES}  # .cache is no identity
    assert all(r["status"] == "ok" for r in records if r["identity"] == GOOD)
    assert not (tmp / "run" / "errors").exists()  # only clear errors: no traceback files


@pytest.mark.parametrize("name", list(DATASET_FILES))
def test_dataset_file(files_run, name):
    _, _, _, records = files_run
    _, outcome, needle = DATASET_FILES[name]
    mine = [r for r in records if r["identity"] == name]
    assert len(mine) == 2  # none and noise
    if outcome == "converted":
        assert all(r["status"] == "ok" for r in mine), [r["error"] for r in mine]
    else:
        for r in mine:
            assert r["status"] == "failed" and needle in r["error"] and "\n" not in r["error"], r["error"]
            assert str(Path(name)) in r["error"]  # the error names the file or folder


# -- dataset layout, suite values, plugin names: nothing runs, one line per problem --------------

def _folder(tmp: Path, **kw) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"name": "folder", **kw}.items()) + " }"


def _layout_root_missing(tmp):
    return suite_text(dataset=_folder(tmp, root=str(tmp / "nope"))), "does not exist"


def _layout_root_file(tmp):
    (tmp / "file").write_text("x")
    return suite_text(dataset=_folder(tmp, root=str(tmp / "file"))), "is not a folder"


def _layout_empty_root(tmp):
    (tmp / "empty").mkdir()
    return suite_text(dataset=_folder(tmp, root=str(tmp / "empty"))), "has no identity folders"


def _layout_unknown_identity(tmp):
    identity(tmp / "d", GOOD)
    return suite_text(dataset=_folder(tmp, root=str(tmp / "d"), identities=[GOOD, "bob"])), "missing under"


def _layout_identity_path(tmp):
    identity(tmp / "d", GOOD)
    return suite_text(dataset=_folder(tmp, root=str(tmp / "d"), identities=["../d/good"])), "not an identity folder name"


def _layout_prompt_placeholder(tmp):
    identity(tmp / "d", GOOD)
    return (suite_text(dataset=_folder(tmp, root=str(tmp / "d"), eval_prompts=["a {style} photo"])),
            "the placeholders are {identifier} and {class_noun}")


def _value(attacks=None, extra="", backend=None, dataset=None):
    kw = {k: v for k, v in (("attacks", attacks), ("backend", backend), ("dataset", dataset)) if v}
    return lambda tmp: suite_text(**kw, extra=extra)


ERROR_CASES = {
    # layout
    "layout: root missing": (_layout_root_missing, None),
    "layout: root is a file": (_layout_root_file, None),
    "layout: no identity folders": (_layout_empty_root, None),
    "layout: unknown identity": (_layout_unknown_identity, None),
    "layout: identity is a path": (_layout_identity_path, None),
    "layout: unknown prompt placeholder": (_layout_prompt_placeholder, None),
    # suite values
    "value: eps = nan": (_value('[{ name = "noise", eps = nan }]'), "eps: Input should be a finite number (got nan)"),
    "value: eps = -3": (_value('[{ name = "noise", eps = -3 }]'), "eps: Input should be greater than or equal to 0"),
    "value: eps = inf": (_value('[{ name = "mist", eps = inf }]'), "eps: Input should be a finite number"),
    "value: steps = -1": (_value('[{ name = "advdm", steps = -1 }]'), "steps: Input should be greater than or equal to 0"),
    "value: learning_rate = 0": (_value('[{ name = "aspl", learning_rate = 0.0 }]'), "learning_rate: Input should be greater than 0"),
    "value: fractional image count": (lambda tmp: suite_text().replace(
        "max_train_steps = 1", "max_train_steps = 1, num_images_per_prompt = 2.5"),
        "num_images_per_prompt: Input should be a valid integer"),
    "value: resolution not a multiple of 8": (_value(backend='{ name = "tiny", resolution = 50 }'), "resolution: Input should be a multiple of 8"),
    "value: seeds negative": (_value(extra="seeds = [-1]\n"), "seeds[0]: Input should be greater than or equal to 0"),
    "value: dtype": (_value(extra='dtype = "float64"\n'), "dtype: Input should be"),
    "value: device typo": (lambda tmp: suite_text().replace('device = "cpu"', 'device = "tpu9"'), "device 'tpu9' is not a device name"),
    "value: unknown suite key": (_value(extra="atacks = []\n"), "unknown suite keys 'atacks' (did you mean 'attacks'?)"),
    "value: invalid TOML": (lambda tmp: "name = [unclosed", "invalid TOML"),
    "value: empty suite file": (lambda tmp: "", "missing `backend`"),
    # plugin names
    "plugin: unknown attack": (_value('["nosie"]'), "unknown attack 'nosie'. Did you mean 'noise'"),
    "plugin: unknown metric": (lambda tmp: suite_text().replace('name = "psnr"', 'name = "psrn"'), "unknown metric 'psrn'"),
    "plugin: unknown backend": (_value(backend='{ name = "sd15" }'), "unknown backend 'sd15'"),
    "plugin: unknown parameter": (_value('[{ name = "noise", epss = 3 }]'), "epss: unknown parameter (did you mean eps?)"),
    "plugin: adaptive without support": (_value('[{ name = "noise", adaptive = true }]'), "is marked adaptive but does not support it"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_case(tmp_path, case):
    make, needle = ERROR_CASES[case]
    made = make(tmp_path)
    text, needle = (made if isinstance(made, tuple) else (made, needle))
    code, stderr, _, records = run_cli(tmp_path, text)
    assert_error(code, stderr, needle)
    assert not records


# -- model folders and the hub: the cells that load the model fail with one line ------------------

def _tiny_copy(tmp: Path, breaks) -> Path:
    from benchbase_plugins.worlds.tiny.models import ensure_tiny_folder

    folder = tmp / "model"
    shutil.copytree(ensure_tiny_folder(), folder)
    breaks(folder)
    return folder


def _set_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


MODEL_CASES = {
    "model: missing unet subfolder": (lambda f: shutil.rmtree(f / "unet"), "the `unet` subfolder is missing"),
    "model: corrupt safetensors": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 64),
                                   "unet/diffusion_pytorch_model.safetensors is not a valid safetensors file"),
    "model: truncated safetensors": (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        (f / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:4096]), "is not a valid safetensors file"),
    "model: config does not match the weights": (
        lambda f: _set_json(f / "unet" / "config.json", cross_attention_dim=17), "cannot be loaded (ValueError"),
    "model: config not JSON": (lambda f: (f / "text_encoder" / "config.json").write_text("{oops"),
                               "text_encoder/config.json is not valid JSON"),
    "model: no model_index.json": (lambda f: (f / "model_index.json").unlink(), "is not a diffusers Stable Diffusion folder"),
    "model: folder does not exist": (lambda f: shutil.rmtree(f), "does not exist"),
}
#: a model that is not there is unavailable (nothing went wrong); one that is there but broken fails
ABSENT_MODEL_CASES = {"model: folder does not exist"}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_folder_case(tmp_path, case):
    breaks, needle = MODEL_CASES[case]
    folder = _tiny_copy(tmp_path, breaks)
    text = suite_text(backend=f'{{ name = "sd", model = "{folder}", resolution = 64 }}',
                      attacks='["none", { name = "advdm", steps = 1 }]')
    code, stderr, _, records = run_cli(tmp_path, text)
    _assert_model_cells(tmp_path, code, stderr, records, needle, absent=case in ABSENT_MODEL_CASES)


def _assert_model_cells(tmp_path, code, stderr, records, needle, absent):
    by_attack = {r["attack"]: r for r in records}
    assert by_attack["none"]["status"] == "ok"  # the rest of the grid finishes
    bad = by_attack["advdm"]
    if absent:  # exit 0: every record ok or unavailable
        assert code == 0, stderr
        assert bad["status"] == "unavailable" and bad["error"].startswith("protect unavailable: "), bad
    else:  # exit 1: written, but a record failed
        assert code == 1, stderr
        assert bad["status"] == "failed" and bad["error"].startswith("protect failed: DataError: "), bad
    assert needle in bad["error"] and "\n" not in bad["error"]
    assert not (tmp_path / "run" / "errors").exists()


def test_hub_id_not_cached_while_offline(tmp_path):
    text = suite_text(backend='{ name = "sd", model = "someone/not-a-cached-model", resolution = 64 }',
                      attacks='["none", { name = "advdm", steps = 1 }]')
    code, stderr, _, records = run_cli(tmp_path, text, env={"HF_HUB_OFFLINE": "1"})
    _assert_model_cells(tmp_path, code, stderr, records,
                        "'someone/not-a-cached-model' are not available: the hub is offline (HF_HUB_OFFLINE=1)",
                        absent=True)


# -- environment -------------------------------------------------------------------------------------

def test_run_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")  # root ignores permissions: a path under a file fails for anyone
    code, stderr, _, _ = run_cli(tmp_path, suite_text(), run_dir=tmp_path / "file" / "run")
    assert_error(code, stderr, "cannot write the run folder")


def test_store_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    code, stderr, _, _ = run_cli(tmp_path, suite_text(), "--store", str(tmp_path / "file" / "store"))
    assert_error(code, stderr, "cannot create the store")


def test_read_only_run_folder(tmp_path):
    """A read-only filesystem (EROFS), as root: a read-only tmpfs mount when this machine allows
    mounting, skipped otherwise."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a read-only filesystem")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    try:
        code, stderr, _, _ = run_cli(tmp_path, suite_text(), run_dir=mnt / "run")
        assert_error(code, stderr, "Read-only file system")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_device_flag_typo(tmp_path):
    code, stderr, _, _ = run_cli(tmp_path, suite_text(), "--device", "cuda:3x")
    assert_error(code, stderr, "--device: device 'cuda:3x' is not a device name")


def test_a_plugin_module_that_does_not_import(tmp_path, monkeypatch):
    """A broken extra plugin is isolated: listed as failed by `benchbase plugins`, the run goes on."""
    import benchbase.plugins as plugins

    monkeypatch.setattr(plugins, "_default", None)
    monkeypatch.setenv("BENCHBASE_PLUGIN_MODULES", "no_such_module_xyz")
    code, stderr, _, records = run_cli(tmp_path, suite_text())
    assert code == 0 and records and all(r["status"] == "ok" for r in records), stderr
    listed = CliRunner().invoke(main, ["plugins"])
    assert "no_such_module_xyz" in listed.output and "FAILED TO LOAD" in listed.output


def test_the_real_command_prints_one_line(tmp_path):
    """The same through a real process: exit code 2, stderr is the error lines only."""
    suite = tmp_path / "nan.toml"
    suite.write_text(suite_text(attacks='["none", { name = "noise", eps = nan }, { name = "noise", label = "neg", eps = -3 }]'))
    out = subprocess.run([sys.executable, "-m", "benchbase.cli", "run", str(suite), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith(f"error: {suite}: attacks[") for line in lines), lines
    assert lines[0].endswith("): attack 'noise': eps: Input should be a finite number (got nan)")  # auto label
    assert lines[1] == (f"error: {suite}: attacks[2] (label 'neg'): attack 'noise': eps: Input should be greater "
                        "than or equal to 0 (got -3)")
