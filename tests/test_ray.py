"""The Ray executor on a local 2-CPU Ray instance: the same records as the local executor, a
pure cache hit on the second run, a failing stage recorded while the grid goes on, and a worker
killed mid-stage retried into a complete, duplicate-free result set."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from benchbase import hookimpl
from benchbase.components import Purifier
from benchbase.pipeline import Runner
from benchbase.plugins import PluginManager
from benchbase.suite import parse_suite
from benchbase_plugins.attacks.baseline import UniformNoise
from benchbase_plugins.personalizers.dreambooth import DreamBooth

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


# where the pausing components below announce their worker's pid, for the test to SIGKILL it
PAUSE_DIR = "BENCHBASE_TEST_PAUSE_DIR"


def pause_once(stage: str) -> None:
    """The first attempt of ``stage`` (while a test watches PAUSE_DIR): write this worker's pid,
    then wait to be SIGKILLed from outside. Without PAUSE_DIR (the uninterrupted reference run)
    and on the retry: nothing, so both runs compute the same values."""
    folder = os.environ.get(PAUSE_DIR)
    if not folder:
        return
    mark = Path(folder) / f"{stage}.pid"
    if mark.exists():
        return
    tmp = mark.with_name(f".{mark.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    tmp.replace(mark)  # the killer never reads a half-written pid
    time.sleep(120)
    raise RuntimeError(f"nobody killed the {stage} worker {os.getpid()} in 120 s")


class PausingNoise(UniformNoise):
    """The noise attack, paused mid-stage (its images computed, not yet written) on its first attempt."""

    def protect(self, images, ctx):
        adv = super().protect(images, ctx)
        pause_once("protect")
        return adv


class PausingDreamBooth(DreamBooth):
    """DreamBooth, paused after its first training step (class images done) on its first attempt."""

    def train(self, images, ctx, defense, out_dir):
        progress = ctx.progress

        def steps(iterable, desc="", **kwargs):
            it = progress(iterable, desc=desc, **kwargs)
            return it if desc.startswith("generate") else _pause_at_second(it)  # not the class images' sampling

        ctx.progress = steps
        return super().train(images, ctx, defense, out_dir)


def _pause_at_second(iterable):
    for i, item in enumerate(iterable):
        if i == 1:
            pause_once("personalize")
        yield item


@hookimpl
def register_purifiers(register):
    register("exploding", Exploding)
    register("kills-its-worker", KillsItsWorker)
    register("waits-for-interrupt", WaitsForInterrupt)


@hookimpl
def register_attacks(register):
    register("pausing-noise", PausingNoise)


@hookimpl
def register_personalizers(register):
    register("pausing-dreambooth", PausingDreamBooth)


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


def stage_folders(store: Path) -> dict[str, int]:
    """How many complete folders each stage has in a store."""
    return {d.name: len(list(d.glob("*/*/_done.json"))) for d in sorted(store.iterdir()) if d.name != ".locks"}


def kill_when_paused(folder: Path, stages: list[str], killed: dict, stop: threading.Event) -> None:
    """SIGKILL each stage's worker once it announces itself (from outside: an OOM kill, a lost node)."""
    while not stop.is_set() and len(killed) < len(stages):
        for stage in stages:
            mark = folder / f"{stage}.pid"
            if stage not in killed and mark.exists():
                pid = int(mark.read_text())
                if pid != os.getpid():  # never the test itself (a misrouted stage would say so below)
                    os.kill(pid, signal.SIGKILL)
                killed[stage] = pid
        stop.wait(0.1)


def test_worker_killed_mid_protect_and_mid_personalize(local_ray, tmp_path, monkeypatch):
    """The test SIGKILLs the Ray worker computing the protection (its images made, not written) and,
    later, the one fine-tuning (class images done, one training step taken). Ray retries each
    stage; the run's records equal an uninterrupted run's and every stage is in the store once."""
    suite = parse_suite(suite_data(
        attacks=[{"name": "pausing-noise", "eps": 8}], purifiers=["none"],
        personalizers=[{**FAST_DREAMBOOTH, "name": "pausing-dreambooth", "max_train_steps": 3}],
        metrics=["psnr", "ref-rmse"]))
    pm = manager()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the 1-CPU Ray workers (see grid_runs)
    try:
        reference = Runner(suite, tmp_path / "local", manager=pm, progress=False,
                           executor=pm.create("executors", "local", {})).run()
    finally:
        torch.set_num_threads(threads)
    assert [r["status"] for r in reference.records] == ["ok", "ok"]

    pauses = tmp_path / "pauses"
    pauses.mkdir()
    monkeypatch.setenv(PAUSE_DIR, str(pauses))
    killed: dict[str, int] = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_when_paused, args=(pauses, ["protect", "personalize"], killed, stop))
    killer.start()
    try:
        summary = ray_run(pm, suite, tmp_path / "ray", max_retries=2)
    finally:
        stop.set()
        killer.join()
    assert set(killed) == {"protect", "personalize"} and os.getpid() not in killed.values()
    store = tmp_path / "ray" / "store"
    # each killed attempt died inside its stage: its temporary folder is still there, beside the
    # retry's complete folder of the same key
    for stage in ("protect", "personalize"):
        (final,) = [m.parent for m in store.glob(f"{stage}/*/*/_done.json")]
        leftovers = [t for t in final.parent.iterdir() if t.name.startswith(f".{final.name}-")]
        assert len(leftovers) == 1 and not (leftovers[0] / "_done.json").exists(), stage
        assert json.loads((final / "_done.json").read_text())["pid"] != killed[stage]  # computed by the retry
    # the records equal the uninterrupted run's, value for value, once each
    assert summary.records == reference.records and records_of(tmp_path / "ray") == records_of(tmp_path / "local")
    # nothing computed twice: the store holds what the uninterrupted run's holds; the class images
    # the killed fine-tuning had published were reused by its retry
    assert stage_folders(store) == stage_folders(tmp_path / "local" / "store")
    assert summary.executed == {k: v for k, v in reference.executed.items() if k != "class_images"}
    # the next run removes the dead attempts' temporaries and computes nothing
    again = ray_run(pm, suite, tmp_path / "ray")
    assert again.executed == {} and again.records == reference.records
    assert not list(store.glob("*/*/.*"))


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


# -- a two-node Ray cluster on this machine (docs/cluster.md) -----------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """The live processes of the session a `ray start` was started in (its daemons and workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # ended meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after "pid (comm)": state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def stop_node(proc: subprocess.Popen) -> None:
    """End one node we started, and only it: `ray stop` would end every Ray process of the machine
    (other users' too). Each `ray start` runs in its own session, which its daemons and workers share."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.time() + (5 if sig == signal.SIGTERM else 15)  # a head may outlive SIGTERM
        while session_members(proc.pid) and time.time() < deadline:
            time.sleep(0.3)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def ray_start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    ray_cli = Path(sys.executable).with_name("ray")
    ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    return subprocess.Popen([str(ray_cli), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                             "--num-gpus=0", "--object-store-memory=100000000", *ports, *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_started(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while "Ray runtime started" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.fixture
def two_node_cluster():
    """`ray start --head` and a second node (its own temporary folder, one CPU each), joined as
    docs/cluster.md says, with a token of their own; ended process by process, even on failure.
    Ray's folders are short paths (its sockets' paths must fit 107 bytes)."""
    import secrets
    import shutil
    import tempfile

    if not sys.platform.startswith("linux"):
        pytest.skip("ends the cluster's processes through /proc")
    root = Path(tempfile.mkdtemp(prefix="bb-ray-"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    port, nodes = free_port(), []
    try:
        nodes.append(ray_start(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                                f"--temp-dir={root / 'head'}"], root / "head.log", env))
        wait_started(nodes[0], root / "head.log")
        nodes.append(ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={root / 'node2'}"],
                               root / "node2.log", env))
        wait_started(nodes[1], root / "node2.log")
        yield f"127.0.0.1:{port}", env, {"head": root / "head", "node2": root / "node2"}
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(root, ignore_errors=True)


def worker_pids(temp_dir: Path) -> set[int]:
    """The pids of the Ray workers a node started (each has a core-worker log in its folder)."""
    return {int(p.stem.rsplit("_", 1)[1]) for p in temp_dir.glob("session_*/logs/python-core-worker-*_*.log")}


@pytest.mark.slow
def test_smoke_on_a_two_node_cluster_equals_local(two_node_cluster, tmp_path):
    """The smoke suite (one cell: every stage kind, all nine metrics) run by `benchbase run
    --executor ray -x address=HEAD:PORT` on a two-node cluster: the same results.jsonl as the
    local executor, with stages computed on both nodes."""
    import benchbase

    address, env, temp_dirs = two_node_cluster
    text = (Path(benchbase.__file__).parent / "suites" / "smoke.toml").read_text()
    one = 'dataset = { name = "sample", identities = ["astronaut"] }'
    assert 'dataset = { name = "sample" }' in text
    suite_file = tmp_path / "smoke.toml"
    suite_file.write_text(text.replace('dataset = { name = "sample" }', one)
                          + 'cells = [{ attack = "noise", purifier = "jpeg" }]\n')
    env = {**env, "OMP_NUM_THREADS": "1"}  # the local run computes with one thread, as a 1-CPU Ray task
    base = [sys.executable, "-m", "benchbase.cli", "run", str(suite_file), "--no-progress"]
    runs = {}
    for name, extra in (("local", []), ("cluster", ["--executor", "ray", "-x", f"address={address}"])):
        proc = subprocess.run([*base, "--run-dir", str(tmp_path / name), *extra], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        runs[name] = records_of(tmp_path / name)
    assert len(runs["local"]) == 9 and runs["cluster"] == runs["local"]
    info = json.loads((tmp_path / "cluster" / "run.json").read_text())
    assert info["executor"]["name"] == "ray" and info["executor"]["stages"]["failed"] == 0
    # both nodes computed stages (a stage's _done.json names the worker pid; a node's folder its workers)
    pids = {json.loads(m.read_text())["pid"] for m in (tmp_path / "cluster" / "store").glob("*/*/*/_done.json")}
    on = {name: pids & worker_pids(folder) for name, folder in temp_dirs.items()}
    assert on["head"] and on["node2"] and on["head"] | on["node2"] == pids, (on, pids)
