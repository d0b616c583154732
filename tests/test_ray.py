"""The Ray executor on a local 2-CPU Ray instance: the same records as the local executor, a
pure cache hit on the second run, a failing stage recorded while the grid goes on, and a worker
killed mid-stage retried into a complete, duplicate-free result set."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchbase import hookimpl
from benchbase.components import Purifier
from benchbase.pipeline import Runner
from benchbase.plugins import PluginManager
from benchbase.suite import parse_suite

ray = pytest.importorskip("ray")

# the killing purifier's marker file; BENCHBASE_* variables reach the Ray workers
KILL_MARKER = "BENCHBASE_TEST_KILL_MARKER"

FAST_DREAMBOOTH = {"name": "dreambooth", "max_train_steps": 1, "num_class_images": 1, "class_inference_steps": 2,
                   "num_images_per_prompt": 1, "num_inference_steps": 2}


def suite_data(**over):
    data = {"name": "ray-test", "backend": {"name": "tiny"},
            "dataset": {"name": "sample", "identities": ["astronaut"]},
            "attacks": ["none", {"name": "noise", "eps": 8}], "purifiers": ["none", "jpeg"],
            "personalizers": [FAST_DREAMBOOTH], "metrics": ["psnr", "ref-rmse"]}
    data.update(over)
    return data


# -- test plugins (this module is registered as a plugin; Ray workers import it by name) ---

class Exploding(Purifier):
    def purify(self, images, ctx):
        raise ValueError("this purifier always fails")


class KillsItsWorker(Purifier):
    """SIGKILLs its own (worker) process the first time it runs, like an out-of-memory kill;
    the retry finds the marker file and purifies (identity). It records the run.json status the
    driver had written when it ran, to show ``benchbase status`` sees a distributed run in flight."""

    def purify(self, images, ctx):
        marker = Path(os.environ[KILL_MARKER])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        run_json = Path(os.environ["BENCHBASE_TEST_RUN_DIR"]) / "run.json"
        info = json.loads(run_json.read_text())
        ctx.info.update(run_status=info["status"], executor=info["executor"]["name"],
                        killed_pid=int(marker.read_text()), pid=os.getpid())
        return images


class WaitsForInterrupt(Purifier):
    """The first time: signals that it started, then runs long enough for the test to stop the driver."""

    def purify(self, images, ctx):
        marker = Path(os.environ["BENCHBASE_TEST_SLOW_MARKER"])
        if not marker.exists():
            marker.write_text("started")
            time.sleep(120)
        return images


@hookimpl
def register_purifiers(register):
    register("exploding", Exploding)
    register("kills-its-worker", KillsItsWorker)
    register("waits-for-interrupt", WaitsForInterrupt)


def manager():
    pm = PluginManager()
    pm.register(sys.modules[__name__])
    return pm


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def ray_executor(pm, **params):
    return pm.create("executors", "ray", params)


def ray_run(pm, suite, run_dir, **params):
    return Runner(suite, run_dir, manager=pm, progress=False, executor=ray_executor(pm, **params)).run()


def records_of(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "results.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def grid_runs(local_ray, tmp_path_factory):
    """The same grid with the local executor and twice with Ray (into one run folder)."""
    root = tmp_path_factory.mktemp("ray-grid")
    suite = parse_suite(suite_data())
    pm = manager()
    # Ray workers run torch with one thread per 1-CPU task; float reductions depend on the thread
    # count, so the local reference runs with one thread too (otherwise values agree to ~1e-5 only)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = Runner(suite, root / "local", manager=pm, progress=False,
                       executor=pm.create("executors", "local", {})).run()
    finally:
        torch.set_num_threads(threads)
    first = ray_run(pm, suite, root / "ray")
    first.info = json.loads((root / "ray" / "run.json").read_text())
    second = ray_run(pm, suite, root / "ray")
    return root, local, first, second


def test_ray_records_equal_local_records(grid_runs):
    root, local, first, _ = grid_runs
    assert not local.failed and not first.failed, first.failed[:2]
    assert len(first.records) == 4 * 2
    # record for record: values, per-prompt values, stage keys, labels, order
    assert first.records == local.records
    assert records_of(root / "ray") == records_of(root / "local")
    # every stage computed once cluster-wide: one protection per attack shared by both purifiers,
    # class images once for all four fine-tunings
    assert first.executed == local.executed
    assert first.executed["protect"] == 2 and first.executed["class_images"] == 1
    info = first.info
    assert info["status"] == "finished" and info["executor"]["name"] == "ray"
    stages = info["executor"]["stages"]
    assert stages["done"] == stages["total"] == sum(first.executed.values()) - 1  # class images: inside a stage
    assert stages["failed"] == 0


def test_second_ray_run_is_a_pure_cache_hit(grid_runs):
    root, _, first, second = grid_runs
    assert second.executed == {}
    assert second.records == first.records
    info = json.loads((root / "ray" / "run.json").read_text())
    assert info["executor"]["stages"]["total"] == 0 and info["executor"]["stages"]["cached"] > 0


def test_cli_runs_the_ray_executor_and_status_reads_the_run(grid_runs, tmp_path):
    from click.testing import CliRunner

    from benchbase.cli import main

    root, _, first, _ = grid_runs
    text = json.dumps(suite_data())  # a TOML inline table is valid JSON for these plain values
    lines = [f"{k} = {json.dumps(v)}" if not isinstance(v, (dict, list)) else f"{k} = {toml_value(v)}"
             for k, v in suite_data().items()]
    suite_file = tmp_path / "suite.toml"
    suite_file.write_text("\n".join(lines) + "\n")
    assert text
    cli = CliRunner()
    result = cli.invoke(main, ["run", str(suite_file), "--run-dir", str(root / "ray"), "--executor", "ray",
                               "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "executed none" in result.output and "0 failed" in result.output
    status = cli.invoke(main, ["status", str(root / "ray")])
    assert status.exit_code == 0 and f"{len(first.records)} ok" in status.output
    # the CLI names no executor: options reach the executor's own parameters, checked there
    bad = cli.invoke(main, ["run", str(suite_file), "-x", "address=auto"])
    assert bad.exit_code == 2 and "address" in bad.output and "local" in bad.output


def toml_value(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def test_failed_stage_and_killed_worker(local_ray, tmp_path, monkeypatch):
    """One purifier raises (its cell fails, the others finish); another SIGKILLs its worker once
    (Ray retries the stage; records stay complete and unique)."""
    monkeypatch.setenv(KILL_MARKER, str(tmp_path / "killed"))
    monkeypatch.setenv("BENCHBASE_TEST_RUN_DIR", str(tmp_path / "run"))
    suite = parse_suite(suite_data(attacks=["none"], purifiers=["none", "exploding", "kills-its-worker"],
                                   metrics=[{"name": "psnr", "of": "purified"}, "ref-rmse"]))
    pm = manager()
    summary = ray_run(pm, suite, tmp_path / "run", max_retries=2)
    assert (tmp_path / "killed").is_file()  # the first attempt did die
    recs = records_of(tmp_path / "run")
    assert recs == summary.records
    cells = [(r["purifier"], r["metric"]) for r in recs]
    assert len(cells) == len(set(cells)) == 3 * 2  # complete and duplicate-free
    by_purifier = {p: [r for r in recs if r["purifier"] == p] for p in ("none", "exploding", "kills-its-worker")}
    assert all(r["status"] == "failed" and "always fails" in r["error"] for r in by_purifier["exploding"])
    assert all(r["status"] == "ok" for r in by_purifier["none"] + by_purifier["kills-its-worker"])
    # the retried purification equals the identity purifier's output, as it must
    psnr = {p: next(r["value"] for r in rs if r["metric"] == "psnr") for p, rs in by_purifier.items() if p != "exploding"}
    assert psnr["none"] == psnr["kills-its-worker"]
    # the stage was computed once (by the retry), in another process than the one killed
    metas = [json.loads(m.read_text()) for m in (tmp_path / "run" / "store" / "purify").glob("*/*/_done.json")]
    killer = [m for m in metas if m["parts"]["purifiers"][0]["name"] == "kills-its-worker"]
    assert len(killer) == 1 and summary.executed["purify"] == 2
    seen = killer[0]["info"]["purifiers"]["kills-its-worker"]
    assert seen["pid"] != seen["killed_pid"]
    # while the stage ran, run.json said the distributed run was in flight
    assert seen["run_status"] == "running" and seen["executor"] == "ray"
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["executor"]["stages"]["failed"] >= 1 and info["failed_records"] == 2
    # rerunning resumes: the killed attempt's temporary is cleaned, nothing that finished reruns
    again = ray_run(pm, suite, tmp_path / "run")
    assert set(again.executed) == set()  # only the always-failing purifier was tried again
    assert again.records == summary.records
    assert not list((tmp_path / "run" / "store").glob("*/*/.*"))


def test_core_does_not_import_ray():
    code = ("import sys, benchbase.pipeline, benchbase.cli, benchbase.plugins, benchbase_plugins.executors; "
            "from benchbase.plugins import get_plugin_manager; get_plugin_manager().create('executors', 'ray'); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_stopped_driver_resumes_from_the_store(local_ray, tmp_path, monkeypatch):
    """`benchbase run --executor ray` in its own process (its own local Ray instance), stopped with
    Ctrl-C while a stage runs; the same run again computes only what had not finished."""
    suite = suite_data(attacks=[{"name": "noise", "eps": 8}], purifiers=["waits-for-interrupt"],
                       personalizers=[FAST_DREAMBOOTH], metrics=[{"name": "psnr", "of": "purified"}])
    suite_file = tmp_path / "suite.toml"
    suite_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in suite.items()))
    marker, run_dir = tmp_path / "started", tmp_path / "run"
    monkeypatch.setenv("BENCHBASE_TEST_SLOW_MARKER", str(marker))
    env = {**os.environ, "BENCHBASE_PLUGIN_MODULES": __name__,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "benchbase.cli", "run", str(suite_file), "--run-dir", str(run_dir),
           "--executor", "ray", "--no-progress"]
    # a test session started in the background (`cmd &`, nohup) inherits SIGINT as ignored, and
    # Python then never raises KeyboardInterrupt: give the child the default Ctrl-C behaviour
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # the purification starts once the protection is done; the clean stage (set_B as PNGs) is
        # no stage's input, so Ray runs it beside the protection and it may still be computing
        # here: wait for it too, or Ctrl-C stops it and the resumed run rightly computes it again
        clean_done = lambda: any((run_dir / "store" / "clean").glob("*/*/_done.json"))  # noqa: E731
        deadline = time.time() + 150
        while not (marker.exists() and clean_done()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists() and clean_done(), (proc.communicate(timeout=30)[0][-3000:] if proc.poll() is not None
                                                  else "the purification or the clean stage did not finish in 150 s")
        info = json.loads((run_dir / "run.json").read_text())
        # clean (the set_B PNGs), protect, purify, score
        assert info["status"] == "running" and info["executor"]["stages"]["total"] == 4
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-2000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted", out[-2000:]
    done = {d.name: len(list(d.glob("*/*/_done.json"))) for d in (run_dir / "store").iterdir() if d.name != ".locks"}
    # the two finished stages are in the store once; the purification stopped mid-way left no folder
    assert done == {"clean": 1, "protect": 1, "purify": 0}, done
    pm = manager()
    resumed = ray_run(pm, parse_suite(suite), run_dir)
    assert resumed.executed == {"purify": 1, "score": 1}  # nothing that had finished was computed again
    assert [r["status"] for r in resumed.records] == ["ok"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_stage_placement_follows_the_suite_device():
    class FakeRay:
        def __init__(self, gpus):
            self.gpus = gpus

        def cluster_resources(self):
            return {"CPU": 8.0, **({"GPU": float(self.gpus)} if self.gpus else {})}

    pm = PluginManager()
    ex = pm.create("executors", "ray", {"gpus_per_task": 0.5})
    assert ex._use_gpu(FakeRay(4), "auto") and ex._use_gpu(FakeRay(1), "cuda:1")
    assert not ex._use_gpu(FakeRay(0), "auto") and not ex._use_gpu(FakeRay(4), "cpu")
    with pytest.raises(Exception, match="no GPU"):
        ex._use_gpu(FakeRay(0), "cuda")
    for stage in ("protect", "purify", "personalize", "generate"):
        assert ex.placement(stage, True, "cuda:1") == ("cuda", {"num_gpus": 0.5})
    assert ex.placement("score", True, "auto") == ("cpu", {})  # scoring asks for CPUs only
    assert ex.placement("personalize", False, "auto") == ("auto", {})
