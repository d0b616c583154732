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
    purifiers = ["none", "jpeg", ["jpeg", { name = "jpeg", quality = 50 }]]
    defenses = ["none"]
    personalizers = [{ name = "dreambooth", max_train_steps = 20 }]
    metrics = ["psnr", "ref-rmse"]

    executor = { name = "ray", max_retries = 5 }   # optional; default local (--executor overrides)

    # optional: run only these cells instead of the full cross product (a key left out
    # matches every entry of its list; values are labels)
    cells = [{ attack = "none" }, { attack = "noise", purifier = "none" }]

    # optional: paired contrasts the leaderboard reports as mean difference over identities
    # with a 95% t-interval (a - b per identity). A cell selector's missing keys mean
    # attack/purifier/defense "none" and the first personalizer; `recovery` (optional) names
    # a reference cell r and adds (mean a - mean b) / (mean r - mean b).
    contrasts = [{ label = "aspl vs noise", metric = "ism", a = { attack = "noise" }, b = { attack = "aspl" } }]

    [prompts]                  # optional; defaults come from the dataset
    instance = "a photo of sks person"
    class = "a photo of person"
    eval = ["a photo of sks person", "a dslr portrait of sks person"]
    negative = ""
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchbase.errors import ConfigError
from benchbase.families import CELL_KEYS, GRID_FAMILIES

LIST_FAMILIES = GRID_FAMILIES  # the suite's lists: attacks, purifiers, defenses, personalizers, metrics
TOP_KEYS = {"name", "description", "seeds", "seed", "device", "dtype", "backend", "dataset", "prompts",
            "run_dir", "executor", "cells", "contrasts", *LIST_FAMILIES}
# how a grid is executed does not change its results: left out of the suite hash
NOT_HASHED = {"executor"}
PROMPT_KEYS = {"instance", "class", "eval", "negative"}
RESERVED = {"name", "label", "adaptive"}


@dataclass
class Spec:
    """One component as the suite names it."""

    family: str
    name: str
    params: dict = field(default_factory=dict)
    label: str = ""
    adaptive: bool = False

    def as_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "params": self.params, "adaptive": self.adaptive}


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
    only: list[dict[str, str]] | None = None  # the `cells` filter; None: the full cross product

    @property
    def hash(self) -> str:
        graded = {k: v for k, v in self.raw.items() if k not in NOT_HASHED}
        return hashlib.sha256(json.dumps(graded, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def purifier_label(self, chain: list[Spec]) -> str:
        return "+".join(s.label for s in chain)

    def keeps(self, attack: Spec, chain: list[Spec], defense: Spec, personalizer: Spec) -> bool:
        """Whether the cell is in the grid (always, without a `cells` filter)."""
        if self.only is None:
            return True
        labels = {"attack": attack.label, "purifier": self.purifier_label(chain), "defense": defense.label,
                  "personalizer": personalizer.label}
        return any(all(labels[k] == v for k, v in rule.items()) for rule in self.only)

    @property
    def n_cells(self) -> int:
        """Cells per identity (all seeds)."""
        kept = sum(self.keeps(a, c, d, p) for a in self.attacks for c in self.purifiers for d in self.defenses
                   for p in self.personalizers)
        return len(self.seeds) * kept


def _spec(family: str, entry: Any, where: str) -> Spec:
    if isinstance(entry, str):
        return Spec(family, entry, {}, entry)
    if isinstance(entry, dict):
        if "name" not in entry or not isinstance(entry["name"], str):
            raise ConfigError(f"{where}: a table entry needs a string `name` (got {entry!r})")
        params = {k: v for k, v in entry.items() if k not in RESERVED}
        if "params" in params and isinstance(params["params"], dict) and len(params) == 1:
            params = params["params"]  # also accept { name = "x", params = { ... } }
        adaptive = entry.get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise ConfigError(f"{where}: `adaptive` must be true or false")
        return Spec(family, entry["name"], params, str(entry.get("label") or ""), adaptive)
    raise ConfigError(f"{where}: expected a name or a table, got {entry!r}")


def _auto_labels(specs: list[Spec]) -> None:
    """Label = name, unless the same name appears with other parameters: then name + a short
    hash of the parameters (give ``label`` in the suite for a readable one)."""
    variants: dict[str, set[str]] = {}
    modes: dict[str, set[bool]] = {}
    for s in specs:
        variants.setdefault(s.name, set()).add(json.dumps(s.params, sort_keys=True))
        modes.setdefault(s.name, set()).add(s.adaptive)
    for s in specs:
        if not s.label:
            label = s.name
            if len(variants[s.name]) > 1:
                label += "-" + hashlib.sha256(json.dumps(s.params, sort_keys=True).encode()).hexdigest()[:6]
            if s.adaptive and len(modes[s.name]) > 1:  # "aspl" beside an adaptive "aspl"
                label += "-adaptive"
            s.label = label


def _check_unique(labels: list[str], family: str, source: str) -> None:
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise ConfigError(f"{source}: {family} entry {label!r} appears twice; give one a distinct `label`")
        seen.add(label)


def parse_suite(data: dict, source: str = "<memory>") -> Suite:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown suite keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    name = data.get("name") or Path(source).stem
    if "seeds" in data and "seed" in data:
        raise ConfigError(f"{source}: give `seeds` or `seed`, not both")
    seeds = data.get("seeds", [data.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{source}: `seeds` must be a non-empty list of integers")
    for key in ("backend", "dataset"):
        if key not in data:
            raise ConfigError(f"{source}: missing `{key}` (e.g. {key} = {{ name = \"...\" }})")
    lists: dict[str, Any] = {}
    for family in LIST_FAMILIES:
        entries = data.get(family)
        if family in ("defenses",) and entries is None:
            entries = ["none"]
        if family == "purifiers" and entries is None:
            entries = ["none"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{source}: `{family}` must be a non-empty list")
        if family == "purifiers":
            chains = []
            for i, e in enumerate(entries):
                items = e if isinstance(e, list) else [e]
                if not items:
                    raise ConfigError(f"{source}: purifiers[{i}] is an empty chain")
                chains.append([_spec("purifiers", x, f"{source}: purifiers[{i}]") for x in items])
            _auto_labels([s for chain in chains for s in chain])
            _check_unique(["+".join(s.label for s in c) for c in chains], family, source)
            lists[family] = chains
        else:
            specs = [_spec(family, e, f"{source}: {family}[{i}]") for i, e in enumerate(entries)]
            _auto_labels(specs)
            _check_unique([s.label for s in specs], family, source)
            lists[family] = specs
    prompts = data.get("prompts", {})
    if not isinstance(prompts, dict) or set(prompts) - PROMPT_KEYS:
        raise ConfigError(f"{source}: [prompts] accepts {sorted(PROMPT_KEYS)}")
    backend = _spec("backends", data["backend"], f"{source}: backend")
    dataset = _spec("datasets", data["dataset"], f"{source}: dataset")
    backend.label, dataset.label = backend.label or backend.name, dataset.label or dataset.name
    executor = _spec("executors", data["executor"], f"{source}: executor") if "executor" in data else None
    only = _cells_filter(data.get("cells"), lists, source)
    contrasts_of(data, lists, source)  # validated here, read by the leaderboard from run.json
    return Suite(
        name=str(name), description=str(data.get("description", "")), seeds=seeds,
        device=str(data.get("device", "auto")), dtype=str(data.get("dtype", "float32")),
        backend=backend, dataset=dataset, prompts=prompts, source=source, raw=data, executor=executor, only=only,
        **lists,
    )


def _cells_filter(rules: Any, lists: dict, source: str) -> list[dict[str, str]] | None:
    if rules is None:
        return None
    if not isinstance(rules, list) or not rules or not all(isinstance(r, dict) for r in rules):
        raise ConfigError(f"{source}: `cells` must be a non-empty list of tables like {{ attack = \"aspl\" }}")
    known = _labels(lists)
    for i, rule in enumerate(rules):
        _check_cell(rule, known, f"{source}: cells[{i}]")
    return [{k: str(v) for k, v in r.items()} for r in rules]


def _check_cell(selector: dict, known: dict[str, list[str]], where: str) -> None:
    """A cell selector names only cell keys, and only labels the suite has."""
    for k, v in selector.items():
        if k not in CELL_KEYS:
            raise ConfigError(f"{where} has unknown key {k!r}; keys: {', '.join(CELL_KEYS)}")
        if v not in known[k]:
            raise ConfigError(f"{where}: {k} {v!r} is not in the suite; labels: {', '.join(known[k])}")


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
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        suites = builtin_suites()
        if ref not in suites:
            import difflib

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


def _labels(lists: dict) -> dict[str, list[str]]:
    return {key: (["+".join(s.label for s in c) for c in lists[fam]] if fam == "purifiers"
                  else [s.label for s in lists[fam]]) for key, fam in CELL_KEYS.items()}


def contrasts_of(data: dict, lists: dict | None = None, source: str = "<suite>") -> list[dict]:
    """The suite's ``contrasts`` with every cell selector completed (see the module docstring)."""
    raw = data.get("contrasts")
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise ConfigError(f"{source}: `contrasts` must be a list of tables")
    if lists is None:
        suite = parse_suite({**data, "contrasts": None})
        lists = {fam: getattr(suite, fam) for fam in CELL_KEYS.values()}
    known = _labels(lists)
    defaults = {"attack": "none", "purifier": "none", "defense": "none", "personalizer": known["personalizer"][0]}
    out = []
    for i, c in enumerate(raw):
        where = f"{source}: contrasts[{i}]"
        missing = {"metric", "a", "b"} - set(c)
        if missing:
            raise ConfigError(f"{where} needs {sorted(missing)}")
        unknown = set(c) - {"label", "metric", "a", "b", "recovery"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        item = {"label": str(c.get("label") or f"{c['metric']}: a - b"), "metric": str(c["metric"])}
        for side in ("a", "b", "recovery"):
            if side not in c:
                continue
            sel = c[side]
            if not isinstance(sel, dict):
                raise ConfigError(f"{where}.{side} must be a table with keys from {', '.join(CELL_KEYS)}")
            item[side] = {**defaults, **{k: str(v) for k, v in sel.items()}}
            _check_cell(item[side], known, f"{where}.{side}")  # the defaults must exist too
        out.append(item)
    return out