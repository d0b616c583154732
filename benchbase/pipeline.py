"""Stages, their cache keys, and the grid runner.

One cell of the grid is (identity, attack, purifier chain, defense, personalizer, seed):

    dataset -> protect(attack) -> purify(chain) -> personalize(personalizer ∘ defense)
            -> generate(eval prompts) -> score(metric)

Each stage is a ``Node`` whose key hashes the stage name, the component name + version,
its parameters, the upstream keys and the seed. Nodes are evaluated on demand from the
scores backwards, so a score already in the store loads nothing upstream, shared work
(one protection per identity x attack for every purifier; class images per base model) is
computed once, and a killed run resumes with whatever finished. A cell whose stage raises
is recorded as failed with its error and the grid goes on.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
import traceback
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property, partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from benchbase.components import (
    FAMILY_BASES, Context, IdentityData, MetricInputs, MetricValue, Prompts, SharedStages, Threat,
)
from benchbase.errors import BenchbaseError, ConfigError, WeightsUnavailableError
from benchbase.images import l2_levels, linf_levels, load_pngs, quantize, quantize_to_budget, save_pngs
from benchbase.models.sd import resolve_device, resolve_dtype
from benchbase.plugins import PluginManager, get_plugin_manager
from benchbase.store import RESULTS, RUN_JSON, Store, atomic_write_text, hash_key
from benchbase.suite import Spec, Suite

PACKAGES = ("benchbase", "torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "pyiqa",
            "facenet-pytorch", "dlib-bin", "numpy", "pillow")


class StageFailed(Exception):
    """An upstream stage of this cell failed (the message names the stage and the error)."""


def image_names(data: IdentityData) -> list[str]:
    """PNG names of set_B: an index prefix keeps load order equal to dataset order (files are
    read back sorted), the original stem keeps them recognisable."""
    stems = data.files.get("set_B") or [""] * len(data.set_B)
    return [f"{i:03d}_{Path(stem).stem}".rstrip("_") for i, stem in enumerate(stems)]


def derive_seed(seed: int, *parts: Any) -> int:
    """A per-stage seed from the cell seed, so stages draw independent, reproducible streams."""
    return int(hash_key("seed", {"seed": seed, "parts": [str(p) for p in parts]})[:12], 16) % (2**63)


def component_id(component) -> dict:
    return {"name": component.name, "version": component.version, "params": component.config()}


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:60] or "prompt"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _strict(obj: Any) -> Any:
    """NaN/inf -> None, so results.jsonl is strict JSON that any tool can read."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


@dataclass(frozen=True)
class NodeAddress:
    """Where a stage sits in the grid: all another process holding the same suite needs to
    rebuild its ``Node`` (indices into the suite's lists; ``metric`` for scores only).
    ``key`` is the key the planner computed: the rebuilt node must hash to it."""

    stage: str
    identity: str
    seed: int
    attack: int
    purifier: int
    defense: int
    personalizer: int
    metric: int | None = None
    key: str = ""


@dataclass
class Node:
    """A stage output: computed once, then read from the store."""

    stage: str
    parts: dict
    compute: Callable[[Path], dict | None]
    key: str = ""
    ups: list[Node] = field(default_factory=list)  # the upstream nodes compute() reads, in order
    address: NodeAddress | None = None

    def __post_init__(self):
        self.key = hash_key(self.stage, self.parts)


@dataclass
class Identity:
    name: str
    fingerprint: str
    loader: Callable[[], IdentityData]

    @cached_property
    def data(self) -> IdentityData:
        return self.loader()


@dataclass
class Cell:
    identity: str
    seed: int
    attack: Spec
    purifiers: list[Spec]
    defense: Spec
    personalizer: Spec
    at: tuple[int, int, int, int] = (0, 0, 0, 0)  # indices of attack, purifier chain, defense, personalizer

    def labels(self) -> dict:
        return {"identity": self.identity, "seed": self.seed, "attack": self.attack.label,
                "purifier": "+".join(s.label for s in self.purifiers), "defense": self.defense.label,
                "personalizer": self.personalizer.label}


@dataclass
class PlannedNode:
    """A stage an executor must compute (it is not in the store yet)."""

    address: NodeAddress
    deps: list[str]  # keys of upstream stages to compute first, in the order compute() reads them
    cells: list[int] = field(default_factory=list)  # indices of the cells waiting for it

    @property
    def stage(self) -> str:
        return self.address.stage

    @property
    def key(self) -> str:
        return self.address.key


@dataclass
class CellPlan:
    index: int
    cell: Cell
    identity: Identity | None
    error: str | None = None  # the dataset could not load the identity: every record fails
    needs: set[str] = field(default_factory=set)  # keys of stages still to compute for its scores


@dataclass
class Plan:
    """The part of a suite's stage graph that is not in the store yet.

    ``nodes`` is in dependency order (every node after its ``deps``); keys dedupe shared work,
    so one protection per identity x attack appears once however many purifiers use it.
    ``cached`` counts the stages found complete while planning (nothing upstream of them is
    visited, exactly like the local runner)."""

    cells: list[CellPlan] = field(default_factory=list)
    nodes: dict[str, PlannedNode] = field(default_factory=dict)
    cached: Counter = field(default_factory=Counter)


@dataclass
class RunSummary:
    run_dir: Path
    records: list[dict] = field(default_factory=list)
    executed: dict = field(default_factory=dict)
    cached: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "failed"]


class Runner:
    """Executes a suite's grid in-process, caching every stage in a Store."""

    def __init__(self, suite: Suite, run_dir: Path, manager: PluginManager | None = None,
                 store_dir: Path | None = None, progress: bool | None = None, device: str | None = None,
                 driver: bool = False):
        """``driver=True``: this Runner only plans and assembles records for an executor that
        computes the stages elsewhere (Ray workers): it never computes a stage itself, and the
        requested device need not exist on this machine."""
        self.suite = suite
        self.run_dir = Path(run_dir)
        self.pm = manager or get_plugin_manager()
        self.store = Store(Path(store_dir) if store_dir else self.run_dir / "store")
        self.progress_enabled = progress
        self.device_request = device or suite.device  # what workers resolve on their own machine
        self.driver = driver
        try:
            self.device = resolve_device(self.device_request)
        except ValueError:
            if not driver:
                raise
            self.device = torch.device(self.device_request)  # only a label on the driver
        # stage_lock(stage, key) -> context manager held while a stage is computed; executors whose
        # workers share a store set one so a stage is computed once cluster-wide (default: none)
        self.stage_lock: Callable[[str, str], Any] = lambda stage, key: nullcontext()
        self._identities: dict[str, Identity] = {}
        self.dtype = resolve_dtype(suite.dtype)
        self.components: dict[int, Any] = {}
        self.backend = self._create(suite.backend)
        self.backend_fp = self.backend.fingerprint()  # part of most keys: hash the weights' identity once
        self.dataset = self._create(suite.dataset)
        for spec in [*suite.attacks, *(s for c in suite.purifiers for s in c), *suite.defenses,
                     *suite.personalizers, *suite.metrics]:
            self._create(spec)
        for spec in suite.attacks:
            if spec.adaptive and not getattr(self.component(spec), "supports_adaptive", False):
                raise ConfigError(f"attack {spec.label!r} is marked adaptive but does not support it")
        self._failed: dict[str, tuple[str, BaseException | None]] = {}
        self.records: list[dict] = []

    # -- components ------------------------------------------------------------------------
    def _create(self, spec: Spec):
        component = self.pm.create(spec.family, spec.name, spec.params)
        base = FAMILY_BASES[spec.family]
        if not isinstance(component, base):
            raise ConfigError(f"{spec.family[:-1]} {spec.name!r} is a {type(component).__name__}, "
                              f"not a benchbase {base.__name__}")
        self.components[id(spec)] = component
        return component

    def component(self, spec: Spec):
        return self.components[id(spec)]

    def prompts(self) -> Prompts:
        base = self.dataset.prompts()
        over = self.suite.prompts
        return Prompts(instance=over.get("instance", base.instance), class_=over.get("class", base.class_),
                       eval=list(over.get("eval", base.eval)), negative=over.get("negative", base.negative),
                       identifier=base.identifier, class_noun=base.class_noun)

    def progress(self, iterable=None, **kwargs):
        # None: tqdm decides (bars on a terminal, none in CI logs)
        disable = None if self.progress_enabled is None else not self.progress_enabled
        return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)

    def context(self, seed: int, identity: Identity | None, *stage: Any, threat: Threat | None = None) -> Context:
        return Context(
            device=self.device, dtype=self.dtype, seed=seed,
            generator=torch.Generator().manual_seed(derive_seed(seed, *stage)),
            backend=self.backend, identity=identity.data if identity else None, prompts=self.prompts(),
            shared=SharedStages(self._shared_stage), threat=threat, workdir=self.store.root / "work",
            progress=partial(self.progress), plugins=self.pm,
        )

    def _shared_stage(self, stage: str, parts: dict, fn: Callable[[Path], None]) -> Path:
        key = self.store.key(stage, parts)
        if self.store.done(stage, key):
            return self.store.shared_stage(stage, parts, fn)
        with self.stage_lock(stage, key):  # e.g. class images: once per base model cluster-wide
            return self.store.shared_stage(stage, parts, fn)

    # -- evaluation ------------------------------------------------------------------------
    def ensure(self, node: Node) -> Path:
        if node.key in self._failed:  # failed earlier in this run: fail the same way, cause included
            msg, cause = self._failed[node.key]
            raise StageFailed(msg) from cause
        if self.driver and not self.store.done(node.stage, node.key):
            msg = f"{node.stage} failed: no result in the store (the executor did not compute it)"
            self._failed[node.key] = (msg, None)
            raise StageFailed(msg)
        try:
            if self.store.done(node.stage, node.key):
                return self.store.compute(node.stage, node.key, node.parts, node.compute)
            with self.stage_lock(node.stage, node.key):  # computed once even if two workers race
                return self.store.compute(node.stage, node.key, node.parts, node.compute)
        except StageFailed as exc:
            self._failed[node.key] = (str(exc), exc.__cause__)
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            msg = f"{node.stage} failed: {type(exc).__name__}: {exc}"
            if not isinstance(exc, BenchbaseError):
                tb = traceback.format_exc(limit=-3)
                (self.run_dir / "errors").mkdir(parents=True, exist_ok=True)
                (self.run_dir / "errors" / f"{node.stage}-{node.key}.txt").write_text(tb)
                msg += f" (traceback in errors/{node.stage}-{node.key}.txt)"
            self._failed[node.key] = (msg, exc)
            raise StageFailed(msg) from exc

    def _threat(self, cell: Cell) -> Threat | None:
        if not cell.attack.adaptive:
            return None
        defense = self.component(cell.defense)
        return Threat(purifiers=[self.component(s) for s in cell.purifiers], defense=defense,
                      training_prompts=defense.training_prompts(self.prompts()))

    def protect_node(self, ident: Identity, cell: Cell) -> Node:
        attack = self.component(cell.attack)
        parts = {"attack": component_id(attack), "identity": ident.fingerprint,
                 "backend": self.backend_fp, "resolution": self.backend.resolution,
                 "seed": cell.seed, "prompts": vars(self.prompts())}
        threat = self._threat(cell)
        if threat is not None:  # an adaptive protection depends on the threat it optimises against
            parts["threat"] = {"purifiers": [component_id(p) for p in threat.purifiers],
                               "defense": component_id(threat.defense)}

        def compute(folder: Path) -> dict:
            ctx = self.context(cell.seed, ident, "protect", cell.attack.label, threat=threat)
            clean = ident.data.set_B
            adv = attack.protect(clean.to(self.device), ctx)
            eps = attack.eps if attack.eps > 0 else 0.0
            protected = quantize_to_budget(adv, clean, eps, mode=getattr(attack.params, "quantization", "round"))
            linf = linf_levels(protected, clean)
            if linf > eps + 1e-6:  # cannot happen after the clip; a guard against a quantiser bug
                raise RuntimeError(f"budget violated after quantisation: {linf} > {eps} levels")
            save_pngs(protected, folder / "images", image_names(ident.data))
            return {"eps_levels": eps, "linf_levels": linf, "l2_levels": l2_levels(protected, clean), **ctx.info}

        return Node("protect", parts, compute, address=self._address("protect", cell))

    def purify_node(self, ident: Identity, cell: Cell) -> Node:
        up = self.protect_node(ident, cell)
        chain = [self.component(s) for s in cell.purifiers]
        parts = {"purifiers": [component_id(p) for p in chain], "protect": up.key, "seed": cell.seed,
                 "backend": self.backend_fp}

        def compute(folder: Path) -> dict:
            images = load_pngs(self.ensure(up) / "images").to(self.device)
            info = {}
            try:
                for i, (spec, purifier) in enumerate(zip(cell.purifiers, chain)):
                    ctx = self.context(cell.seed, ident, "purify", i, spec.label)
                    images = purifier.purify(images, ctx)
                    if images.dim() != 4 or images.shape[1] != 3:
                        raise RuntimeError(f"purifier {spec.label!r} returned shape {tuple(images.shape)}")
                    images = quantize(images)  # each stage's output is what a file would hold
                    info[spec.label] = ctx.info
            finally:  # free purifier models before the next stage (fine-tuning) needs the memory
                for purifier in chain:
                    purifier.release()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            save_pngs(images, folder / "images", image_names(ident.data))
            return {"purifiers": info}

        return Node("purify", parts, compute, ups=[up], address=self._address("purify", cell))

    def personalize_node(self, ident: Identity, cell: Cell) -> Node:
        up = self.purify_node(ident, cell)
        personalizer, defense = self.component(cell.personalizer), self.component(cell.defense)
        parts = {"personalizer": {**component_id(personalizer), "params": personalizer.train_config()},
                 "defense": component_id(defense), "purify": up.key, "seed": cell.seed,
                 "backend": self.backend_fp, "prompts": vars(self.prompts())}

        def compute(folder: Path) -> dict:
            images = load_pngs(self.ensure(up) / "images").to(self.device)
            ctx = self.context(cell.seed, ident, "personalize", cell.personalizer.label, cell.defense.label)
            personalizer.train(images, ctx, defense, folder)
            return ctx.info

        return Node("personalize", parts, compute, ups=[up], address=self._address("personalize", cell))

    def generate_node(self, ident: Identity, cell: Cell) -> Node:
        up = self.personalize_node(ident, cell)
        personalizer, defense = self.component(cell.personalizer), self.component(cell.defense)
        parts = {"personalizer": component_id(personalizer), "personalize": up.key, "seed": cell.seed,
                 "eval": self.prompts().eval, "negative": self.prompts().negative}

        def compute(folder: Path) -> dict:
            model_dir = self.ensure(up)
            ctx = self.context(cell.seed, ident, "generate", cell.personalizer.label, cell.defense.label)
            outputs = personalizer.generate(model_dir, ctx, defense)
            index = {}
            for i, (prompt, images) in enumerate(outputs.items()):
                sub = f"{i:02d}_{slug(prompt)}"
                save_pngs(images, folder / sub)
                index[prompt] = sub
            (folder / "prompts.json").write_text(json.dumps(index, indent=1))
            return ctx.info

        return Node("generate", parts, compute, ups=[up], address=self._address("generate", cell))

    @staticmethod
    def load_generated(folder: Path) -> dict[str, torch.Tensor]:
        index = json.loads((folder / "prompts.json").read_text())
        return {prompt: load_pngs(folder / sub) for prompt, sub in index.items()}

    def score_node(self, ident: Identity, cell: Cell, spec: Spec) -> Node:
        metric = self.component(spec)
        reads = set(metric.reads)
        ups: dict[str, Node] = {}
        if "protected" in reads:
            ups["protected"] = self.protect_node(ident, cell)
        if "purified" in reads:
            ups["purified"] = self.purify_node(ident, cell)
        if "generated" in reads:
            ups["generated"] = self.generate_node(ident, cell)
        parts = {"metric": component_id(metric), "identity": ident.fingerprint, "seed": cell.seed,
                 "inputs": {k: n.key for k, n in sorted(ups.items())}, "reads": sorted(reads),
                 "resolution": self.backend.resolution, "prompts": vars(self.prompts())}

        def compute(folder: Path) -> dict:
            inputs = MetricInputs()
            for name, node in ups.items():
                path = self.ensure(node)
                setattr(inputs, name, self.load_generated(path) if name == "generated"
                        else load_pngs(path / "images"))
            data = ident.data
            if "clean" in reads:
                inputs.clean = data.set_B
            if "references" in reads:
                inputs.references = data.set_C
            if "set_A" in reads:
                inputs.set_A = data.set_A
            ctx = self.context(cell.seed, ident, "score", spec.label)
            value = metric.score(inputs, ctx)
            if not isinstance(value, MetricValue):
                raise TypeError(f"metric {spec.label!r} returned {type(value).__name__}, not MetricValue")
            (folder / "score.json").write_text(json.dumps(vars(value), default=float))
            return ctx.info

        index = next(i for i, s in enumerate(self.suite.metrics) if s is spec)
        return Node("score", parts, compute, ups=list(ups.values()),
                    address=self._address("score", cell, metric=index))

    @staticmethod
    def _address(stage: str, cell: Cell, metric: int | None = None) -> NodeAddress:
        return NodeAddress(stage, cell.identity, cell.seed, *cell.at, metric=metric)

    # -- the grid --------------------------------------------------------------------------
    def cells(self, identity: str, seed: int) -> list[Cell]:
        s = self.suite
        return [Cell(identity, seed, a, chain, d, p, at=(ai, ci, di, pi))
                for ai, a in enumerate(s.attacks) for ci, chain in enumerate(s.purifiers)
                for di, d in enumerate(s.defenses) for pi, p in enumerate(s.personalizers)
                if s.keeps(a, chain, d, p)]

    # -- the graph, for executors that compute stages elsewhere ----------------------------
    def identity(self, name: str) -> Identity:
        """The identity ``name`` (fingerprinted once; images loaded on first use)."""
        if name not in self._identities:
            self._identities[name] = Identity(name, self.dataset.fingerprint(name),
                                              partial(self.dataset.load, name, self.backend.resolution))
        return self._identities[name]

    def node_at(self, address: NodeAddress) -> Node:
        """Rebuild the node at ``address`` (a pure function of the suite and the address)."""
        s = self.suite
        cell = Cell(address.identity, address.seed, s.attacks[address.attack], s.purifiers[address.purifier],
                    s.defenses[address.defense], s.personalizers[address.personalizer],
                    at=(address.attack, address.purifier, address.defense, address.personalizer))
        ident = self.identity(address.identity)
        if address.stage == "score":
            node = self.score_node(ident, cell, s.metrics[address.metric])
        else:
            node = getattr(self, f"{address.stage}_node")(ident, cell)
        if address.key and node.key != address.key:
            raise ConfigError(f"{address.stage} stage of {address.identity} hashes to {node.key} here but "
                              f"{address.key} on the driver: the worker runs other plugin versions or data")
        return node

    def plan(self) -> Plan:
        """The cells of the grid and the stages their scores still need, in dependency order."""
        plan = Plan()
        done: set[str] = set()

        def visit(node: Node, cell_index: int) -> bool:  # True: the node must be computed
            if node.key in plan.nodes:
                plan.nodes[node.key].cells.append(cell_index)
                return True
            if node.key in done:
                return False
            if self.store.done(node.stage, node.key):
                done.add(node.key)
                plan.cached[node.stage] += 1
                return False
            deps = [up.key for up in node.ups if visit(up, cell_index)]
            address = NodeAddress(**{**vars(node.address), "key": node.key})
            plan.nodes[node.key] = PlannedNode(address, deps, [cell_index])
            return True

        for seed in self.suite.seeds:
            for name in self.dataset.identities():
                try:
                    ident = self.identity(name)
                except BenchbaseError as exc:
                    for cell in self.cells(name, seed):
                        plan.cells.append(CellPlan(len(plan.cells), cell, None, error=f"dataset: {exc}"))
                    continue
                for cell in self.cells(name, seed):
                    cp = CellPlan(len(plan.cells), cell, ident)
                    plan.cells.append(cp)
                    for spec in self.suite.metrics:
                        visit(self.score_node(ident, cell, spec), cp.index)
        for key, node in plan.nodes.items():  # a cell needs every planned stage that lists it
            for index in set(node.cells):
                plan.cells[index].needs.add(key)
        return plan

    def run_node(self, address: NodeAddress) -> dict:
        """Compute one planned stage (its upstream stages are in the store already) and return its
        outcome: ok, or the error a record will carry; plus the stages this call executed."""
        node = self.node_at(address)
        self._failed.clear()  # a retried or repeated task computes afresh
        executed, cached = Counter(self.store.executed), Counter(self.store.cached)
        outcome = {"key": node.key, "stage": node.stage, "ok": True, "error": None, "unavailable": False,
                   "cause": None}
        start = time.perf_counter()
        try:
            self.ensure(node)
        except StageFailed as exc:
            cause = exc.__cause__
            outcome.update(ok=False, error=str(exc), unavailable=isinstance(cause, WeightsUnavailableError),
                           cause=None if cause is None else str(cause))
        outcome.update(executed=dict(self.store.executed - executed), cached=dict(self.store.cached - cached),
                       seconds=round(time.perf_counter() - start, 3))
        return outcome

    def cell_records(self, cell: CellPlan, outcomes: dict[str, dict]) -> list[dict]:
        """The records of a planned cell once its stages are finished, from the store, exactly as
        the local runner writes them (failed stages carry the error their worker reported)."""
        if cell.error is not None:
            return [self._record(cell.cell, m, "failed", error=cell.error) for m in self.suite.metrics]
        for key in cell.needs:
            out = outcomes.get(key)
            if out is not None and not out["ok"] and key not in self._failed:
                cause_type = WeightsUnavailableError if out.get("unavailable") else RuntimeError
                cause = cause_type(out["cause"]) if out.get("cause") is not None else None
                self._failed[key] = (out["error"], cause)
        return self.score_cell(cell.identity, cell.cell)

    def _record(self, cell: Cell, spec: Spec, status: str, **fields) -> dict:
        metric = self.component(spec)
        rec = {"suite": self.suite.name, "suite_hash": self.suite.hash, **cell.labels(),
               "attack_name": cell.attack.name, "adaptive": cell.attack.adaptive,
               "metric": spec.label, "metric_name": spec.name, "direction": metric.direction,
               "status": status, "value": None, "per_prompt": {}, "count": None, "error": None,
               "backend": self.backend_fp, "device": str(self.device)}
        rec.update(fields)
        return rec

    def stage_keys(self, ident: Identity, cell: Cell) -> dict[str, str]:
        """The keys of a cell's stages (hashing only: nothing is computed)."""
        return {"protect": self.protect_node(ident, cell).key, "purify": self.purify_node(ident, cell).key,
                "personalize": self.personalize_node(ident, cell).key,
                "generate": self.generate_node(ident, cell).key}

    def score_cell(self, ident: Identity, cell: Cell) -> list[dict]:
        records = []
        stages = self.stage_keys(ident, cell)
        for spec in self.suite.metrics:
            try:
                node = self.score_node(ident, cell, spec)
                path = self.ensure(node)
                value = json.loads((path / "score.json").read_text())
                details = value.get("details", {})
                if value["value"] is None or math.isnan(value["value"]):
                    # nothing could be scored (e.g. no face found): a documented empty result,
                    # left out of averages, never a zero
                    records.append(self._record(cell, spec, "empty", count=value["count"], details=details,
                                                error=details.get("reason", "no value"), key=node.key,
                                                stages=stages))
                    continue
                per_prompt = {k: (None if v is None or math.isnan(v) else v) for k, v in value["per_prompt"].items()}
                records.append(self._record(cell, spec, "ok", value=value["value"], per_prompt=per_prompt,
                                            count=value["count"], details=details, key=node.key,
                                            stages=stages))
            except StageFailed as exc:
                cause = exc.__cause__
                if isinstance(cause, WeightsUnavailableError) and str(exc).startswith("score failed"):
                    records.append(self._record(cell, spec, "unavailable", error=str(cause), stages=stages))
                else:
                    records.append(self._record(cell, spec, "failed", error=str(exc), stages=stages))
        return records

    def write_run_json(self, status: str, started: float, extra: dict | None = None) -> None:
        info = {
            "suite": self.suite.name, "suite_hash": self.suite.hash, "suite_source": self.suite.source,
            "suite_data": self.suite.raw, "status": status, "started": started, "updated": time.time(),
            "backend": {"fingerprint": self.backend_fp, "description": self.backend.describe()},
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "cuda_device": (torch.cuda.get_device_name(self.device)
                            if self.device.type == "cuda" and torch.cuda.is_available() else None),
            "seeds": self.suite.seeds, "store": str(self.store.root.resolve()),
            "platform": platform.platform(), "python": platform.python_version(),
            "packages": package_versions(), "plugins": self.plugin_versions(), "n_cells": self.suite.n_cells,
        }
        info.update(extra or {})
        atomic_write_text(self.run_dir / RUN_JSON, json.dumps(info, indent=1, default=str))

    def plugin_versions(self) -> dict:
        out: dict[str, dict] = {}
        specs = [self.suite.backend, self.suite.dataset, *self.suite.attacks,
                 *(s for c in self.suite.purifiers for s in c), *self.suite.defenses,
                 *self.suite.personalizers, *self.suite.metrics]
        for spec in specs:
            entry = self.pm.get(spec.family, spec.name)
            plugin = self.pm.plugins.get(entry.plugin)
            out.setdefault(spec.family, {})[spec.name] = {
                "version": entry.version, "plugin": entry.plugin,
                "distribution": plugin.distribution if plugin else None,
                "distribution_version": plugin.version if plugin else None}
        return out

    def write_results(self) -> None:
        text = "".join(json.dumps(_strict(r), default=str) + "\n" for r in self.records)
        atomic_write_text(self.run_dir / RESULTS, text)

    def run(self) -> RunSummary:
        start = time.perf_counter()
        started = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store.clean_temporaries()
        self.write_run_json("running", started)
        self.records = []
        identities = self.dataset.identities()
        total = len(identities) * self.suite.n_cells
        bar = self.progress(total=total, desc=f"{self.suite.name}: cells", unit="cell")
        status = "interrupted"
        try:
            for seed in self.suite.seeds:
                for name in identities:
                    try:
                        ident = Identity(name, self.dataset.fingerprint(name),
                                         partial(self.dataset.load, name, self.backend.resolution))
                    except BenchbaseError as exc:  # a broken identity fails its cells, not the grid
                        for cell in self.cells(name, seed):
                            self.records += [self._record(cell, m, "failed", error=f"dataset: {exc}")
                                             for m in self.suite.metrics]
                            bar.update(1)
                        continue
                    for cell in self.cells(name, seed):
                        bar.set_postfix_str(f"{name} {cell.attack.label}/{cell.labels()['purifier']}", refresh=False)
                        self.records += self.score_cell(ident, cell)
                        self.write_results()
                        bar.update(1)
            status = "finished"
        finally:
            bar.close()
            self.write_results()
            summary = RunSummary(self.run_dir, self.records, dict(self.store.executed), dict(self.store.cached),
                                 time.perf_counter() - start)
            self.write_run_json(status, started, {"seconds": round(summary.seconds, 2),
                                                      "executed": summary.executed, "cached": summary.cached,
                                                      "failed_records": len(summary.failed)})
        return summary
