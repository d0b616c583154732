"""The run: one suite, one run folder, one store — and the session an executor drives.

A run plans the part of the stage graph (``benchbase.graph``) that is not in the store yet,
hands the plan to an executor, and turns each finished cell into records
(``benchbase.records``). Every executor drives the same ``Runner`` through its narrow session
interface, so there is one traversal whatever runs the stages:

- ``plan()`` — the stages to compute, deduplicated by key, in dependency order;
- ``run_stage(address, upstream)`` — compute one stage in this process (a worker elsewhere
  opens the same session with ``open_session(job)``, ``job`` coming from ``worker_job()``);
- ``stage_done(outcome)`` — hand back a stage's ``Outcome``; cells whose stages are all done
  get their records, written to results.jsonl at once (cells in suite order);
- ``progress(running=)`` and ``executor_info(**facts)`` — what run.json and the progress bar
  show while it runs.

The run's lifecycle (run.json, results.jsonl, temporaries, the summary) belongs to
``Runner.run``, never to an executor. The local executor is the loop::

    for node in session.plan().nodes.values():
        session.stage_done(session.run_stage(node.address, [outcomes of node.deps]))

A stage that raises fails every cell that needs it, with its error, and the grid goes on.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from benchbase.components import Prompts
from benchbase.errors import BenchbaseError, ConfigError, DataError, DiskError, Unavailable
from benchbase.graph import Cell, CellPlan, Identity, Node, NodeAddress, Outcome, Plan
from benchbase.models.sd import parse_device, quiet_libraries, resolve_device, resolve_dtype
from benchbase.plugins import PluginManager, get_plugin_manager
from benchbase.records import (
    RESULTS,
    RUN_JSON,
    BackendInfo,
    ExecutorInfo,
    Record,
    RunInfo,
    Stage,
    Status,
    dumps_records,
)
from benchbase.stages import StageBuilder, derive_seed, image_names, load_generated  # noqa: F401  (public helpers)
from benchbase.store import Store, atomic_write_text, disk_error, is_disk_error, run_lock, writable_folder
from benchbase.suite import Spec, Suite, backend_label, build_components

PACKAGES = ("benchbase", "torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "pyiqa",
            "facenet-pytorch", "dlib-bin", "numpy", "pillow")


@functools.lru_cache(maxsize=1)
def _package_versions() -> tuple:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return tuple(out.items())


def package_versions() -> dict[str, str]:
    """Versions of the packages results depend on (read once per process: a run.json is
    written many times during a run)."""
    return dict(_package_versions())


@dataclass
class RunSummary:
    run_dir: Path
    records: list[dict] = field(default_factory=list)
    executed: dict = field(default_factory=dict)
    cached: dict = field(default_factory=dict)
    seconds: float = 0.0
    status: str = "finished"

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "failed"]

    @property
    def unavailable(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "unavailable"]


class Runner:
    """A suite's run in ``run_dir`` with its stages in a ``Store``; the session executors drive.

    ``in_process=False``: the stages are computed elsewhere (an executor's workers), so the
    requested device need not exist here and this process never computes a stage."""

    def __init__(self, suite: Suite, run_dir: Path, manager: PluginManager | None = None,
                 store_dir: Path | None = None, progress: bool | None = None, device: str | None = None,
                 executor: Any = None, in_process: bool | None = None, echo: Callable[[str], Any] | None = None):
        self.suite = suite
        self.run_dir = Path(run_dir)
        self.pm = manager or get_plugin_manager()
        self.progress_enabled = progress
        self._libraries_quiet = False
        self.executor = executor
        self.echo = echo or (lambda line: None)  # one-line notes for the user (a stale lock taken over)
        self.in_process = getattr(executor, "in_process", True) if in_process is None else in_process
        self.device_request = device or suite.device  # what workers resolve on their own machine
        # validate everything before writing anything: all problems at once, one line each
        problems = []
        try:
            self.device = self._device("--device" if device else suite.source)
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            self._components: dict[int, Any] = build_components(suite, self.pm)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("\n".join(problems))
        self.device_label = str(self.device)  # what records say the stages ran on
        self.dtype = resolve_dtype(suite.dtype)
        writable_folder(self.run_dir, "run folder")
        store_root = Path(store_dir) if store_dir else self.run_dir / "store"
        try:
            store_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BenchbaseError(f"cannot create the store {store_root}: {exc.strerror or exc}") from None
        # a store that exists but cannot be written is not refused here: its finished stages can
        # still be read, and a stage that must be written fails with its cause (ENOSPC, EROFS) in
        # the records of the cells that need it (docs/reliability.md)
        self.store = Store(store_root)
        self._identities: dict[str, Identity] = {}
        self.backend = self.component(suite.backend)
        self.backend_fp = self.backend.fingerprint()  # part of most keys: hash the weights' identity once
        self.dataset = self.component(suite.dataset)
        for spec in suite.attacks:
            if spec.adaptive and not getattr(self.component(spec), "supports_adaptive", False):
                raise ConfigError(f"{suite.source}: {spec.describe()}: attack {spec.name!r} is marked adaptive "
                                  "but does not support it")
        self.stages = StageBuilder(suite, self.component, self.backend, self.backend_fp, self.prompts(),
                                   self.device, self.dtype, self._progress_bar, self.store.shared_stage,
                                   self.store.root / "work", self._read, plugins=self.pm)
        self._check_surrogates()
        self._reset()

    def _check_surrogates(self) -> None:
        """An attack's ``surrogate`` works at the run's resolution (the images are loaded at the
        victim's), and its weights are hashed now: a missing model is one line before anything runs."""
        self.victim_label = model_label(self.suite.backend, self.backend, (self.suite.raw.get("backend") or {}))
        self.surrogate_labels: dict[int, str] = {}
        for attack in self.suite.attacks:
            spec = attack.surrogate
            if spec is None or id(spec) in self.surrogate_labels:
                continue
            backend = self.component(spec)
            if backend.resolution != self.backend.resolution:
                raise ConfigError(f"{self.suite.source}: {spec.where}: surrogate {spec.label!r} works at "
                                  f"{backend.resolution} px, the suite's backend at {self.backend.resolution} px: "
                                  "a protection is made at the resolution the victim fine-tunes at")
            self.stages.attack_backend(attack)
            explicit = spec.label != backend_label(spec.name, spec.params)  # the table gave a `label`
            self.surrogate_labels[id(spec)] = model_label(spec, backend, {"label": spec.label} if explicit else {})

    def _variant(self, cell: Cell) -> dict:
        """The record fields of a cell's transfer (surrogate, victim) and sweeps (see ``Record``)."""
        attack = cell.attack
        surrogate = self.surrogate_labels[id(attack.surrogate)] if attack.surrogate is not None else self.victim_label
        swept = attack.label[:-len(f"@{attack.surrogate.label}")] if attack.surrogate is not None else attack.label
        sweep = {}
        if attack.sweep is not None:
            curve = attack.base + (f"@{attack.surrogate.label}" if attack.surrogate is not None else "")
            sweep["attack"] = {"param": attack.sweep[0], "value": attack.sweep[1], "curve": curve}
        for spec in cell.purifiers:
            if spec.sweep is not None:
                curve = "+".join(s.base if s is spec else s.label for s in cell.purifiers)
                sweep["purifier"] = {"param": spec.sweep[0], "value": spec.sweep[1], "curve": curve}
        return {"surrogate": surrogate, "victim": self.victim_label, "attack_base": swept, "sweep": sweep}

    def _reset(self) -> None:
        self._plan: Plan | None = None
        self.outcomes: dict[str, Outcome] = {}
        self._records: dict[int, list[dict]] = {}
        self._texts: dict[int, str] = {}  # each finished cell's results.jsonl lines, serialised once
        self._ordered: list[dict] | None = []
        self._last_results = 0.0
        self._results_cost = 0.0
        self.executed: Counter = Counter()
        self.counts = {"total": 0, "done": 0, "failed": 0, "running": 0, "cached": 0}
        self._extra: dict = {}
        self._bar = None
        self._last_status = 0.0
        self._started = time.time()

    def _device(self, where: str) -> torch.device:
        """The suite's (or --device's) device on this machine, or one clear line. A run whose
        stages run elsewhere (``in_process=False``) may name a device only its workers have; the
        name must still be valid."""
        try:
            return resolve_device(self.device_request)
        except ConfigError as exc:
            if self.in_process:
                raise ConfigError(f"{where}: {exc}") from None
        try:  # only a label on the driver (the workers resolve it)
            return parse_device(self.device_request)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    # -- components ------------------------------------------------------------------------
    def component(self, spec: Spec):
        return self._components[id(spec)]

    def prompts(self) -> Prompts:
        base = self.dataset.prompts()
        over = self.suite.prompts
        return Prompts(instance=over.get("instance", base.instance), class_=over.get("class", base.class_),
                       eval=list(over.get("eval", base.eval)), negative=over.get("negative", base.negative),
                       identifier=base.identifier, class_noun=base.class_noun)

    def _progress_bar(self, iterable=None, **kwargs):
        # None: tqdm decides (bars on a terminal, none in CI logs)
        disable = None if self.progress_enabled is None else not self.progress_enabled
        return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)

    def identity(self, name: str) -> Identity:
        """The identity ``name`` (fingerprinted once; images loaded on first use)."""
        if name not in self._identities:
            self._identities[name] = Identity(name, self.dataset.fingerprint(name),
                                              partial(self.dataset.load, name, self.backend.resolution))
        return self._identities[name]

    def cells(self, identity: str, seed: int) -> list[Cell]:
        s = self.suite
        return [Cell(identity, seed, a, chain, d, p, at=(ai, ci, di, pi))
                for ai, a in enumerate(s.attacks) for ci, chain in enumerate(s.purifiers)
                for di, d in enumerate(s.defenses) for pi, p in enumerate(s.personalizers)
                if s.keeps(a, chain, d, p)]

    # -- session: plan -----------------------------------------------------------------------
    def plan(self) -> Plan:
        """The cells of the grid and the stages their records still need, in dependency order.
        Cells needing nothing (all in the store, or an identity that failed to load) get their
        records at once."""
        plan = Plan()
        done = lambda node: self.store.done(node.stage, node.key)  # noqa: E731
        for seed in self.suite.seeds:
            for name in self.dataset.identities():
                try:
                    ident = self.identity(name)
                except BenchbaseError as exc:  # a broken identity fails its cells, not the grid
                    for cell in self.cells(name, seed):
                        plan.cells.append(CellPlan(len(plan.cells), cell, None, error=f"dataset: {exc}"))
                    continue
                for cell in self.cells(name, seed):
                    cp = CellPlan(len(plan.cells), cell, ident, stages=self.stages.stage_keys(ident, cell))
                    plan.cells.append(cp)
                    plan.visit(self.stages.clean(ident, cell), cp.index, done)
                    for spec in self.suite.metrics:
                        node = self.stages.score(ident, cell, spec)
                        cp.scores.append(node.key)
                        plan.visit(node, cp.index, done)
        plan.link()
        self._plan = plan
        self.counts.update(total=len(plan.nodes), cached=sum(plan.cached.values()))
        self._bar = self._progress_bar(total=len(plan.nodes), desc=f"{self.suite.name}: stages", unit="stage")
        for cp in plan.cells:
            if not cp.needs:
                self._finish_cell(cp)
        self._write_status("running", force=True)
        return plan

    # -- session: compute one stage ----------------------------------------------------------
    def node_at(self, address: NodeAddress) -> Node:
        return self.stages.node_at(address, self.identity(address.identity))

    def run_stage(self, address: NodeAddress, upstream: Sequence[Outcome] = ()) -> Outcome:
        """Compute the stage at ``address`` in this process, its upstream stages being done.
        A failed upstream fails it without computing (with that stage's error)."""
        for up in upstream:
            if not up.ok:
                return up.failed_downstream(address.key, address.stage)
        if not self.in_process:
            raise RuntimeError("this session computes no stage: its executor runs them elsewhere")
        if not self._libraries_quiet:
            # before any stage builds, saves or loads a model: diffusers', transformers' and the hub's
            # own bars ("Loading pipeline components", "Writing model shards") would leak into
            # --no-progress and CI logs, and break benchbase's one bar per run on a terminal
            quiet_libraries()
            self._libraries_quiet = True
        before = Counter(self.store.executed)
        start = time.perf_counter()
        out = Outcome(key=address.key, stage=str(address.stage))
        try:
            node = self.node_at(address)
            self.store.compute(node.stage, node.key, node.parts, node.compute)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # the cells that need it fail with this one line; the grid goes on
            out.ok, out.cause = False, str(exc)
            if isinstance(exc, Unavailable):  # absent model/weights/package: the cells are unavailable
                reason = str(exc) if str(exc).startswith("unavailable") else f"unavailable: {exc}"
                out.unavailable, out.cause = True, reason
                out.error = f"{address.stage} {reason}"  # "purify unavailable: <model> — how to provide it"
            else:
                out.error = f"{address.stage} failed: {type(exc).__name__}: {exc}"
            if not isinstance(exc, BenchbaseError):
                where = self._save_traceback(address)
                if where:
                    out.error += f" (traceback in {where})"
        out.executed = dict(self.store.executed - before)
        out.seconds = round(time.perf_counter() - start, 3)
        return out

    def _save_traceback(self, address: NodeAddress) -> str | None:
        name = f"errors/{address.stage}-{address.key}.txt"
        try:
            (self.run_dir / "errors").mkdir(parents=True, exist_ok=True)
            (self.run_dir / name).write_text(traceback.format_exc(limit=-3))
            return name
        except OSError:  # a full disk must not hide the error itself
            return None

    def _read(self, node: Node, timeout: float = 60.0) -> Path:
        """The folder of a complete upstream stage (on a network filesystem a worker's rename may
        take a moment to show here: wait for it)."""
        deadline = time.time() + timeout
        while not self.store.done(node.stage, node.key):
            if time.time() > deadline:
                raise DataError(f"{node.stage} stage {node.key} is not in the store {self.store.root}")
            time.sleep(0.5)
        return self.store.path(node.stage, node.key)

    # -- session: outcomes -> records ----------------------------------------------------------
    def stage_done(self, outcome: Outcome, visibility_timeout: float = 0.0) -> None:
        """Take a stage's outcome; every cell it completes gets its records (written at once)."""
        if self._plan is None:
            raise RuntimeError("stage_done before plan()")
        self.outcomes[outcome.key] = outcome
        self.executed.update(outcome.executed)
        self.counts["done" if outcome.ok else "failed"] += 1
        node = self._plan.nodes.get(outcome.key)
        if self._bar is not None:
            self._bar.update(1)
            self._postfix()
        if node is None:
            return
        if outcome.ok and outcome.stage == Stage.SCORE:  # a worker's rename may take a moment on NFS
            deadline = time.time() + visibility_timeout
            while not self.store.done(outcome.stage, outcome.key) and time.time() < deadline:
                time.sleep(0.5)
        finished = False
        for index in dict.fromkeys(node.cells):
            cp = self._plan.cells[index]
            cp.needs.discard(outcome.key)
            if not cp.needs and index not in self._records:
                self._finish_cell(cp)
                finished = True
        self._write_status("running", force=finished and self._results_due())

    def progress(self, running: int | None = None) -> None:
        """What is in flight (an executor running stages in parallel says how many)."""
        if running is not None:
            self.counts["running"] = running
        self._postfix()
        self._write_status("running")

    def _postfix(self) -> None:
        if self._bar is not None:
            c = self.counts
            self._bar.set_postfix_str(f"done {c['done']}, running {c['running']}, failed {c['failed']}",
                                      refresh=False)

    def executor_info(self, **facts: Any) -> None:
        """Executor-specific facts for run.json (a cluster address, whether GPUs are used)."""
        self._extra.update(facts)

    def use_device_label(self, label: str) -> None:
        """The device records name when an executor places stages itself (e.g. ``cuda``)."""
        self.device_label = label

    def plugin_modules(self) -> list[str]:
        """Plugin modules registered in this process (not installed), which workers elsewhere must
        import by name; ``"?<name>"`` for objects that cannot be named."""
        return self.pm.registered_modules()

    def worker_job(self, device: str | None = None) -> dict:
        """JSON-able data from which ``open_session`` rebuilds this session in another process."""
        return {"suite_data": self.suite.raw, "suite_source": self.suite.source, "suite_hash": self.suite.hash,
                "run_dir": str(self.run_dir.resolve()), "store": str(self.store.root.resolve()),
                "device": device or self.device_request}

    @property
    def records(self) -> list[dict]:
        """The records of the finished cells, cells in suite order."""
        if self._ordered is None:
            self._ordered = [r for i in sorted(self._records) for r in self._records[i]]
        return self._ordered

    def _finish_cell(self, cp: CellPlan) -> None:
        self._records[cp.index] = recs = self.cell_records(cp)
        self._texts[cp.index] = dumps_records(recs)
        self._ordered = None
        if self._results_due():
            self.write_results()

    #: a run with at most this many records rewrites results.jsonl whenever a cell finishes; a
    #: larger one at most every RESULTS_INTERVAL seconds (and never spending more than 5% of the
    #: run rewriting it): rewriting 100,000 records for each of 10,000 cells would cost hours.
    #: The file is always complete at the end, and a killed run's records come back from the
    #: store when the same command runs again.
    SMALL_RUN = 2000
    RESULTS_INTERVAL = 10.0

    def _results_due(self) -> bool:
        if len(self._records) * max(1, len(self.suite.metrics)) <= self.SMALL_RUN:
            return True
        return time.time() - self._last_results >= max(self.RESULTS_INTERVAL, 20 * self._results_cost)

    def _record(self, cell: Cell, spec: Spec, status: Status, **fields) -> dict:
        metric = self.component(spec)
        return Record(suite=self.suite.name, suite_hash=self.suite.hash, **cell.labels(),
                      attack_name=cell.attack.name, adaptive=cell.attack.adaptive, metric=spec.label,
                      metric_name=spec.name, direction=metric.direction, status=status.value,
                      backend=self.backend_fp, device=self.device_label, **self._variant(cell), **fields).to_json()

    def cell_records(self, cp: CellPlan) -> list[dict]:
        """The records of a cell whose stages are done: from the store, or the failures its
        stages' outcomes carry (cells in suite order, one record per metric)."""
        if cp.error is not None:
            return [self._record(cp.cell, m, Status.FAILED, error=cp.error) for m in self.suite.metrics]
        out = []
        for spec, key in zip(self.suite.metrics, cp.scores):
            common = {"key": key, "stages": cp.stages}
            outcome = self.outcomes.get(key)
            if outcome is not None and not outcome.ok:
                if outcome.unavailable:  # a stage it needs cannot run here (weights, model, package absent)
                    # the metric's own reason as it gave it; an upstream stage's with that stage's name
                    error = outcome.error if outcome.upstream_failed or outcome.stage != Stage.SCORE else outcome.cause
                    out.append(self._record(cp.cell, spec, Status.UNAVAILABLE, error=error, **common))
                else:
                    out.append(self._record(cp.cell, spec, Status.FAILED, error=outcome.error, **common))
                continue
            if not self.store.done(Stage.SCORE, key):
                out.append(self._record(cp.cell, spec, Status.FAILED, **common,
                                        error="score failed: no result in the store (the executor did not compute it)"))
                continue
            value = json.loads((self.store.path(Stage.SCORE, key) / "score.json").read_text())
            details = value.get("details", {})
            if value["value"] is None or math.isnan(value["value"]):
                # nothing could be scored (e.g. no face found): a documented empty result,
                # left out of averages, never a zero
                out.append(self._record(cp.cell, spec, Status.EMPTY, count=value["count"], details=details,
                                        error=details.get("reason", "no value"), **common))
                continue
            per_prompt = {k: (None if v is None or math.isnan(v) else v) for k, v in value["per_prompt"].items()}
            out.append(self._record(cp.cell, spec, Status.OK, value=value["value"], per_prompt=per_prompt,
                                    count=value["count"], details=details, **common))
        return out

    # -- run.json, results.jsonl -------------------------------------------------------------
    def plugin_versions(self) -> dict:
        out: dict[str, dict] = {}
        for spec in self.suite.specs():  # surrogate backends included
            entry = self.pm.get(spec.family, spec.name)
            plugin = self.pm.plugins.get(entry.plugin)
            out.setdefault(spec.family, {})[spec.name] = {
                "version": entry.version, "plugin": entry.plugin,
                "distribution": plugin.distribution if plugin else None,
                "distribution_version": plugin.version if plugin else None}
        return out

    def figures(self) -> list[dict]:
        """The report figures the suite's components declare (``Component.report_figures``)."""
        out = []
        families = [("purifiers", [s for c in self.suite.purifiers for s in c]), ("metrics", self.suite.metrics)]
        for family, specs in families:
            seen: dict[str, dict] = {}
            for spec in specs:
                for i, fig in enumerate(getattr(self.component(spec), "report_figures", ())):
                    entry = seen.setdefault(f"{spec.name}#{i}", {"family": family, "name": spec.name, "labels": [],
                                                                 "figure": fig.to_json()})
                    if spec.label not in entry["labels"]:
                        entry["labels"].append(spec.label)
            out += list(seen.values())
        return out

    def _static(self, name: str, compute: Callable[[], Any]) -> Any:
        """Parts of run.json that cannot change during a run, computed once (it is rewritten
        many times)."""
        cache = self.__dict__.setdefault("_static_info", {})
        if name not in cache:
            cache[name] = compute()
        return cache[name]

    def run_info(self, status: str, **extra: Any) -> RunInfo:
        name = getattr(self.executor, "name", "") or "local"
        return RunInfo(
            suite=self.suite.name, suite_hash=self.suite.hash, suite_source=self.suite.source,
            suite_data=self.suite.raw, status=status, started=self._started, updated=time.time(),
            backend=BackendInfo(self.backend_fp, self.backend.describe(),
                                bool(getattr(self.backend, "random_weights", False))),
            device=self.device_label, dtype=str(self.dtype).replace("torch.", ""),
            cuda_device=(torch.cuda.get_device_name(self.device)
                         if self.device.type == "cuda" and torch.cuda.is_available() else None),
            seeds=self.suite.seeds, store=str(self.store.root.resolve()),
            platform=platform.platform(), python=platform.python_version(),
            packages=package_versions(), plugins=self._static("plugins", self.plugin_versions),
            n_cells=self.suite.n_cells, figures=self._static("figures", self.figures), executor=ExecutorInfo(name, dict(self.counts), dict(self._extra)), **extra)

    def _write_status(self, status: str, force: bool = False, **extra: Any) -> None:
        if not force and time.time() - self._last_status < 10:  # `benchbase status` needs no more
            return
        self._last_status = time.time()
        self._write(RUN_JSON, json.dumps(self.run_info(status, **extra).to_json(), indent=1, default=str))

    def write_results(self) -> None:
        start = time.perf_counter()
        self._write(RESULTS, "".join(self._texts[i] for i in sorted(self._texts)))
        self._last_results, self._results_cost = time.time(), time.perf_counter() - start

    def _write(self, name: str, text: str) -> None:
        """Atomically (a temporary, then a rename): a kill leaves the previous file whole."""
        try:
            atomic_write_text(self.run_dir / name, text)
        except OSError as exc:
            if is_disk_error(exc, self.run_dir):
                raise disk_error(exc, f"{self.run_dir / name}") from exc
            raise

    def _clean_run_dir(self) -> None:
        """Temporaries of results.jsonl/run.json a killed run left (we hold the run lock: they are
        nobody's)."""
        for name in (RESULTS, RUN_JSON):
            for tmp in self.run_dir.glob(f".{name}.*"):
                tmp.unlink(missing_ok=True)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Plan, execute (the suite's executor, or in-process), record; rerunning resumes."""
        executor = self.executor
        if executor is None:
            from benchbase_plugins.executors.local import LocalExecutor

            executor = LocalExecutor()
        start = time.perf_counter()
        with run_lock(self.run_dir) as note:  # one run per folder; a dead holder's lock is taken over
            if note:
                self.echo(f"note: {note}")
            self._clean_run_dir()
            self.store.clean_temporaries()  # only those of dead processes: the store may be shared
            self._reset()
            status = "interrupted"
            try:
                executor.execute(self)
                status = "finished"
            except KeyboardInterrupt:
                raise
            except BaseException:
                status = "failed"
                raise
            finally:
                if self._bar is not None:
                    self._bar.close()
                if status == "finished" and self._plan is not None:  # a cell the executor left behind fails
                    for cp in self._plan.cells:
                        if cp.index not in self._records:
                            self._finish_cell(cp)
                summary = RunSummary(self.run_dir, self.records, dict(self.executed),
                                     dict(self._plan.cached) if self._plan else {}, time.perf_counter() - start,
                                     status)
                try:
                    self.write_results()
                    self._write_status(status, force=True, seconds=round(summary.seconds, 2),
                                       executed=summary.executed, cached=summary.cached,
                                       failed_records=len(summary.failed),
                                       unavailable_records=len(summary.unavailable))
                except DiskError:
                    if status == "finished":
                        raise
                    # the error (or Ctrl-C) that stopped the run is the one to report

        return summary


def model_label(spec: Spec, component: Any, table: dict) -> str:
    """A backend as transfer matrices name it: the ``label`` its table gives, else its name and the
    parameters that differ from their defaults (``mini`` for v2, ``mini(version=v3)``), so the
    same model written two ways gets one label."""
    if isinstance(table, dict) and isinstance(table.get("label"), str) and table["label"]:
        return table["label"]
    fields = type(component.params).model_fields
    config = component.config()
    changed = {k: v for k, v in config.items()
               if k not in fields or fields[k].is_required() or json.dumps(fields[k].get_default(
                   call_default_factory=True), default=str) != json.dumps(v, default=str)}
    return backend_label(spec.name, changed)


_SESSIONS: dict[tuple, Runner] = {}  # one session per (suite, run, store, device) per worker process


def open_session(job: dict, manager: PluginManager | None = None) -> Runner:
    """The session ``worker_job`` describes, in a worker process (built once per process), able
    to ``run_stage``. The worker needs the same plugins and data as the driver (a stage whose key
    differs fails with a message naming the cause)."""
    ident = (job["suite_hash"], job["run_dir"], job["store"], job["device"], id(manager))
    if ident not in _SESSIONS:
        from benchbase.suite import parse_suite

        suite = parse_suite(job["suite_data"], job["suite_source"])
        _SESSIONS[ident] = Runner(suite, job["run_dir"], manager=manager, store_dir=job["store"], progress=False,
                                  device=job["device"], in_process=True)
    return _SESSIONS[ident]
