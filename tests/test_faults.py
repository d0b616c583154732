"""Kills, Ctrl-C, full and read-only disks, and concurrent runs — with real processes and signals.

The kill test runs a small suite (every stage kind: clean, protect, purify, class images,
personalize, generate, score) once uninterrupted, recording every *fault point* it passes (a
stage starting, each PNG written into a stage, a stage's files complete, its ``_done.json``
written, its folder published, results.jsonl and run.json half-written). Then it runs the same
suite again and again in a fresh run folder and store, SIGKILLing the process at one fault point
per category and at random moments, restarting each time, and checks after every kill that no
stage is complete with files missing and that results.jsonl holds only whole, unique records equal
to the uninterrupted run's; the final results.jsonl equals it record for record.

Processes come from a ``forkserver`` that has imported benchbase and torch once, so a restart
costs milliseconds, not an interpreter start.

These tests take a few minutes: ``-m "not faults"`` or ``BENCHBASE_SKIP_FAULTS=1`` skips them
locally; CI runs them (plain ``pytest``).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchbase import hookimpl
from benchbase.components import Purifier
from benchbase.records import DONE, StageMeta

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(os.environ.get("BENCHBASE_SKIP_FAULTS") == "1", reason="BENCHBASE_SKIP_FAULTS=1"),
]

HERE = Path(__file__).resolve().parent
PLUGIN = Path(__file__).stem  # this module, registered as a plugin in child processes

SUITE = {
    "name": "faults", "backend": {"name": "tiny"},
    "dataset": {"name": "sample", "identities": ["astronaut"], "images_per_set": 2},
    "attacks": ["none", {"name": "noise", "eps": 8}], "purifiers": ["jpeg"],
    "personalizers": [{"name": "dreambooth", "max_train_steps": 1, "num_class_images": 1, "class_inference_steps": 2,
                       "num_images_per_prompt": 1, "num_inference_steps": 2}],
    "metrics": ["psnr", "ref-rmse"],
}
GATED = {**SUITE, "attacks": [{"name": "noise", "eps": 8}], "purifiers": ["gate"],
         "metrics": [{"name": "psnr", "of": "purified"}]}


# ---------------------------------------------------------------------------------------
# A purifier that waits at a gate (for the concurrency tests)
# ---------------------------------------------------------------------------------------


class Gate(Purifier):
    """Writes ``$BENCHBASE_TEST_GATE/started-<pid>``, then waits for ``$BENCHBASE_TEST_GATE/open``."""

    def purify(self, images, ctx):
        gate = Path(os.environ["BENCHBASE_TEST_GATE"])
        (gate / f"started-{os.getpid()}").write_text("")
        deadline = time.time() + 300
        while not (gate / "open").exists() and time.time() < deadline:
            time.sleep(0.1)
        return images


@hookimpl
def register_purifiers(register):
    register("gate", Gate)


# ---------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------


class Faults:
    """Fault points, patched into the child's store and run-file writes. ``kill_at``: SIGKILL this
    process at the first point whose index in the reference trace is at least ``kill_at``;
    ``trace``: append every point passed to this file (the reference run)."""

    def __init__(self, kill_at: int | None, reference: dict | None, trace: Path | None, killed: Path | None):
        self.kill_at, self.reference, self.trace, self.killed = kill_at, reference or {}, trace, killed
        self.stage: list[tuple[str, str]] = []
        self.pngs: dict[str, int] = {}

    def point(self, *ident) -> None:
        ident = "|".join(str(x) for x in ident)
        if self.trace is not None:
            with open(self.trace, "a") as fh:
                fh.write(ident + "\n")
        if self.kills(ident):
            if self.killed is not None:
                self.killed.write_text(ident)
            os.kill(os.getpid(), signal.SIGKILL)

    def kills(self, ident: str) -> bool:
        index = self.reference.get(ident)
        return self.kill_at is not None and index is not None and index >= self.kill_at

    def install(self) -> None:
        import benchbase.images
        import benchbase.pipeline
        from benchbase.store import Store

        faults = self
        run, write_meta, publish = Store._run, Store._write_meta, Store._publish
        save_png, write_text = benchbase.images.atomic_save_png, benchbase.pipeline.atomic_write_text

        def _run(store, stage, key, parts, fn, tmp):
            def compute(folder):
                info = fn(folder)
                faults.point(stage, "files", key)  # every file written, no _done.json yet
                return info

            faults.point(stage, "start", key)
            faults.stage.append((stage, key))
            try:
                return run(store, stage, key, parts, compute, tmp)
            finally:
                faults.stage.pop()

        def _write_meta(store, tmp, meta):
            write_meta(store, tmp, meta)
            faults.point(meta.stage, "meta", meta.key)  # _done.json written, folder not yet renamed

        def _publish(store, tmp, final):
            publish(store, tmp, final)
            faults.point(final.parts[-3], "published", final.name)

        def atomic_save_png(img, path):
            save_png(img, path)
            if faults.stage:  # a stage folder half written: some of its PNGs exist
                stage, key = faults.stage[-1]
                faults.pngs[key] = faults.pngs.get(key, 0) + 1
                faults.point(stage, f"png{faults.pngs[key]}", key)

        def atomic_write_text(path, text):
            if path.name == "results.jsonl":  # run.json is written by the same function
                ident = f"{path.name}|{text.count(chr(10))}"
                if faults.kills(ident):
                    tmp = path.parent / f".{path.name}.killed"  # what a write killed halfway leaves
                    tmp.write_text(text[: len(text) // 2])
                faults.point(ident)
            write_text(path, text)

        Store._run, Store._write_meta, Store._publish = _run, _write_meta, _publish
        benchbase.images.atomic_save_png = atomic_save_png
        benchbase.pipeline.atomic_write_text = atomic_write_text


def child_run(run_dir: str, store: str | None, suite: dict, env: dict, kill_at: int | None = None,
              reference: dict | None = None, trace: str | None = None, killed: str | None = None) -> None:
    """A run in this (forked) process, optionally with fault points installed."""
    os.environ.update(env)
    import threading

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(1)  # the same float reductions in every process
    tqdm.set_lock(threading.RLock())  # not a multiprocessing lock, which a SIGKILL would leak
    from benchbase.pipeline import Runner
    from benchbase.suite import parse_suite

    if kill_at is not None or trace is not None:
        Faults(kill_at, reference, Path(trace) if trace else None, Path(killed) if killed else None).install()
    Runner(parse_suite(suite), Path(run_dir), store_dir=Path(store) if store else None, progress=False).run()


@pytest.fixture(scope="module")
def procs():
    """Processes forked from a server that imported benchbase, torch and diffusers once."""
    ctx = multiprocessing.get_context("forkserver")
    # modules a run of SUITE imports (a missing one is only imported in each child instead)
    ctx.set_forkserver_preload(["torch", "diffusers", "benchbase.pipeline", "benchbase_plugins.backends.stable_diffusion",
                                "benchbase_plugins.datasets.sample", "benchbase_plugins.attacks.baseline",
                                "benchbase_plugins.purifiers.classic", "benchbase_plugins.personalizers.dreambooth",
                                "benchbase_plugins.metrics.fidelity", PLUGIN])
    return ctx


def child_env(tmp: Path) -> dict:
    return {"BENCHBASE_PLUGIN_MODULES": PLUGIN, "BENCHBASE_TEST_GATE": str(tmp),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def start(procs, *args, **kwargs):
    p = procs.Process(target=child_run, args=args, kwargs=kwargs)
    p.start()
    return p


def finish(p, timeout: float = 600) -> int:
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        raise AssertionError("child process did not finish in time")
    return p.exitcode


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def cell_metric(rec: dict) -> tuple:
    return (rec["identity"], rec["seed"], rec["attack"], rec["purifier"], rec["defense"], rec["personalizer"],
            rec["metric"])


def check_store(store: Path) -> int:
    """Every complete stage folder has every file its _done.json lists; returns how many there are."""
    n = 0
    for done in store.glob(f"*/*/*/{DONE}"):
        folder = done.parent
        if folder.name.startswith("."):
            continue
        meta = StageMeta.from_json(json.loads(done.read_text()))
        assert meta.key == folder.name and meta.stage == folder.parts[-3], folder
        assert meta.files and not meta.missing_files(folder), (folder, meta.missing_files(folder))
        n += 1
    return n


def check_results(run_dir: Path, reference: list[dict]) -> int:
    """results.jsonl: whole lines, unique (cell, metric), each equal to the uninterrupted run's."""
    by_cell = {cell_metric(r): r for r in reference}
    recs = records(run_dir)  # a half-written line would fail to parse here
    seen = [cell_metric(r) for r in recs]
    assert len(seen) == len(set(seen)), "duplicated record"
    for rec in recs:
        assert rec == by_cell[cell_metric(rec)]
    return len(recs)


@pytest.fixture(scope="module")
def reference(procs, tmp_path_factory):
    """The uninterrupted run, with the trace of every fault point it passed."""
    root = tmp_path_factory.mktemp("faults-reference")
    trace = root / "trace.txt"
    p = start(procs, str(root / "run"), None, SUITE, child_env(root), None, None, str(trace))
    assert finish(p) == 0
    points = trace.read_text().splitlines()
    return root, records(root / "run"), points


# ---------------------------------------------------------------------------------------
# SIGKILL at many moments
# ---------------------------------------------------------------------------------------


def category(point: str) -> str:
    """protect|start|<key> -> protect:start; results.jsonl|6 -> results.jsonl; png3 -> png."""
    parts = point.split("|")
    if parts[0] == "results.jsonl":
        return parts[0]
    return f"{parts[0]}:{parts[1].rstrip('0123456789')}"


def test_sigkill_at_any_moment_loses_nothing(procs, reference, tmp_path):
    ref_root, ref_records, points = reference
    assert ref_records and all(r["status"] == "ok" for r in ref_records)
    index = {}
    for i, p in enumerate(points):
        index.setdefault(p, i)
    # kills at random points of 20 categories covering every stage kind (clean, protect, purify,
    # class images, personalize, generate, score) and every moment of a stage (starting, half its
    # PNGs written, files complete, _done.json written, published), and results.jsonl half-written
    rng = random.Random(int(os.environ.get("BENCHBASE_FAULTS_SEED", "0")))
    by_category: dict[str, list[int]] = {}
    for p, i in index.items():
        by_category.setdefault(category(p), []).append(i)
    kinds = {c.split(":")[0] for c in by_category if ":" in c}
    phases = {c.split(":")[1] for c in by_category if ":" in c}
    assert kinds == {"clean", "protect", "purify", "class_images", "personalize", "generate", "score"}
    assert phases == {"start", "png", "files", "meta", "published"} and "results.jsonl" in by_category
    order = sorted(by_category)
    rng.shuffle(order)
    chosen, kinds_left, phases_left = ["results.jsonl"], set(kinds), set(phases)
    for c in order:
        if ":" in c and (c.split(":")[0] in kinds_left or c.split(":")[1] in phases_left):
            chosen.append(c)
            kinds_left.discard(c.split(":")[0])
            phases_left.discard(c.split(":")[1])
    chosen += [c for c in order if c not in chosen][: max(0, 20 - len(chosen))]
    targets = sorted(rng.choice(by_category[c]) for c in chosen)
    run_dir, store = tmp_path / "run", tmp_path / "store"
    env = child_env(tmp_path)
    kills, timed, restarts, seen = 0, 0, 0, set()
    # kills at random times come after the kills at fault points: on a fast machine a process
    # that runs for a random second or two can finish the stages a later fault point targets
    timed_kills = [rng.uniform(0.2, 2.5) for _ in range(max(1, len(targets) // 5))]
    for n, target in enumerate(targets):
        killed = tmp_path / "killed.txt"
        killed.unlink(missing_ok=True)
        p = start(procs, str(run_dir), str(store), SUITE, env, target, index, None, str(killed))
        code = finish(p)
        restarts += 1
        if code == -signal.SIGKILL:
            kills += 1
            seen.add(category(killed.read_text()))
        else:
            assert code == 0
        check_store(store)
        check_results(run_dir, ref_records)
    for delay in timed_kills:  # a kill at a random time, wherever the process is
        p = start(procs, str(run_dir), str(store), SUITE, env)
        time.sleep(delay)
        p.kill()
        code = finish(p)
        restarts += 1
        if code == -signal.SIGKILL:
            kills, timed = kills + 1, timed + 1
        check_store(store)
        check_results(run_dir, ref_records)
    p = start(procs, str(run_dir), str(store), SUITE, env)
    assert finish(p) == 0
    final = records(run_dir)
    assert final == ref_records  # record for record, in order: nothing lost, nothing duplicated
    assert check_store(store) == check_store(ref_root / "run" / "store")
    assert not list(store.glob("*/*/.*")) and not list(run_dir.glob(".*.json*"))  # no temporaries left
    assert kills >= 20, (kills, len(targets))
    assert {c.split(":")[0] for c in seen if ":" in c} == kinds  # every stage kind was killed in
    assert {c.split(":")[1] for c in seen if ":" in c} == phases and "results.jsonl" in seen
    print(f"\nfault injection: {kills} SIGKILLs ({timed} at random times, {kills - timed} at fault points in "
          f"{len(seen)} categories), {restarts + 1} starts, {len(final)} records, records lost 0, duplicated 0")


# ---------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------


def toml_value(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def suite_file(tmp: Path, suite: dict) -> Path:
    path = tmp / f"{suite['name']}.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in suite.items()))
    return path


def cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "benchbase", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a backgrounded test session ignores SIGINT; the child must not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def cli_env(tmp: Path) -> dict:
    return {**os.environ, **child_env(tmp)}


def test_ctrl_c_prints_one_line_and_the_run_resumes(procs, reference, tmp_path):
    _, ref_records, _ = reference
    run_dir = tmp_path / "run"
    proc = cli("run", str(suite_file(tmp_path, SUITE)), "--run-dir", str(run_dir), "--no-progress",
               env=cli_env(tmp_path))
    try:
        deadline = time.time() + 300
        while not list((run_dir / "store" / "purify").glob(f"*/*/{DONE}")) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "run the same command again" in lines[0], err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    check_store(run_dir / "store")
    check_results(run_dir, ref_records)
    p = start(procs, str(run_dir), None, SUITE, child_env(tmp_path))
    assert finish(p) == 0
    assert records(run_dir) == ref_records


# ---------------------------------------------------------------------------------------
# Full and read-only disks
# ---------------------------------------------------------------------------------------


def test_full_disk_fails_the_cell_in_one_line_and_the_next_run_resumes(reference, tmp_path, monkeypatch):
    """ENOSPC while writing a stage (injected at the write): the cells that need it are recorded
    failed with that cause, nothing half-written is visible, the next run completes them."""
    from benchbase.pipeline import Runner
    from benchbase.plugins import PluginManager
    from benchbase.store import Store
    from benchbase.suite import parse_suite

    _, ref_records, _ = reference
    real = Store._write_meta

    def full(store, tmp, meta):
        if meta.stage == "personalize":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / DONE))
        real(store, tmp, meta)

    monkeypatch.setattr(Store, "_write_meta", full)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = Runner(parse_suite(SUITE), tmp_path, manager=PluginManager(), progress=False).run()
        failed = [r for r in first.records if r["status"] == "failed"]
        assert {r["metric"] for r in failed} == {"ref-rmse"}  # psnr reads only the protection
        for rec in failed:
            assert "\n" not in rec["error"] and "no space left on device" in rec["error"]
            assert rec["error"].startswith("personalize failed: DiskError: cannot write the store")
        assert not (tmp_path / "errors").exists()  # a full disk is not a bug: no traceback file
        assert not list((tmp_path / "store").glob("*/*/.*"))  # nothing half-written
        assert not list((tmp_path / "store").glob("personalize/*/*"))
        check_store(tmp_path / "store")
        monkeypatch.setattr(Store, "_write_meta", real)  # space freed
        second = Runner(parse_suite(SUITE), tmp_path, manager=PluginManager(), progress=False).run()
    finally:
        torch.set_num_threads(threads)
    assert set(second.executed) == {"personalize", "generate", "score"}  # only what had failed
    assert second.records == ref_records


def test_results_on_a_full_disk_is_one_clear_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import benchbase.pipeline
    from benchbase.cli import main

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(benchbase.pipeline, "atomic_write_text", full)
    suite = {**SUITE, "attacks": ["none"], "purifiers": ["none"], "metrics": ["psnr"]}
    result = CliRunner().invoke(main, ["run", str(suite_file(tmp_path, suite)), "--run-dir", str(tmp_path / "run"),
                                       "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "cannot write" in lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def tmpfs(tmp_path):
    """A 12 MB tmpfs (skips where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}); the injected "
                    "ENOSPC test covers the same path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_store_on_a_real_full_then_read_only_disk(procs, reference, tmp_path, tmpfs):
    """The store on a 12 MB tmpfs: the first fine-tuning fills it (ENOSPC), the cells that need the
    missing ones fail in one line, nothing half-written stays; read-only (EROFS) likewise; after
    remounting it larger and writable, the same command resumes and completes."""
    _, ref_records, _ = reference
    run_dir, store = tmp_path / "run", tmpfs / "store"
    p = start(procs, str(run_dir), str(store), SUITE, child_env(tmp_path))
    assert finish(p) == 0
    full = records(run_dir)
    failed = [r for r in full if r["status"] == "failed"]
    assert failed and all("no space left on device" in r["error"] and "\n" not in r["error"] for r in failed)
    assert not list(store.glob("*/*/.*"))
    check_store(store)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    p = start(procs, str(run_dir), str(store), SUITE, child_env(tmp_path))
    assert finish(p) == 0
    failed = [r for r in records(run_dir) if r["status"] == "failed"]
    assert failed and all("read-only file system" in r["error"] for r in failed)
    subprocess.run(["mount", "-o", "remount,rw,size=200m", str(tmpfs)], check=True)
    p = start(procs, str(run_dir), str(store), SUITE, child_env(tmp_path))
    assert finish(p) == 0
    assert records(run_dir) == ref_records
    check_store(store)


# ---------------------------------------------------------------------------------------
# Concurrent runs
# ---------------------------------------------------------------------------------------


def wait_for(predicate, timeout=300, what=""):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_second_run_of_a_folder_is_refused_until_the_first_dies(procs, tmp_path):
    run_dir, gate = tmp_path / "run", tmp_path
    first = start(procs, str(run_dir), None, GATED, child_env(gate))
    wait_for(lambda: list(gate.glob("started-*")), what="the first run to reach the gate")
    second = cli("run", str(suite_file(tmp_path, GATED)), "--run-dir", str(run_dir), "--no-progress",
                 env=cli_env(gate))
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2, err
    assert f"a run is in progress (pid {first.pid} on {socket.gethostname()}" in err and "Traceback" not in err
    os.kill(first.pid, signal.SIGKILL)  # the holder dies without releasing anything
    assert finish(first) == -signal.SIGKILL
    (gate / "open").write_text("")
    third = cli("run", str(suite_file(tmp_path, GATED)), "--run-dir", str(run_dir), "--no-progress",
                env=cli_env(gate))
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    assert f"took over the lock of a run that ended without releasing it (pid {first.pid}" in err
    assert [r["status"] for r in records(run_dir)] == ["ok"]


def test_runs_sharing_a_store_compute_a_stage_once_and_keep_each_others_work(procs, tmp_path):
    """A computes the gated purification; B (another run folder, the same store) starts meanwhile:
    B's start-up cleaning leaves A's temporary alone, B waits for the stage instead of computing it,
    and both record the same results."""
    store, gate = tmp_path / "store", tmp_path
    a = start(procs, str(tmp_path / "a"), str(store), GATED, child_env(gate))
    wait_for(lambda: list(gate.glob("started-*")), what="run A to reach the gate")
    (started,) = gate.glob("started-*")
    assert started.name == f"started-{a.pid}"
    temporaries = list(store.glob("purify/*/.*"))
    assert len(temporaries) == 1  # A's work in progress
    b = start(procs, str(tmp_path / "b"), str(store), GATED, child_env(gate))
    wait_for(lambda: (tmp_path / "b" / "run.json").is_file(), what="run B to start")  # B cleaned and planned
    time.sleep(1.0)
    assert temporaries[0].is_dir(), "B removed A's work in progress"
    assert len(list(gate.glob("started-*"))) == 1  # B waits on the stage's lock, it does not purify too
    (gate / "open").write_text("")
    assert finish(a) == 0 and finish(b) == 0
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["status"] for r in ra] == ["ok"] and rb == ra
    info_a = json.loads((tmp_path / "a" / "run.json").read_text())
    info_b = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info_a["executed"].get("purify") == 1 and not info_b["executed"].get("purify")
    metas = [StageMeta.from_json(json.loads(p.read_text())) for p in store.glob(f"*/*/*/{DONE}")]
    computed = {}
    for m in metas:
        computed[m.stage] = computed.get(m.stage, 0) + 1
    total = {k: info_a["executed"].get(k, 0) + info_b["executed"].get(k, 0) for k in computed}
    assert total == computed  # every stage computed by exactly one of the two runs
