"""Suite files (TOML) -> a validated grid.

A suite names one backend and one dataset, and lists attacks, purifiers (a purifier may be
a chain), defenses, personalizers and metrics. Each list entry is a name, or a table with
``name``, an optional ``label`` (to put the same component twice with other parameters)
and the component's parameters::

    name = "smoke"
    seeds = [0]
    device = "auto"            # auto | cpu | cuda | cuda:1
    dtype = "float32"          # float32 | bfloat16 | float16

    backend = { name = "tiny", resolution = 64 }
    dataset = { name = "sample" }
    attacks = ["none", { name = "noise", eps = 8 }]
    # an attack's own model (transfer; label "advdm@tiny(seed=1)") and a sweep (labels "noise[eps=4]", ...)
    # attacks = [{ name = "advdm", surrogate = { name = "tiny", seed = 1 } }, { name = "noise", sweep = { eps = [4, 8] } }]
    purifiers = ["none", "jpeg", ["jpeg", { name = "jpeg", quality = 50 }]]
    defenses = ["none"]
    personalizers = [{ name = "dreambooth", max_train_steps = 20 }]
    metrics = ["psnr", "ref-rmse"]

    executor = { name = "ray", max_retries = 5 }   # optional; default local (--executor overrides)

    # optional: run only these cells instead of the full cross product (a key left out
    # matches every entry of its list; values are labels; `Suite.cell_filter` in code)
    cells = [{ attack = "none" }, { attack = "noise", purifier = "none" }]

    # optional: paired contrasts the leaderboard reports as mean difference over identities
    # with a 95% t-interval (a - b per identity). A cell selector's missing keys mean
    # attack/purifier/defense "none" and the first personalizer; `recovery` (optional) names
    # a reference cell r and adds (mean a - mean b) / (mean r - mean b). `direction` (optional):
    # "greater" (a > b) or "less" (a < b) makes the t-test one-sided (default "two-sided");
    # contrasts with the same `family` are Holm-adjusted together (docs/report.md).
    contrasts = [
      { label = "aspl vs noise", metric = "ism", a = { attack = "noise" }, b = { attack = "aspl" }, direction = "greater", family = "protection" },
    ]

    [prompts]                  # optional; defaults come from the dataset
    instance = "a photo of sks person"
    class = "a photo of person"
    eval = ["a photo of sks person", "a dslr portrait of sks person"]
    negative = ""
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, StrictStr, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchbase.errors import BenchbaseError, ConfigError, validation_problems
from benchbase.families import CELL_KEYS, GRID_FAMILIES

LIST_FAMILIES = GRID_FAMILIES  # the suite's lists: attacks, purifiers, defenses, personalizers, metrics
TOP_KEYS = {"name", "description", "seeds", "seed", "device", "dtype", "backend", "dataset", "prompts",
            "run_dir", "executor", "cells", "contrasts", *LIST_FAMILIES}
# how a grid is executed does not change its results: left out of the suite hash
NOT_HASHED = {"executor"}
PROMPT_KEYS = {"instance", "class", "eval", "negative"}
RESERVED = {"name", "label", "adaptive", "sweep", "surrogate"}
#: families whose entries may sweep a parameter (``sweep = { eps = [2, 4, 8] }``)
SWEEP_FAMILIES = ("attacks", "purifiers")
# the names benchbase.models.sd.DTYPES resolves (not imported: reading a suite needs no torch)
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class Spec:
    """One component as the suite names it."""

    family: str
    name: str
    params: dict = field(default_factory=dict)
    label: str = ""
    adaptive: bool = False
    where: str = ""  # its place in the suite file, e.g. "attacks[1]", for error messages
    #: the label before a sweep value and a surrogate suffix ("aspl" of "aspl[eps=4]@mini(version=v3)"):
    #: the protect stage's random stream follows it, so a swept value draws what a plain entry would
    base: str = ""
    #: (parameter, value) of a swept entry; ``sweep_raw`` holds the suite's ``sweep`` table until expansion
    sweep: tuple[str, Any] | None = None
    sweep_raw: Any = None
    #: an attack's own surrogate backend (``surrogate = { name = "mini", version = "v3" }``); None:
    #: the suite's backend, i.e. the victim's
    surrogate: "Spec | None" = None

    def as_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "params": self.params, "adaptive": self.adaptive}

    def describe(self) -> str:
        """``attacks[1] (label 'noise-16')``: the entry as a user finds it in the suite file."""
        label = f" (label {self.label!r})" if self.label and self.label != self.name else ""
        return f"{self.where or self.family}{label}"


@dataclass
class Suite:
    name: str
    description: str
    seeds: list[int]
    device: str
    dtype: str
    backend: Spec
    dataset: Spec
    attacks: list[Spec]
    purifiers: list[list[Spec]]  # each entry is a chain (length 1 for a single purifier)
    defenses: list[Spec]
    personalizers: list[Spec]
    metrics: list[Spec]
    prompts: dict
    source: str = "<memory>"
    raw: dict = field(default_factory=dict)
    executor: Spec | None = None  # default executor (the CLI's --executor overrides it)
    cell_filter: list[dict[str, str]] | None = None  # the file's `cells` key; None: the full cross product
    contrasts: list[dict] = field(default_factory=list)  # completed selectors (see contrasts_of)

    @property
    def hash(self) -> str:
        graded = {k: v for k, v in self.raw.items() if k not in NOT_HASHED}
        return hashlib.sha256(json.dumps(graded, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def purifier_label(self, chain: list[Spec]) -> str:
        return "+".join(s.label for s in chain)

    def keeps(self, attack: Spec, chain: list[Spec], defense: Spec, personalizer: Spec) -> bool:
        """Whether the cell is in the grid (always, without a `cells` filter)."""
        if self.cell_filter is None:
            return True
        labels = {"attack": attack.label, "purifier": self.purifier_label(chain), "defense": defense.label,
                  "personalizer": personalizer.label}
        return any(all(labels[k] == v for k, v in rule.items()) for rule in self.cell_filter)

    @property
    def n_cells(self) -> int:
        """Cells per identity (all seeds)."""
        kept = sum(self.keeps(a, c, d, p) for a in self.attacks for c in self.purifiers for d in self.defenses
                   for p in self.personalizers)
        return len(self.seeds) * kept

    def specs(self) -> list[Spec]:
        """Every component entry (backend, dataset, then the lists in file order; chains flattened)."""
        return [self.backend, self.dataset, *self.attacks, *self.surrogates(),
                *(s for c in self.purifiers for s in c), *self.defenses, *self.personalizers, *self.metrics]

    def surrogates(self) -> list[Spec]:
        """The attacks' own surrogate backends (``surrogate`` entries), in file order."""
        return [a.surrogate for a in self.attacks if a.surrogate is not None]


# ---------------------------------------------------------------------------------------
# The file schema (pydantic): types, bounds and shapes; labels are checked after it
# ---------------------------------------------------------------------------------------


def _entry(value: Any) -> Spec:
    """A list entry: a component name, or a table with ``name``, optional ``label``/``adaptive``
    and the component's parameters (also accepted: ``{ name = "x", params = { ... } }``).
    A ValueError's message becomes the problem's line (errors.validation_problems)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("a component name must not be empty")
        return Spec("", value, {}, value)
    if isinstance(value, dict):
        if not isinstance(value.get("name"), str) or not value["name"].strip():
            raise ValueError("a table entry needs a string `name`")
        params = {k: v for k, v in value.items() if k not in RESERVED}
        if "params" in params and isinstance(params["params"], dict) and len(params) == 1:
            params = params["params"]
        adaptive = value.get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise ValueError("`adaptive` must be true or false")
        label = value.get("label", "")
        if not isinstance(label, str):
            raise ValueError("`label` must be a string")
        spec = Spec("", value["name"], params, label, adaptive)
        if "sweep" in value:
            spec.sweep_raw = _sweep_table(value["sweep"], params)
        if "surrogate" in value:
            spec.surrogate = _surrogate(value["surrogate"])
        return spec
    raise ValueError("expected a component name or a table like { name = \"...\" }")


def _sweep_table(value: Any, params: dict) -> tuple[str, list]:
    """``sweep = { eps = [2, 4, 8] }``: one parameter, a non-empty list of distinct scalars (a
    list-valued parameter is never expanded unless the entry says ``sweep``)."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError("`sweep` must be a table of one parameter and its values, e.g. sweep = { eps = [2, 4, 8] }")
    ((param, values),) = value.items()
    if param in params:
        raise ValueError(f"`{param}` is both a parameter and swept: give it in `sweep` only")
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float, str, bool)) for v in values)):
        raise ValueError(f"sweep {param}: a non-empty list of numbers or strings (got {values!r})")
    if len({json.dumps(v) for v in values}) != len(values):
        raise ValueError(f"sweep {param}: a value appears twice in {values!r}")
    return param, values


def _surrogate(value: Any) -> Spec:
    """An attack's ``surrogate``: a backend, as the suite's ``backend`` is written."""
    if isinstance(value, (str, dict)) and not (isinstance(value, dict) and {"sweep", "surrogate"} & set(value)):
        try:
            spec = _entry(value)
        except ValueError as exc:
            raise ValueError(f"surrogate: {exc}") from None
        spec.label = spec.label or backend_label(spec.name, spec.params)
        return spec
    raise ValueError("`surrogate` must be a backend table like { name = \"mini\", version = \"v3\" }")


def backend_label(name: str, params: dict) -> str:
    """``mini(version=v3)``: a backend named by its name and the parameters given (the default when
    none); a ``label`` in its table replaces it."""
    if not params:
        return name
    return f"{name}(" + ",".join(f"{k}={_value_text(v)}" for k, v in sorted(params.items())) + ")"


def _value_text(value: Any) -> str:
    """A swept or backend parameter value as a label shows it (``4``, ``6.375``, ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _expand(specs: list[Spec], family: str) -> list[Spec]:
    """Swept entries -> one entry per value (label ``aspl[eps=4]``), then each attack with a
    ``surrogate`` gets the suffix ``@<surrogate label>``; ``base`` keeps the label before both."""
    out = []
    for spec in specs:
        spec.base = spec.base or spec.label
        if spec.sweep_raw is None:
            out.append(spec)
            continue
        param, values = spec.sweep_raw
        for v in values:
            out.append(Spec(spec.family, spec.name, {**spec.params, param: v},
                            f"{spec.label}[{param}={_value_text(v)}]", spec.adaptive, spec.where, base=spec.base,
                            sweep=(param, v), surrogate=spec.surrogate))  # one model, built and hashed once
    for spec in out:
        if spec.surrogate is not None:
            spec.surrogate.family, spec.surrogate.where = "backends", f"{spec.where}.surrogate"
            spec.label = f"{spec.label}@{spec.surrogate.label}"
    return out


def _expand_chains(chains: list[list[Spec]]) -> tuple[list[list[Spec]], list[str]]:
    """A chain with a swept purifier -> one chain per value (at most one item of a chain sweeps)."""
    out, problems = [], []
    for chain in chains:
        problems += [f"{s.where}: `surrogate` is for attacks only" for s in chain if s.surrogate is not None]
        swept = [i for i, s in enumerate(chain) if s.sweep_raw is not None]
        if len(swept) > 1:
            problems.append(f"{chain[swept[1]].where}: one purifier of a chain may sweep, not several")
        if not swept:
            out.append(chain)
            continue
        i = swept[0]
        out += [[*chain[:i], item, *chain[i + 1:]] for item in _expand([chain[i]], "purifiers")]
    for chain in out:
        for s in chain:
            s.base = s.base or s.label
    return out, problems


def _chain(value: Any) -> list[Spec]:
    """A purifiers entry: one purifier, or a list of them applied left to right."""
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty chain (a chain lists at least one purifier)")
        chain = []
        for i, item in enumerate(value):
            try:
                chain.append(_entry(item))
            except ValueError as exc:
                raise ValueError(f"chain item {i} ({item!r}): {exc}") from None
        return chain
    return [_entry(value)]


Entry = Annotated[Any, PlainValidator(_entry)]
Chain = Annotated[Any, PlainValidator(_chain)]
Seed = Annotated[StrictInt, Field(ge=0)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class _Prompts(_Table):
    instance: StrictStr | None = None
    class_: StrictStr | None = Field(None, alias="class")
    eval: list[StrictStr] | None = Field(None, min_length=1)
    negative: StrictStr | None = None


class _CellSelector(_Table):
    attack: StrictStr | None = None
    purifier: StrictStr | None = None
    defense: StrictStr | None = None
    personalizer: StrictStr | None = None


class _Contrast(_Table):
    label: StrictStr | None = None
    metric: StrictStr
    a: _CellSelector
    b: _CellSelector
    recovery: _CellSelector | None = None
    #: the hypothesis: "two-sided" (a ≠ b, the default), "greater" (a > b) or "less" (a < b), one-sided
    direction: Literal["two-sided", "greater", "less"] = "two-sided"
    #: contrasts sharing a family label are one family of tests: their p-values are Holm-adjusted together
    family: StrictStr | None = None


class SuiteFile(_Table):
    """What a suite file may contain (the module docstring shows an example)."""

    name: StrictStr | None = None
    description: StrictStr = ""
    seeds: list[Seed] | None = Field(None, min_length=1)
    seed: Seed | None = None
    device: StrictStr = "auto"
    dtype: Literal[DTYPE_NAMES] = "float32"  # type: ignore[valid-type]
    backend: Entry
    dataset: Entry
    attacks: list[Entry] = Field(min_length=1)
    purifiers: list[Chain] = Field(default_factory=lambda: ["none"], min_length=1)
    defenses: list[Entry] = Field(default_factory=lambda: ["none"], min_length=1)
    personalizers: list[Entry] = Field(min_length=1)
    metrics: list[Entry] = Field(min_length=1)
    prompts: _Prompts = Field(default_factory=_Prompts)
    run_dir: StrictStr | None = None
    executor: Entry | None = None
    cells: list[_CellSelector] | None = Field(None, min_length=1)
    contrasts: list[_Contrast] | None = None


TOP_KEYS = set(SuiteFile.model_fields)
_DEVICE = re.compile(r"^(auto|[a-z][a-z0-9_]*(:\d+)?)$")  # the syntax; resolve_device checks it exists


def _known_keys(parent: tuple) -> list[str]:
    """The keys a suite table at ``parent`` accepts (for suggestions)."""
    if parent[:1] == ("prompts",):
        return sorted(PROMPT_KEYS)
    if parent[:1] == ("cells",) or parent[-1:] in (("a",), ("b",), ("recovery",)):
        return list(CELL_KEYS)
    if parent[:1] == ("contrasts",):
        return list(_Contrast.model_fields)
    return []


def _messages(exc: ValidationError) -> list[str]:
    """Pydantic's problems in the suite's words (one line each, without the source)."""
    lines, unknown = [], []
    for err in exc.errors():
        loc, kind = err["loc"], err["type"]
        if kind == "extra_forbidden" and len(loc) == 1:
            unknown.append(str(loc[0]))
        elif kind == "missing" and len(loc) == 1:
            lines.append(f"missing `{loc[0]}` (e.g. {loc[0]} = {{ name = \"...\" }})"
                         if loc[0] in ("backend", "dataset") else f"missing `{loc[0]}` (a non-empty list)")
        elif kind == "too_short" and loc and loc[-1] in (*LIST_FAMILIES, "seeds", "cells"):
            lines.append(f"`{loc[-1]}` must be a non-empty list")
        elif kind == "list_type" and len(loc) == 1:
            lines.append(f"`{loc[0]}` must be a list (got {err['input']!r})")
        else:
            lines += validation_problems([err], _known_keys)
    if unknown:
        hints = [f"{u!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(u, TOP_KEYS, n=1))
                 else repr(u) for u in unknown]
        lines.insert(0, f"unknown suite keys {', '.join(hints)}; known: {', '.join(sorted(TOP_KEYS))}")
    return lines


def _labels(lists: dict) -> dict[str, list[str]]:
    return {key: (["+".join(s.label for s in c) for c in lists[fam]] if fam == "purifiers"
                  else [s.label for s in lists[fam]]) for key, fam in CELL_KEYS.items()}


def _auto_labels(specs: list[Spec]) -> None:
    """Label = name, unless the same name appears with other parameters: then name + a short
    hash of the parameters (give ``label`` in the suite for a readable one)."""
    variants: dict[str, set[str]] = {}
    modes: dict[str, set[bool]] = {}
    for s in specs:
        variants.setdefault(s.name, set()).add(json.dumps(s.params, sort_keys=True, default=str))
        modes.setdefault(s.name, set()).add(s.adaptive)
    for s in specs:
        if not s.label:
            label = s.name
            if len(variants[s.name]) > 1:
                label += "-" + hashlib.sha256(json.dumps(s.params, sort_keys=True, default=str).encode()
                                              ).hexdigest()[:6]
            if s.adaptive and len(modes[s.name]) > 1:  # "aspl" beside an adaptive "aspl"
                label += "-adaptive"
            s.label = label


def _check_cell(selector: dict, known: dict[str, list[str]], where: str) -> list[str]:
    """A cell selector names only labels the suite has."""
    return [f"{where}: {k} {v!r} is not in the suite; labels: {', '.join(known[k])}"
            for k, v in selector.items() if v not in known[k]]


def _plain_name(name: str) -> str | None:
    """Why a suite name cannot name a run folder (``runs/<name>``), or None."""
    if not name.strip() or name in (".", "..") or re.search(r"[/\\\x00-\x1f]", name):
        return f"`name` {name!r} must be a plain folder name (no '/', '\\\\', control characters, '.' or '..')"
    return None


def parse_suite(data: dict, source: str = "<memory>") -> Suite:
    """Validate a suite's TOML data; every problem is one line of the ConfigError, naming
    ``source`` and the place (``bad.toml: attacks[1]: ...``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a suite is a TOML table, got {type(data).__name__}")
    try:
        parsed = SuiteFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{source}: {line}" for line in _messages(exc))) from None
    problems: list[str] = []
    if parsed.seeds is not None and parsed.seed is not None:
        problems.append("give `seeds` or `seed`, not both")
    seeds = parsed.seeds if parsed.seeds is not None else [parsed.seed or 0]
    if len(set(seeds)) != len(seeds):
        problems.append(f"`seeds` lists a seed twice: {seeds}")
    if not _DEVICE.match(parsed.device):
        problems.append(f"device {parsed.device!r} is not a device name (auto, cpu, cuda, cuda:1, mps)")
    name = parsed.name
    if name is None:  # the file's stem, made a plain folder name only when it is not one
        name = Path(source).stem
        if _plain_name(name) is not None:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "suite"
    if (why := _plain_name(name)) is not None:
        problems.append(why)

    lists: dict[str, Any] = {}
    for family in LIST_FAMILIES:
        entries = getattr(parsed, family)
        if family == "purifiers":
            entries = [c if isinstance(c, list) else _chain(c) for c in entries]  # the "none" default
            for i, chain in enumerate(entries):
                for j, spec in enumerate(chain):
                    spec.family, spec.where = family, f"purifiers[{i}]" + (f"[{j}]" if len(chain) > 1 else "")
            _auto_labels([s for chain in entries for s in chain])
            entries, why = _expand_chains(entries)
            problems += why
            labels = ["+".join(s.label for s in c) for c in entries]
        else:
            entries = [e if isinstance(e, Spec) else _entry(e) for e in entries]
            for i, spec in enumerate(entries):
                spec.family, spec.where = family, f"{family}[{i}]"
            _auto_labels(entries)
            problems += [f"{s.where}: `sweep` is for attacks and purifiers only" for s in entries
                         if s.sweep_raw is not None and family not in SWEEP_FAMILIES]
            problems += [f"{s.where}: `surrogate` is for attacks only" for s in entries
                         if s.surrogate is not None and family != "attacks"]
            entries = _expand(entries, family) if family in SWEEP_FAMILIES else entries
            labels = [s.label for s in entries]
        problems += [f"{family} entry {label!r} appears twice; give one a distinct `label`"
                     for label in sorted({x for x in labels if labels.count(x) > 1})]
        lists[family] = entries
    backend, dataset = parsed.backend, parsed.dataset
    backend.family, backend.where, dataset.family, dataset.where = "backends", "backend", "datasets", "dataset"
    backend.label, dataset.label = backend.label or backend.name, dataset.label or dataset.name
    executor = parsed.executor
    if executor is not None:
        executor.family, executor.where = "executors", "executor"
    problems += [f"{s.where}: `sweep` and `surrogate` belong to attack (and purifier) entries"
                 for s in (backend, dataset, executor) if s is not None and (s.sweep_raw or s.surrogate)]

    known = _labels(lists)
    cell_filter = None
    if parsed.cells is not None:
        cell_filter = [rule.model_dump(exclude_none=True) for rule in parsed.cells]
        for i, rule in enumerate(cell_filter):
            problems += _check_cell(rule, known, f"cells[{i}]")
    contrasts = []
    defaults = {"attack": "none", "purifier": "none", "defense": "none", "personalizer": known["personalizer"][0]}
    for i, c in enumerate(parsed.contrasts or []):
        item = {"label": c.label or f"{c.metric}: a - b", "metric": c.metric, "direction": c.direction}
        if c.family is not None:
            item["family"] = c.family
        for side in ("a", "b", "recovery"):
            sel = getattr(c, side)
            if sel is None:
                continue
            item[side] = {**defaults, **sel.model_dump(exclude_none=True)}
            problems += _check_cell(item[side], known, f"contrasts[{i}].{side}")  # the defaults must exist too
        contrasts.append(item)
    if problems:
        raise ConfigError("\n".join(f"{source}: {line}" for line in problems))
    return Suite(
        name=name, description=parsed.description, seeds=seeds, device=parsed.device, dtype=parsed.dtype,
        backend=backend, dataset=dataset, prompts=dict(data.get("prompts") or {}), source=source, raw=data,
        executor=executor, cell_filter=cell_filter, contrasts=contrasts, **lists,
    )


def build_components(suite: Suite, manager) -> dict[int, Any]:
    """Create every component the suite names, with validated parameters: ``{id(spec): component}``.

    All problems are reported at once, one line each naming the suite file, the entry and the
    parameter (``bad.toml: attacks[1] 'noise': attack 'noise': eps: Input should be a finite
    number (got nan)``)."""
    from benchbase.components import FAMILY_BASES

    out: dict[int, Any] = {}
    problems: list[str] = []
    for spec in suite.specs():
        try:
            component = manager.create(spec.family, spec.name, spec.params)
        except BenchbaseError as exc:  # unknown name, bad parameters, a plugin that fails to import
            problems += [f"{suite.source}: {spec.describe()}: {line}" for line in str(exc).splitlines()]
            continue
        base = FAMILY_BASES[spec.family]
        if not isinstance(component, base):
            problems.append(f"{suite.source}: {spec.describe()}: {spec.family[:-1]} {spec.name!r} is a "
                            f"{type(component).__name__}, not a benchbase {base.__name__}")
            continue
        out[id(spec)] = component
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def builtin_suites() -> dict[str, str]:
    """Built-in suite names -> TOML text (files shipped in benchbase/suites/)."""
    folder = resources.files("benchbase.suites")
    return {p.name[:-5]: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.name.endswith(".toml")}


def load_suite(ref: str | None = None) -> Suite:
    """A suite from a TOML path, or a built-in suite by name (default: ``mini``)."""
    ref = ref or "mini"
    path = Path(ref)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"suite file {path} does not exist")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"suite file {path} cannot be read: {exc}") from None
    else:
        suites = builtin_suites()
        if ref not in suites:
            close = difflib.get_close_matches(ref, list(suites), n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"no suite file {ref!r} and no built-in suite of that name.{hint} "
                              f"Built-in suites: {', '.join(sorted(suites))}.")
        text, source = suites[ref], f"builtin:{ref}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_suite(data, source)


def contrasts_of(data: dict, lists: dict | None = None, source: str = "<suite>") -> list[dict]:
    """The suite's ``contrasts`` with every cell selector completed (see the module docstring):
    a selector's missing keys mean attack/purifier/defense "none" and the first personalizer."""
    if not data.get("contrasts"):
        return []
    return parse_suite(data, source).contrasts
