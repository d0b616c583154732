"""The cost model behind ``benchbase estimate SUITE``: how many stages of each kind a suite
computes after sharing, and how long they take on a named device.

The stage graph is the run's own (``StageBuilder`` keys, ``Plan.visit`` dedup), built from the
suite's components exactly as ``benchbase run`` builds it, so the counts are the stages a run
executes. Nothing heavy is instantiated: components are parameter holders until a stage runs.

Times come from ``costs.toml`` (package data; ``--costs FILE`` adds or overrides entries):

- ``[devices.NAME]``: seconds per elementary operation (``ops``: a UNet forward per latent, a
  VAE encode per image, an AdamW step...) for one backend shape on one device, each table
  saying where its figures come from (measured with ``benchmarks/step_costs.py``, or a stated
  assumption);
- ``[components.FAMILY.NAME]``: how many of each operation one stage of that component makes,
  as formulas over the component's own parameters (``max_train_steps * 2 * max_f_train_steps``)
  and the run's sizes (``n_images``, ``n_prompts``, ``resolution``...), and the shared stages it
  computes once for many cells (class images, FSMG's surrogate) with the parameters that key them.

Formulas are a small, safe arithmetic language (numbers, names, + - * / // % **, comparisons,
``and``/``or``/``not``, ``a if c else b`` and the functions in ``FUNCTIONS``); an operation
name may hold ``{expr}`` parts (``"unet_train.{P}"``, ``"upscale_step.{low}"``), ``P`` being the
component's ``precision`` formula.
"""

from __future__ import annotations

import ast
import math
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from benchbase.errors import BenchbaseError, ConfigError, DataError
from benchbase.suite import Suite, tomllib

STAGE_ORDER = ("clean", "protect", "purify", "personalize", "generate", "score")


# ---------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------


def grid_windows(side: int, window: int, mosaic: bool = False) -> int:
    """Windows GrIDPure cuts from a ``side``-px image (half-window stride, last window flush with
    the edge, plus the corner mosaic): 9 + 1 at 512 px with 256-px windows."""
    side = max(side, window)
    pos = list(range(0, side - window + 1, max(1, window // 2)))
    if pos[-1] + window < side:
        pos.append(side - window)
    return len(pos) ** 2 + (1 if mosaic and len(pos) > 1 else 0)


FUNCTIONS = {"min": min, "max": max, "ceil": math.ceil, "floor": math.floor, "len": len, "round": round,
             "npositive": lambda values: sum(1 for v in values if v > 0),
             "ifnone": lambda value, default: default if value is None else value, "grid_windows": grid_windows}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def evaluate(expr: Any, names: dict) -> Any:
    """Value of a formula (a number or bool passes through) with ``names`` bound."""
    if not isinstance(expr, str):
        return expr
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"cost formula {expr!r}: {exc.msg}") from None
    return _eval(tree.body, names, expr)


def _eval(node: ast.AST, names: dict, expr: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise ConfigError(f"cost formula {expr!r}: unknown name {node.id!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, names, expr), _eval(node.right, names, expr))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, names, expr)
        if isinstance(node.op, ast.USub):
            return -value
        if isinstance(node.op, ast.UAdd):
            return +value
        if isinstance(node.op, ast.Not):
            return not value
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, names, expr) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
        left = _eval(node.left, names, expr)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, names, expr)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, names, expr) else node.orelse, names, expr)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, names, expr) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
            and not node.keywords:
        return FUNCTIONS[node.func.id](*(_eval(a, names, expr) for a in node.args))
    raise ConfigError(f"cost formula {expr!r}: {type(node).__name__} is not allowed")


def op_name(template: str, names: dict) -> str:
    """``"unet_train.{P}"`` -> ``"unet_train.bf16"``."""
    out, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        inner, _, rest = tail.partition("}")
        out += [head, str(evaluate(inner, names))]
    return "".join(out) + rest


# ---------------------------------------------------------------------------------------
# The cost table
# ---------------------------------------------------------------------------------------


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_costs(extra: Path | None = None) -> dict:
    """``costs.toml`` shipped with benchbase, with ``extra`` (a user's table) merged over it."""
    table = tomllib.loads(resources.files("benchbase").joinpath("costs.toml").read_text(encoding="utf-8"))
    if extra is not None:
        try:
            _merge(table, tomllib.loads(Path(extra).read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigError(f"cost table {extra}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"cost table {extra}: {exc}") from None
    return table


def pick_device(costs: dict, backend: str, name: str | None) -> str:
    devices = costs.get("devices", {})
    if name is not None:
        if name not in devices:
            raise ConfigError(f"no device {name!r} in the cost table; known: {', '.join(sorted(devices))} "
                              "(measure yours with benchmarks/step_costs.py and pass it with --costs)")
        return name
    for dev, table in devices.items():
        if backend in table.get("backends", ()):
            return dev
    raise ConfigError(f"no device in the cost table has figures for the {backend!r} backend; name one with "
                      f"--device ({', '.join(sorted(devices))})")


class Costs:
    """Seconds of operations on one device. A missing ``name.N`` (an image side) is scaled from
    the nearest measured side by area; any other missing operation is reported, not guessed."""

    def __init__(self, device: dict):
        self.ops: dict[str, float] = {k: float(v) for k, v in device.get("ops", {}).items()}

    def __call__(self, op: str) -> float | None:
        if op in self.ops:
            return self.ops[op]
        base, _, size = op.rpartition(".")
        if base and size.isdigit():
            sides = [int(k.rpartition(".")[2]) for k in self.ops
                     if k.rpartition(".")[0] == base and k.rpartition(".")[2].isdigit()]
            if sides:
                near = min(sides, key=lambda s: abs(math.log(s / int(size))))
                return self.ops[f"{base}.{near}"] * (int(size) / near) ** 2
        return None


# ---------------------------------------------------------------------------------------
# The plan and its cost
# ---------------------------------------------------------------------------------------


@dataclass
class Estimate:
    suite: str
    device: str
    device_info: dict
    identities: int
    seeds: int
    cells: int
    counts: Counter = field(default_factory=Counter)  # unique stages to compute, per kind
    cached: Counter = field(default_factory=Counter)  # found in --store
    seconds: Counter = field(default_factory=Counter)  # per kind
    by_label: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))  # (stage, label) -> [n, s]
    missing: dict = field(default_factory=lambda: defaultdict(set))  # op -> components lacking it
    notes: list = field(default_factory=list)
    # stage key -> (stage, label, seconds) of every planned stage: what benchmarks/calibrate.py
    # sets beside the seconds the store records for the same key (shared stages have no key here)
    by_key: dict = field(default_factory=dict)

    def add(self, stage: str, label: str, seconds: float, missing) -> None:
        """Count one unique stage of `stage` for component `label`, its time and the ops it lacks."""
        self.counts[stage] += 1
        self.seconds[stage] += seconds
        self.by_label[(stage, label)][0] += 1
        self.by_label[(stage, label)][1] += seconds
        for op in missing:
            self.missing[op].add(f"{stage} ({label})")

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def to_json(self) -> dict:
        return {"suite": self.suite, "device": self.device, "identities": self.identities, "seeds": self.seeds,
                "cells": self.cells, "counts": dict(self.counts), "cached": dict(self.cached),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "total_seconds": round(self.total, 3),
                "by_component": {f"{s}:{label}": {"stages": n, "seconds": round(sec, 3)}
                                 for (s, label), (n, sec) in self.by_label.items()},
                "missing": {op: sorted(who) for op, who in self.missing.items()}, "notes": self.notes}


def _stub_identity(name: str):
    from benchbase.graph import Identity

    def never():  # planning hashes keys only; it never loads images
        raise DataError(f"identity {name}: not read (estimate)")

    return Identity(name, f"estimate-{name}", never)


def plan_stages(suite: Suite, pm=None, identities: int | None = None, store: Path | None = None,
                images: int | None = None):
    """The stages a run of ``suite`` computes, deduplicated by key: ``(plan, builder, sizes)``.

    ``identities=N`` plans N stand-in identities without reading the dataset (what a
    dataset you do not have here would cost); otherwise the dataset is read (fingerprints and
    one identity's set sizes), and a dataset that cannot be read is one ``DataError`` line.
    ``store``: stages already there are not planned (what is left of a run)."""
    from benchbase.graph import Cell, CellPlan, Identity, Plan
    from benchbase.models.sd import parse_device, resolve_dtype
    from benchbase.plugins import get_plugin_manager
    from benchbase.stages import StageBuilder
    from benchbase.store import Store
    from benchbase.suite import build_components

    pm = pm or get_plugin_manager()
    components = build_components(suite, pm)
    component = lambda spec: components[id(spec)]
    backend, dataset = component(suite.backend), component(suite.dataset)
    base = dataset.prompts()
    over = suite.prompts
    from benchbase.components import Prompts

    prompts = Prompts(instance=over.get("instance", base.instance), class_=over.get("class", base.class_),
                      eval=list(over.get("eval", base.eval)), negative=over.get("negative", base.negative),
                      identifier=base.identifier, class_noun=base.class_noun)
    sizes = {"n_images": images or 4, "n_set_A": images or 4, "n_set_C": images or 4}
    if identities is not None:
        idents = [_stub_identity(f"identity-{i:03d}") for i in range(identities)]
    else:
        try:
            names = list(dataset.identities())
            idents = [Identity(n, dataset.fingerprint(n), lambda n=n: dataset.load(n, backend.resolution))
                      for n in names]
            if idents and images is None:
                data = idents[0].data
                sizes = {"n_images": len(data.set_B), "n_set_A": len(data.set_A), "n_set_C": len(data.set_C)}
        except (BenchbaseError, OSError) as exc:
            raise DataError(f"dataset {suite.dataset.name!r} of {suite.source} cannot be read ({exc}); "
                            "pass --identities N to estimate N identities without reading it") from None
    try:
        backend_fp = backend.fingerprint()
    except (BenchbaseError, OSError):
        backend_fp = f"estimate-{suite.backend.name}"
    builder = StageBuilder(suite, component, backend, backend_fp, prompts, parse_device(suite.device),
                           resolve_dtype(suite.dtype), progress=None, shared=None, workdir=None, read=None,
                           plugins=pm)
    for attack in suite.attacks:  # a surrogate whose weights are not here is priced under its label
        if attack.surrogate is not None:
            try:
                builder.attack_backend(attack)
            except (BenchbaseError, OSError):
                builder.__dict__.setdefault("surrogate_fps", {})[id(attack.surrogate)] = f"estimate-{attack.surrogate.label}"
    done = Store(store).done if store is not None else None
    is_done = (lambda node: done(node.stage, node.key)) if done else (lambda node: False)
    plan = Plan()
    for seed in suite.seeds:
        for ident in idents:
            for ai, a in enumerate(suite.attacks):
                for ci, chain in enumerate(suite.purifiers):
                    for di, d in enumerate(suite.defenses):
                        for pi, p in enumerate(suite.personalizers):
                            if not suite.keeps(a, chain, d, p):
                                continue
                            cell = Cell(ident.name, seed, a, chain, d, p, at=(ai, ci, di, pi))
                            cp = CellPlan(len(plan.cells), cell, ident)
                            plan.cells.append(cp)
                            plan.visit(builder.clean(ident, cell), cp.index, is_done)
                            for spec in suite.metrics:
                                plan.visit(builder.score(ident, cell, spec), cp.index, is_done)
    return plan, builder, component, prompts, backend, sizes, idents


def estimate(suite: Suite, device: str | None = None, costs_file: Path | None = None, identities: int | None = None,
             store: Path | None = None, images: int | None = None, pm=None) -> Estimate:
    costs_table = load_costs(costs_file)
    plan, builder, component, prompts, backend, sizes, idents = plan_stages(
        suite, pm, identities=identities, store=store, images=images)
    dev = pick_device(costs_table, suite.backend.name, device)
    dev_table = costs_table["devices"][dev]
    costs = Costs(dev_table)
    comp_table = costs_table.get("components", {})
    est = Estimate(suite.name, dev, {k: v for k, v in dev_table.items() if k != "ops"}, len(idents),
                   len(suite.seeds), len(plan.cells))
    if suite.backend.name not in dev_table.get("backends", ()):
        est.notes.append(f"device {dev!r} has figures for the {', '.join(dev_table.get('backends', [])) or '?'} "
                         f"backend; the suite runs {suite.backend.name!r}")
    est.cached.update(plan.cached)
    base_names = {**sizes, "n_prompts": len(prompts.eval), "resolution": backend.resolution,
                  "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(suite.dtype, suite.dtype),
                  "gpu": bool(dev_table.get("gpu", False)), **dev_table.get("vars", {})}
    shared_seen: set = set()

    def table_for(family: str, comp, stage: str) -> dict | None:
        tables = comp_table.get(family, {})
        table = tables.get(comp.name, tables.get("*"))
        if family == "personalizers" and table is not None:
            table = table.get(stage)
        return table

    for node in plan.nodes.values():
        a = node.address
        stage = a.stage
        cell = builder.cell_at(a)
        extra: dict = {"_identity": a.identity}
        if stage == "protect":
            jobs, label = [("attacks", component(cell.attack))], cell.attack.label
        elif stage == "purify":
            jobs = [("purifiers", component(s)) for s in cell.purifiers]
            label = "+".join(s.label for s in cell.purifiers)
        elif stage in ("personalize", "generate"):
            jobs, label = [("personalizers", component(cell.personalizer))], cell.personalizer.label
        elif stage == "score":
            spec = suite.metrics[a.metric]
            metric, pers = component(spec), component(cell.personalizer)
            n_gen = int(getattr(getattr(pers, "params", None), "num_images_per_prompt", 0)) * len(prompts.eval)
            sets = {"generated": n_gen, "references": sizes["n_set_C"], "set_A": sizes["n_set_A"]}
            extra.update(n_read=sum(sets.get(r, sizes["n_images"]) for r in set(metric.reads)), n_generated=n_gen)
            jobs, label = [("metrics", metric)], spec.label
        else:  # clean: PNG writing only
            jobs, label = [], stage
        total, missing = 0.0, set()
        for family, comp in jobs:
            table = table_for(family, comp, stage)
            if table is None:
                missing.add(f"<no cost entry for {family[:-1]} {comp.name!r}" + (f" ({stage})" if family ==
                                                                                  "personalizers" else "") + ">")
                continue
            names = {**base_names, **comp.config(), **extra}
            seconds, miss, shared = stage_cost(table, names, costs, shared_seen)
            total += seconds
            missing |= miss
            for s_stage, s_seconds, s_missing in shared:
                est.add(s_stage, label, s_seconds, s_missing)
        est.add(stage, label, total, missing)
        est.by_key[node.key] = (stage, label, total)
    return est


def _bind(table: dict, names: dict) -> dict:
    """``names`` with the table's ``precision`` (as P) and ``let`` names added, in order."""
    names = dict(names)
    if "precision" in table:
        names["P"] = evaluate(table["precision"], names)
    for key, formula in table.get("let", {}).items():
        names[key] = evaluate(formula, names)
    return names


def stage_cost(table: dict, names: dict, costs: "Costs", shared_seen: set) -> tuple[float, set, list]:
    """Seconds of one stage described by ``table`` (and the shared stages it needs that no earlier
    stage computed: ``[(stage, seconds, missing ops)]``)."""
    names = _bind(table, names)
    seconds, missing = _ops(table.get("ops", {}), names, costs)
    shared = []
    for stage, spec in table.get("shared", {}).items():
        s_names = _bind(spec, names)
        if not evaluate(spec.get("when", True), s_names):
            continue
        key = (stage, tuple(repr(evaluate(k, s_names)) for k in spec.get("key", [])),
               names.get("_identity") if spec.get("per_identity") else None)
        if key in shared_seen:
            continue
        shared_seen.add(key)
        s_seconds, s_missing = _ops(spec.get("ops", {}), s_names, costs)
        shared.append((stage, s_seconds, s_missing))
    return seconds, missing, shared


def _ops(ops: dict, names: dict, costs: Costs) -> tuple[float, set]:
    seconds, missing = 0.0, set()
    for template, count in ops.items():
        n = evaluate(count, names)
        if not n:
            continue
        op = op_name(template, names)
        each = costs(op)
        if each is None:
            missing.add(op)
            continue
        seconds += float(n) * each
    return seconds, missing


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(est: Estimate, top: int = 12) -> str:
    gpu = est.device_info.get("gpu", False)
    lines = [f"suite {est.suite}: {est.identities} identities x {est.seeds} seed(s), {est.cells} cells; "
             f"device {est.device}: {est.device_info.get('description', '')}"]
    if est.device_info.get("source"):
        lines.append(f"figures: {est.device_info['source']}")
    lines.append("")
    lines.append(f"{'stage':<16}{'unique':>8}{'cached':>8}{'time':>12}{'share':>8}")
    total = est.total or 1.0
    kinds = [k for k in STAGE_ORDER if k in est.counts or k in est.cached]
    kinds += sorted(k for k in set(est.counts) | set(est.cached) if k not in kinds)
    for kind in kinds:
        lines.append(f"{kind:<16}{est.counts.get(kind, 0):>8}{est.cached.get(kind, 0):>8}"
                     f"{_duration(est.seconds.get(kind, 0.0)):>12}{100 * est.seconds.get(kind, 0.0) / total:>7.1f}%")
    unit = "GPU-hours" if gpu else "hours"
    lines.append(f"{'total':<16}{sum(est.counts.values()):>8}{sum(est.cached.values()):>8}"
                 f"{_duration(est.total):>12}   = {est.total / 3600:.1f} {unit} on one device"
                 + (f" ({est.total / 86400:.1f} days)" if est.total > 2 * 86400 else ""))
    lines.append("")
    lines.append("largest parts (stage: component  count x each = total):")
    rows = sorted(est.by_label.items(), key=lambda kv: -kv[1][1])[:top]
    for (stage, label), (n, sec) in rows:
        lines.append(f"  {stage}: {label:<28}{n:>6} x {_duration(sec / max(n, 1)):>9} = {_duration(sec):>9}"
                     f" ({100 * sec / total:.1f}%)")
    for op, who in sorted(est.missing.items()):
        lines.append(f"not counted: no figure for {op!r} on {est.device} (needed by {', '.join(sorted(who)[:4])}"
                     + (", ..." if len(who) > 4 else "") + ")")
    for note in est.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
