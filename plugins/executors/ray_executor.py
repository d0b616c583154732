"""The Ray executor: one Ray task per stage of the grid, dependencies following the stage graph.

The driver asks the session for the plan (the part of the graph not in the store), submits
one task per stage with its upstream stages' outcomes as arguments (so Ray schedules a stage
only after its inputs exist, on any node) and hands every outcome back to the session, which
assembles the records from the store — exactly what the local executor does in one process.

A task receives only JSON-able data (``session.worker_job``, the stage's ``NodeAddress``) and
opens the same session in the worker (``benchbase.pipeline.open_session``, once per worker
process), so no torch module is ever pickled and every worker loads models from its own disk.

Ray is imported inside ``RayExecutor.execute`` only: the core and ``benchbase plugins`` never
need it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from benchbase.components import Executor, Params
from benchbase.errors import ConfigError
from benchbase.graph import Outcome
from benchbase.records import Stage

GPU_STAGES = (Stage.PROTECT.value, Stage.PURIFY.value, Stage.PERSONALIZE.value, Stage.GENERATE.value)
# environment a worker needs to see the same plugins, caches and offline switches as the driver
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "OMP_NUM_THREADS")


def run_stage(job: dict, address, *upstream: Outcome) -> Outcome:
    """A Ray task: compute one stage whose upstream stages are finished (their outcomes are the
    arguments). A failed upstream fails this stage with the same error, as in the local executor."""
    from benchbase.pipeline import open_session

    return open_session(job).run_stage(address, upstream)


def _quiet_ray() -> None:
    """Drop the one Ray warning a normal run gets on every start: that Ray turned on its token
    authentication for the local instance (its secure default, which benchbase keeps; the line only
    says how to opt out). Other warnings of that logger still show."""
    from benchbase._quiet import DropMessages

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, DropMessages) for f in log.filters):
        log.addFilter(DropMessages("Token authentication is enabled for this Ray cluster"))


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
    runs on the CPU. Shared stages are computed once cluster-wide: the plan dedupes them by key
    and the store's lock guards the ones a component computes itself (class images). A worker
    that dies is retried ``max_retries`` times; a stage writes atomically, and records are
    assembled by the driver, so a retry never duplicates a record.

    The run folder and the store must be on a filesystem every worker sees at the same path
    (docs/cluster.md: Slurm, Kubernetes, what each node needs, resuming).
    """

    in_process = False  # the driver plans and records; workers compute

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

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("ray") is None:
            return "Ray is not installed (pip install 'benchbase[ray]')"
        return None

    # -- setup --------------------------------------------------------------------------
    def _ray(self):
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("the ray executor needs Ray: pip install 'benchbase[ray]'") from exc
        return ray

    def worker_env(self, modules: list[str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.update({k: v for k, v in os.environ.items() if k.startswith("BENCHBASE_")})
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

    def execute(self, session) -> None:
        ray = self._ray()
        p = self.params
        started_ray = False
        if not ray.is_initialized():
            _quiet_ray()
            # WARNING: Ray's INFO lines ("Started a local Ray instance.") are not benchbase's; its warnings
            # and errors still show
            kwargs: dict[str, Any] = {"address": p.address, "include_dashboard": False,
                                      "logging_level": logging.WARNING}
            if p.address is None:
                kwargs.update(num_cpus=p.num_cpus, num_gpus=p.num_gpus)
            try:
                ray.init(**kwargs)
            except Exception as exc:
                raise ConfigError(f"could not start or join Ray (address {p.address!r}): "
                                  f"{type(exc).__name__}: {exc}") from exc
            started_ray = True
        try:
            self._execute(ray, session)
        finally:
            if started_ray:
                ray.shutdown()

    def _use_gpu(self, ray, device_request: str) -> bool:
        request = str(device_request)
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
    def _execute(self, ray, session) -> None:
        p = self.params
        use_gpu = self._use_gpu(ray, session.device_request)
        if use_gpu:  # a CPU head node: records name the workers' device
            session.use_device_label("cuda")
        session.executor_info(address=p.address, gpu=use_gpu)
        env = self.worker_env(session.plugin_modules())
        plan = session.plan()
        nodes = plan.nodes
        # GPU tasks get a fresh worker process each (max_calls=1, Ray's own default for GPU functions,
        # which .options() cannot set): torch fixes its CUDA devices at initialisation, so a reused
        # worker would keep using the GPU of its first task
        remotes = {False: ray.remote(run_stage),
                   True: ray.remote(num_gpus=p.gpus_per_task, max_calls=1)(run_stage)}
        refs: dict[str, Any] = {}
        pending: dict[Any, str] = {}
        outcomes: dict[str, Outcome] = {}
        try:
            for key, node in nodes.items():
                device, resources = self.placement(node.stage, use_gpu, session.device_request)
                options = {"num_cpus": p.cpus_per_task, "max_retries": p.max_retries,
                           "retry_exceptions": False, "name": f"benchbase:{node.stage}:{key[:8]}",
                           "runtime_env": {"env_vars": env}, **resources}
                remote = remotes["num_gpus" in resources]
                refs[key] = remote.options(**options).remote(session.worker_job(device), node.address,
                                                             *(refs[d] for d in node.deps))
                pending[refs[key]] = key
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                for ref in ready:
                    key = pending.pop(ref)
                    node = nodes[key]
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker died more than max_retries times
                        failed = [outcomes[d] for d in node.deps if not outcomes.get(d, Outcome(d, "")).ok]
                        out = (failed[0].failed_downstream(key, node.stage) if failed else
                               Outcome(key, node.stage, ok=False, cause=str(exc).splitlines()[0],
                                       error=f"{node.stage} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"))
                    outcomes[key] = out
                    session.stage_done(out, visibility_timeout=p.visibility_timeout)
                # "running": submitted stages whose inputs are all finished (executing or queued for resources)
                session.progress(running=sum(1 for k in pending.values() if all(d in outcomes for d in nodes[k].deps)))
        finally:
            if pending:  # interrupted: stop the stages in flight (their temporaries are cleaned next run)
                for ref in pending:
                    try:
                        ray.cancel(ref, force=True)
                    except (ray.exceptions.RayError, ValueError, TypeError):  # already finished or gone
                        continue
