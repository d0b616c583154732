"""A quiet run: `benchbase run` prints benchbase's own lines and nothing else —
no library warning, banner or per-worker log line — with the local executor and with Ray.

The suite is the built-in `smoke` (every stage kind, every metric it scores, so every library it
imports) on one identity with its step counts cut to one or two: the lines a run prints do not
depend on how long it trains. Each executor runs it once, as a real process (a line printed by
native code or a Ray worker reaches the terminal only there), with progress bars off.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchbase.suite import builtin_suites, tomllib

OWN_LINES = [  # what `benchbase run` itself prints (benchbase/cli.py)
    r"suite \S+ \(.*\): \d+ cells per identity -> .*",
    r"done in [\d.]+ s; stages executed \{.*\}, cached .*; \d+ records, 0 failed, \d+ unavailable",
    r"  unavailable \(\d+ records\): .*",
    r"leaderboard: .*leaderboard\.md",
]


def shrunk_smoke(tmp: Path) -> Path:
    data = tomllib.loads(builtin_suites()["smoke"])
    data["dataset"] = {**data["dataset"], "identities": ["astronaut"], "images_per_set": 2}
    data["personalizers"] = [{**p, "max_train_steps": 1, "num_class_images": 1, "class_inference_steps": 2,
                              "num_images_per_prompt": 1, "num_inference_steps": 2} for p in data["personalizers"]]
    data["device"] = "cpu"

    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, (int, float)) else '"' + str(v).replace('"', '\\"') + '"'

    path = tmp / "smoke.toml"
    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in data.items()))
    return path


def foreign_lines(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if line.strip() and not any(re.fullmatch(p, line) for p in OWN_LINES)]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_normal_run_prints_only_benchbase_lines(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    suite = shrunk_smoke(tmp_path)
    args = [sys.executable, "-m", "benchbase", "run", str(suite), "--run-dir", str(tmp_path / "run"), "--no-progress",
            "--executor", executor] + (["-x", "num_cpus=2"] if executor == "ray" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    both = out.stdout + out.stderr
    assert out.returncode == 0, both[-3000:]
    assert "done in" in out.stdout and "leaderboard:" in out.stdout
    assert not foreign_lines(both), foreign_lines(both)


def test_the_check_sees_a_foreign_line():
    """The filter above is not vacuous: the kernels trust-check line is foreign, ours are not."""
    worker = ("(benchbase:personalize:4e3bd5eb pid=9653) Skipping publisher trust check for "
              "'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode.")
    ours = "leaderboard: runs/smoke/leaderboard/leaderboard.md"
    assert foreign_lines(f"{ours}\n{worker}\n") == [worker]
