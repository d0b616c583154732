"""The stage graph of a grid, as data: where a stage sits, its key, what it depends on, which
cells wait for it, and the outcome of computing it. Nothing here computes anything.

One cell of the grid is (identity, attack, purifier chain, defense, personalizer, seed)::

    protect(attack) ─► purify(chain) ─► personalize(personalizer ∘ defense) ─► generate ─► score(metric)
    clean

(``clean``, the identity's set_B as PNGs, is what the report compares images with; no stage
reads it, so it has no dependents and a parallel executor computes it beside the protection,
finishing before or after it.) A ``Plan`` is the part of the graph not in the store yet, deduplicated by key
and in dependency order: every executor computes exactly that, in any order the dependencies
allow, and the run assembles each cell's records from the store once its stages are done.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from benchbase.components import IdentityData
from benchbase.records import Stage
from benchbase.store import hash_key
from benchbase.suite import Spec


@dataclass(frozen=True)
class NodeAddress:
    """Where a stage sits in the grid: all another process holding the same suite needs to
    rebuild its ``Node`` (indices into the suite's lists; ``metric`` for scores only).
    ``key`` is the key the planner computed: the rebuilt node must hash to it."""

    stage: str
    identity: str
    seed: int
    attack: int = 0
    purifier: int = 0
    defense: int = 0
    personalizer: int = 0
    metric: int | None = None
    key: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "stage": str(self.stage)}

    @classmethod
    def from_json(cls, data: dict) -> "NodeAddress":
        return cls(**data)


@dataclass
class Node:
    """A stage output: its key parts (hashed into ``key``), the function that computes it into a
    folder, and the upstream nodes that function reads."""

    stage: Stage
    parts: dict
    compute: Callable[[Path], dict | None]
    key: str = ""
    ups: list["Node"] = field(default_factory=list)  # the upstream nodes compute() reads, in order
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

    def address(self, stage: Stage, metric: int | None = None, key: str = "") -> NodeAddress:
        return NodeAddress(str(stage), self.identity, self.seed, *self.at, metric=metric, key=key)


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
    scores: list[str] = field(default_factory=list)  # the score key of each metric, in suite order
    stages: dict[str, str] = field(default_factory=dict)  # {stage: key} its records name
    needs: set[str] = field(default_factory=set)  # keys of stages still to compute for it


@dataclass
class Plan:
    """The part of a suite's stage graph that is not in the store yet.

    ``nodes`` is in dependency order (every node after its ``deps``), the order a cell-by-cell
    evaluation meets them; keys dedupe shared work, so one protection per identity x attack
    appears once however many purifiers use it. ``cached`` counts the distinct stages found
    complete while planning (nothing upstream of a complete stage is visited)."""

    cells: list[CellPlan] = field(default_factory=list)
    nodes: dict[str, PlannedNode] = field(default_factory=dict)
    cached: Counter = field(default_factory=Counter)
    _done: set = field(default_factory=set, repr=False)

    def visit(self, node: Node, cell: int, is_done: Callable[[Node], bool]) -> bool:
        """Add ``node`` and whatever it needs that is not done; True when it must be computed."""
        if node.key in self.nodes:
            self.nodes[node.key].cells.append(cell)
            return True
        if node.key in self._done:
            return False
        if is_done(node):
            self._done.add(node.key)
            self.cached[str(node.stage)] += 1
            return False
        deps = [up.key for up in node.ups if self.visit(up, cell, is_done)]
        address = NodeAddress(**{**vars(node.address), "key": node.key})
        self.nodes[node.key] = PlannedNode(address, deps, [cell])
        return True

    def link(self) -> None:
        """Record in each cell the planned stages it waits for."""
        for key, node in self.nodes.items():
            for index in set(node.cells):
                self.cells[index].needs.add(key)


@dataclass
class Outcome:
    """What computing one stage gave: ok, or the one-line error every record that needs it
    carries. ``unavailable``: the stage (or, with ``upstream_failed``, a stage it reads) could
    not run because a model, its weights or a package is absent here (``benchbase.Unavailable``):
    every record that needs it is unavailable, not failed; ``upstream_failed``: it was not
    computed because a stage it reads failed (``error`` is that stage's). ``executed``: the stages this call computed (shared ones included)."""

    key: str
    stage: str
    ok: bool = True
    error: str | None = None
    cause: str | None = None  # the underlying exception's message
    unavailable: bool = False
    upstream_failed: bool = False
    executed: dict = field(default_factory=dict)
    seconds: float = 0.0

    def failed_downstream(self, key: str, stage: str) -> "Outcome":
        """The outcome of a stage that reads this failed one."""
        return Outcome(key=key, stage=str(stage), ok=False, error=self.error, cause=self.cause,
                       unavailable=self.unavailable, upstream_failed=True)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        return cls(**data)
