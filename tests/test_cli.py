"""The CLI: fast help without torch, listing, clear errors instead of tracebacks."""

import subprocess
import sys

BENCHBASE = [sys.executable, "-m", "benchbase.cli"]


def run(*args, **kw):
    return subprocess.run([*BENCHBASE, *args], capture_output=True, text=True, timeout=300, **kw)


def test_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from benchbase.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(main, ['ls', 'attacks']); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_ls_attacks_prints_names_one_per_line():
    out = run("ls", "attacks")
    assert out.returncode == 0
    names = out.stdout.split()
    assert names[:2] == ["none", "noise"]


def test_ls_suites_lists_builtins():
    out = run("ls", "suites")
    assert {"smoke", "sd21-vggface2"} <= set(out.stdout.split())


def test_unknown_suite_is_a_clear_error():
    out = run("run", "smok")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "smoke" in out.stderr


def test_unknown_component_in_suite_suggests(tmp_path):
    suite = tmp_path / "bad.toml"
    suite.write_text('backend = { name = "tiny" }\ndataset = { name = "sample" }\n'
                     'attacks = ["nosie"]\npersonalizers = ["dreambooth"]\nmetrics = ["psnr"]\n')
    out = run("run", str(suite), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nosie" in out.stderr and "noise" in out.stderr


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    suite = tmp_path / "bad.toml"
    suite.write_text(f'backend = {{ name = "tiny" }}\ndataset = {{ name = "folder", root = "{tmp_path}/nope" }}\n'
                     'attacks = ["none"]\npersonalizers = ["dreambooth"]\nmetrics = ["psnr"]\n')
    out = run("run", str(suite), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "does not exist" in out.stderr


def test_status_of_a_non_run_folder(tmp_path):
    out = run("status", str(tmp_path))
    assert out.returncode == 2 and "not a benchbase run folder" in out.stderr


def test_suite_executor_settings_reach_the_executor(tmp_path):
    suite = tmp_path / "exec.toml"
    suite.write_text('backend = { name = "tiny" }\ndataset = { name = "sample" }\n'
                     'attacks = ["none"]\npersonalizers = ["dreambooth"]\nmetrics = ["psnr"]\n'
                     'executor = { name = "local", bogus = 1 }\n')
    out = run("run", str(suite), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "bogus" in out.stderr and "Traceback" not in out.stderr


LIBRARY_BARS = '''
import sys
from diffusers.utils import logging as dlogging
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as tlogging

from benchbase.pipeline import Runner
from benchbase.suite import parse_suite

before = [tlogging.is_progress_bar_enabled(), dlogging.is_progress_bar_enabled(), are_progress_bars_disabled()]
suite = parse_suite({"name": "quiet", "backend": {"name": "tiny"},
                     "dataset": {"name": "sample", "identities": ["astronaut"]},
                     "attacks": ["none"], "purifiers": ["none"], "personalizers": ["dreambooth"],
                     "metrics": ["psnr"]})
Runner(suite, sys.argv[1], progress=False).run()
after = [tlogging.is_progress_bar_enabled(), dlogging.is_progress_bar_enabled(), are_progress_bars_disabled()]
print(before, after)
# what a DreamBooth stage does when it saves a text encoder
config = CLIPTextConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
CLIPTextModel(config).save_pretrained(sys.argv[2])
'''


def test_no_progress_keeps_the_model_libraries_bars_out_of_the_output(tmp_path):
    """With benchbase's progress off (--no-progress, or no terminal), diffusers', transformers' and
    the hub's own bars ("Writing model shards", "Loading ...") stay out of the output: the run
    silences them before its first stage. The process starts with them on (else this proves
    nothing), and the environment variable tests set is removed."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", LIBRARY_BARS, str(tmp_path / "run"), str(tmp_path / "model")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[True, True, False] [False, False, True]"
    assert "Writing model shards" not in out.stderr and "Loading" not in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
