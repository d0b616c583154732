"""Harness overhead at scale, with stand-in components that do almost no work
(``benchmarks/harness_standins.py``, ``harness_components.py``), so what is measured is benchbase itself.

    python benchmarks/harness.py                       # 10,000 cells x 10 metrics = 100,000 records
    python benchmarks/harness.py --identities 10       # a 1,000-cell slice (quicker)
    python benchmarks/harness.py --skip-run --run-dir R   # leaderboard/report/status of an existing run

Each step runs in its own process (wall time and that process's peak RSS, from ``wait4``):

1. ``plan``: ``Runner.plan()`` of the whole suite on an empty store (keys of every stage of
   every cell, deduplicated);
2. ``run``: ``benchbase run`` of the suite (every stage written as a real one is: PNGs, a
   "model", score.json; results.jsonl and run.json kept up to date), with ``benchbase status``
   called every few seconds while it runs;
3. ``leaderboard`` and ``report`` over the finished run's records.

The run's time divided by its cells is the harness cost per cell; ``--tiny-cell-seconds`` (the
wall time of one cell of a tiny-backend run, default: the smoke suite's, see benchmarks/README.md)
turns it into the overhead ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def suite_toml(identities: int, attacks: int, purifiers: int, metrics: int) -> str:
    ofs = ["generated"] * max(1, metrics - 2) + ["protected", "purified"]
    metric_list = ", ".join(f'{{ name = "stub-metric", label = "m{i}", variant = {i}, of = "{ofs[i % len(ofs)]}" }}'
                            for i in range(metrics))
    return f"""name = "harness"
seeds = [0]
device = "cpu"
backend = {{ name = "stub" }}
dataset = {{ name = "stub", identities = {identities} }}
attacks = [{", ".join(f'{{ name = "stub-attack", label = "a{i}", variant = {i} }}' for i in range(attacks))}]
purifiers = [{", ".join(f'{{ name = "stub-purifier", label = "p{i}", variant = {i} }}' for i in range(purifiers))}]
defenses = ["none"]
personalizers = ["stub-personalizer"]
metrics = [{metric_list}]
"""


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["BENCHBASE_PLUGIN_MODULES"] = ",".join(filter(None, [e.get("BENCHBASE_PLUGIN_MODULES"), "harness_standins"]))
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TRANSFORMERS_OFFLINE", "1")
    return e


def timed(cmd: list[str], quiet: bool = True) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, exit status, output tail) of a child process."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, p.returncode, out[-2000:]


PLAN = """
import sys, time
from benchbase.pipeline import Runner
from benchbase.suite import load_suite
suite = load_suite(sys.argv[1])
t = time.perf_counter()
runner = Runner(suite, sys.argv[2], progress=False)
plan = runner.plan()
print(f"cells {len(plan.cells)} stages {len(plan.nodes)} plan_seconds {time.perf_counter() - t:.2f}")
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchbase.cli", *args]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=100)
    ap.add_argument("--attacks", type=int, default=10)
    ap.add_argument("--purifiers", type=int, default=10)
    ap.add_argument("--metrics", type=int, default=10)
    ap.add_argument("--run-dir", type=Path, help="where the run goes (default: a temporary folder)")
    ap.add_argument("--skip-run", action="store_true", help="reuse the run in --run-dir (plan is skipped too)")
    ap.add_argument("--skip-tables", action="store_true", help="stop after the run (no leaderboard/report)")
    ap.add_argument("--status-every", type=float, default=5.0)
    ap.add_argument("--tiny-cell-seconds", type=float, default=None,
                    help="seconds per cell of a tiny-backend run, for the overhead ratio")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    root = args.run_dir or Path(tempfile.mkdtemp(prefix="bb-harness-"))
    root.mkdir(parents=True, exist_ok=True)
    suite = root / "harness.toml"
    if not args.skip_run:
        suite.write_text(suite_toml(args.identities, args.attacks, args.purifiers, args.metrics))
    cells = args.identities * args.attacks * args.purifiers
    results: dict = {"cells": cells, "records": cells * args.metrics, "load_before": os.getloadavg()[0]}
    print(f"suite: {cells} cells, {cells * args.metrics} records; run folder {root / 'run'}")

    if not args.skip_run:
        wall, rss, rc, out = timed([sys.executable, "-c", PLAN, str(suite), str(root / "plan-only")])
        assert rc == 0, out
        results["plan"] = {"seconds": round(wall, 2), "peak_rss_mb": round(rss),
                           "detail": out.strip().splitlines()[-1]}
        print(f"plan         {wall:8.1f} s  {rss:7.0f} MiB   {out.strip().splitlines()[-1]}")

    run_dir = root / "run"
    if not args.skip_run:
        start = time.perf_counter()
        log = open(root / "run.log", "w")
        p = subprocess.Popen(cli("run", str(suite), "--run-dir", str(run_dir), "--no-progress"), env=env(),
                             stdout=log, stderr=subprocess.STDOUT, text=True)
        status_times, status_rss = [], []
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(args.status_every)
            if (run_dir / "run.json").is_file():
                w, r, _, _ = timed(cli("status", str(run_dir)))
                status_times.append(w)
                status_rss.append(r)
        wall = time.perf_counter() - start
        log.close()
        out = (root / "run.log").read_text()
        rss = usage.ru_maxrss / 1024
        assert os.waitstatus_to_exitcode(status) == 0, out[-3000:]
        done = [line for line in out.splitlines() if line.startswith("done in")]
        results["run"] = {"seconds": round(wall, 1), "peak_rss_mb": round(rss), "summary": done[-1] if done else out[-500:],
                          "seconds_per_cell": round(wall / cells, 4)}
        print(f"run          {wall:8.1f} s  {rss:7.0f} MiB   {wall / cells * 1000:.1f} ms per cell; "
              + (done[-1] if done else ""))
        if status_times:
            results["status"] = {"calls": len(status_times), "median_seconds": round(statistics.median(status_times), 2),
                                 "max_seconds": round(max(status_times), 2), "peak_rss_mb": round(max(status_rss))}
            print(f"status       {statistics.median(status_times):8.2f} s  {max(status_rss):7.0f} MiB   "
                  f"median of {len(status_times)} calls during the run (max {max(status_times):.2f} s)")
        if args.tiny_cell_seconds:
            ratio = wall / cells / args.tiny_cell_seconds
            results["overhead_vs_tiny"] = ratio
            print(f"overhead     {100 * ratio:.2f} % of a tiny-backend cell ({args.tiny_cell_seconds} s)")
    n_records = sum(1 for _ in open(run_dir / "results.jsonl"))
    results["records_written"] = n_records
    for name, cmd in () if args.skip_tables else (("status", cli("status", str(run_dir))),
                      ("leaderboard", cli("leaderboard", str(run_dir), "--quiet")),
                      ("report", cli("report", str(run_dir)))):
        wall, rss, rc, out = timed(cmd)
        assert rc == 0, out
        key = name if name != "status" else "status_after"
        results[key] = {"seconds": round(wall, 2), "peak_rss_mb": round(rss)}
        print(f"{key:<12} {wall:8.1f} s  {rss:7.0f} MiB   over {n_records} records")
    results["load_after"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
