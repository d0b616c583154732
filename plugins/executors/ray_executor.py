"""The Ray executor: one Ray task per stage of the grid, dependencies following the stage graph.

The driver plans the part of the graph that is not in the store (``Runner.plan``), submits
one task per stage with its upstream stages' object refs as arguments (so Ray schedules a
stage only after its inputs exist, on any node), and assembles the records itself from the
store once a cell's stages have finished — exactly the records the local runner writes.

A task receives only JSON-able data (the suite as parsed from its file, the stage's
``NodeAddress``) and rebuilds a ``Runner`` in the worker (cached per worker process), so no
torch module is ever pickled and every worker loads models from its own disk/cache.

Ray is imported inside ``RayExecutor.run`` only: the core and ``benchbase plugins`` never
need it.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pydantic import Field

from benchbase.components import Executor, Params
from benchbase.errors import ConfigError

GPU_STAGES = ("protect", "purify", "personalize", "generate")
# environment a worker needs to see the same plugins, caches and offline switches as the driver
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "OMP_NUM_THREADS")


# ---------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------

def file_lock(root: Path):
    """``stage_lock`` for workers sharing a store: an exclusive ``flock`` on a file under
    ``<store>/.locks``. The kernel (or the NFS lock manager) drops the lock when the holding
    process dies, so a killed worker never blocks its retry."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Windows; stages then rely on atomic renames only
        return lambda stage, key: nullcontext()

    @contextmanager
    def lock(stage: str, key: str):
        path = Path(root) / ".locks" / f"{stage}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return lock


_RUNNERS: dict[tuple, Any] = {}  # one Runner per (suite, run, store, device) per worker process


def worker_runner(job: dict):
    ident = (job["suite_hash"], job["run_dir"], job["store"], job["device"])
    runner = _RUNNERS.get(ident)
    if runner is None:
        from benchbase.pipeline import Runner
        from benchbase.suite import parse_suite

        suite = parse_suite(job["suite_data"], job["suite_source"])
        runner = Runner(suite, job["run_dir"], store_dir=job["store"], progress=False, device=job["device"])
        runner.stage_lock = file_lock(runner.store.root)
        _RUNNERS[ident] = runner
    return runner


def run_stage(job: dict, address, *upstream: dict) -> dict:
    """A Ray task: compute one stage whose upstream stages are finished (their outcomes are the
    arguments). A failed upstream fails this stage with the same error, as in the local runner."""
    for out in upstream:
        if not out["ok"]:
            return {**out, "key": address.key, "stage": address.stage, "executed": {}, "cached": {},
                    "seconds": 0.0, "upstream_failed": True}
    return worker_runner(job).run_node(address)


# ---------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------

def _module_root(name: str) -> str | None:
    """The sys.path entry a module was imported from (to put on the workers' PYTHONPATH)."""
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    root = Path(file).resolve().parent
    depth = name.count(".") + (1 if Path(file).name == "__init__.py" else 0)
    for _ in range(depth):
        root = root.parent
    return str(root)


class RayExecutor(Executor):
    """Runs every stage of the grid as a Ray task (https://docs.ray.io).

    Resources come from the stage: ``gpu_stages`` (fine-tuning, attacks, purifiers, sampling)
    ask for ``gpus_per_task`` GPUs when the suite runs on CUDA, scoring asks for CPUs only and
    runs on the CPU. Shared stages are computed once cluster-wide: the graph dedupes them by key
    and a file lock in the store guards the ones a component computes itself (class images).
    A worker that dies is retried ``max_retries`` times; a stage writes atomically, and records
    are assembled by the driver, so a retry never duplicates a record.

    The run folder and the store must be on a filesystem every worker sees at the same path.
    """

    class Params(Params):
        address: str | None = None  # None: start a local Ray instance; "auto" or "ray://host:10001": join one
        num_cpus: int | None = Field(None, ge=1)  # for a local instance (default: all cores)
        num_gpus: int | None = Field(None, ge=0)  # for a local instance (default: all GPUs)
        max_retries: int = Field(3, ge=0)  # retries of a task whose worker died
        gpu_stages: list[str] = Field(default_factory=lambda: list(GPU_STAGES))
        gpus_per_task: float = Field(1.0, gt=0)  # < 1 packs several small stages on one GPU
        cpus_per_task: float = Field(1.0, gt=0)
        env_vars: dict[str, str] = Field(default_factory=dict)  # extra environment for the workers
        visibility_timeout: float = Field(120.0, ge=0)  # seconds to wait for a worker's files on NFS

    # -- setup --------------------------------------------------------------------------
    def _ray(self):
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("the ray executor needs Ray: pip install 'benchbase[ray]'") from exc
        return ray

    def worker_env(self, runner) -> dict[str, str]:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.update({k: v for k, v in os.environ.items() if k.startswith("BENCHBASE_")})
        modules = runner.pm.registered_modules()
        unnamed = [m[1:] for m in modules if m.startswith("?")]
        if unnamed:
            raise ConfigError(f"plugin(s) {', '.join(unnamed)} were registered as objects in this process, "
                              "which Ray workers cannot import: register a module instead, or install the "
                              "plugin, or name its module in BENCHBASE_PLUGIN_MODULES")
        extra = [m for m in os.environ.get("BENCHBASE_PLUGIN_MODULES", "").split(",") if m.strip()]
        if modules:
            env["BENCHBASE_PLUGIN_MODULES"] = ",".join(dict.fromkeys([*extra, *modules]))
            roots = [r for r in (_module_root(m) for m in modules) if r]
            path = [*roots, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
            env["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys(path) if p)
        env.update(self.params.env_vars)
        return env

    def run(self, runner):
        from benchbase.pipeline import RunSummary

        ray = self._ray()
        p = self.params
        started_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": p.address, "include_dashboard": False}
            if p.address is None:
                kwargs.update(num_cpus=p.num_cpus, num_gpus=p.num_gpus)
            try:
                ray.init(**kwargs)
            except Exception as exc:
                raise ConfigError(f"could not start or join Ray (address {p.address!r}): "
                                  f"{type(exc).__name__}: {exc}") from exc
            started_ray = True
        try:
            return self._run(ray, runner, RunSummary)
        finally:
            if started_ray:
                ray.shutdown()

    def _use_gpu(self, ray, runner) -> bool:
        request = str(runner.device_request)
        gpus = ray.cluster_resources().get("GPU", 0)
        if request.startswith("cuda"):
            if not gpus:
                raise ConfigError(f"the suite asks for device {request!r} but the Ray cluster has no GPU")
            return True
        return request == "auto" and gpus > 0

    def placement(self, stage: str, use_gpu: bool, device_request: str) -> tuple[str, dict]:
        """The device a stage's worker uses and the extra resources its task asks Ray for."""
        if use_gpu and stage in self.params.gpu_stages:
            # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned: the task's GPU is cuda:0
            return "cuda", {"num_gpus": self.params.gpus_per_task}
        # scoring (and every stage when there is no GPU) runs on the CPU; Ray hides the GPUs from it
        return ("cpu" if use_gpu else str(device_request)), {}

    # -- the run ------------------------------------------------------------------------
    def _run(self, ray, runner, RunSummary):
        p = self.params
        runner.driver = True  # the driver plans and assembles; it never computes a stage itself
        start, started = time.perf_counter(), time.time()
        runner.run_dir.mkdir(parents=True, exist_ok=True)
        runner.store.clean_temporaries()
        use_gpu = self._use_gpu(ray, runner)
        if use_gpu and runner.device.type != "cuda":  # a CPU head node: records name the workers' device
            import torch

            runner.device = torch.device("cuda")
        suite = runner.suite
        base_job = {"suite_data": suite.raw, "suite_source": suite.source, "suite_hash": suite.hash,
                    "run_dir": str(runner.run_dir.resolve()), "store": str(runner.store.root.resolve())}

        def job_for(stage: str) -> tuple[dict, dict]:
            device, resources = self.placement(stage, use_gpu, runner.device_request)
            return {**base_job, "device": device}, resources

        plan = runner.plan()
        nodes = plan.nodes
        env = self.worker_env(runner)
        # GPU tasks get a fresh worker process each (max_calls=1, Ray's own default for GPU functions,
        # which .options() cannot set): torch fixes its CUDA devices at initialisation, so a reused
        # worker would keep using the GPU of its first task
        remotes = {False: ray.remote(run_stage),
                   True: ray.remote(num_gpus=p.gpus_per_task, max_calls=1)(run_stage)}
        counts = {"total": len(nodes), "done": 0, "failed": 0, "running": 0, "cached": sum(plan.cached.values())}

        def write_status(status: str, extra: dict | None = None):
            info = {"executor": {"name": "ray", "stages": dict(counts), "extra": {"address": p.address, "gpu": use_gpu}}}
            runner.write_run_json(status, started, {**info, **(extra or {})})

        runner.records = []
        records: dict[int, list[dict]] = {}
        outcomes: dict[str, dict] = {}
        waiting = {c.index: set(c.needs) for c in plan.cells}
        executed: Counter = Counter()
        cached: Counter = Counter(plan.cached)

        def finish_cell(index: int):
            cell = plan.cells[index]
            for key in cell.needs:  # on NFS a worker's rename may take a moment to show here
                out = outcomes.get(key)
                if out and out["ok"] and nodes[key].stage == "score":
                    self._wait_visible(runner, "score", key)
            records[index] = runner.cell_records(cell, outcomes)
            runner.records = [r for i in sorted(records) for r in records[i]]
            runner.write_results()

        write_status("running")
        bar = runner.progress(total=len(nodes), desc=f"{suite.name}: stages", unit="stage")
        refs: dict[str, Any] = {}
        pending: dict[Any, str] = {}
        status = "interrupted"
        try:
            for index, need in waiting.items():
                if not need:  # everything in the store already, or the identity failed to load
                    finish_cell(index)
            for key, node in nodes.items():
                job, resources = job_for(node.stage)
                options = {"num_cpus": p.cpus_per_task, "max_retries": p.max_retries,
                           "retry_exceptions": False, "name": f"benchbase:{node.stage}:{key[:8]}",
                           "runtime_env": {"env_vars": env}, **resources}
                remote = remotes["num_gpus" in resources]
                refs[key] = remote.options(**options).remote(job, node.address, *(refs[d] for d in node.deps))
                pending[refs[key]] = key
            last_write = 0.0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                for ref in ready:
                    key = pending.pop(ref)
                    node = nodes[key]
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker died more than max_retries times
                        upstream = [outcomes[d] for d in node.deps if not outcomes.get(d, {"ok": True})["ok"]]
                        out = ({**upstream[0], "key": key, "stage": node.stage} if upstream else
                               {"key": key, "stage": node.stage, "ok": False, "unavailable": False, "cause": None,
                                "error": f"{node.stage} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"})
                        out.update(executed={}, cached={})
                    outcomes[key] = out
                    executed.update(out.get("executed", {}))
                    cached.update(out.get("cached", {}))
                    counts["done" if out["ok"] else "failed"] += 1
                    bar.update(1)
                    for index in dict.fromkeys(node.cells):
                        waiting[index].discard(key)
                        if not waiting[index] and index not in records:
                            finish_cell(index)
                # "running": submitted stages whose inputs are all finished (executing or queued for resources)
                counts["running"] = sum(1 for k in pending.values() if all(d in outcomes for d in nodes[k].deps))
                bar.set_postfix_str(f"done {counts['done']}, running {counts['running']}, failed {counts['failed']}",
                                    refresh=False)
                if ready or time.time() - last_write > 10:
                    write_status("running")
                    last_write = time.time()
            status = "finished"
        finally:
            if pending:  # interrupted: stop the stages in flight (their temporaries are cleaned next run)
                for ref in pending:
                    try:
                        ray.cancel(ref, force=True)
                    except (ray.exceptions.RayError, ValueError, TypeError):  # already finished or gone
                        continue
            bar.close()
            runner.records = [r for i in sorted(records) for r in records[i]]
            runner.write_results()
            summary = RunSummary(runner.run_dir, runner.records, dict(executed), dict(cached),
                                 time.perf_counter() - start)
            write_status(status, {"seconds": round(summary.seconds, 2), "executed": summary.executed,
                                  "cached": summary.cached, "failed_records": len(summary.failed)})
        return summary

    def _wait_visible(self, runner, stage: str, key: str) -> None:
        deadline = time.time() + self.params.visibility_timeout
        while not runner.store.done(stage, key) and time.time() < deadline:
            time.sleep(0.5)
