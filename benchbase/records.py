"""What a run writes: the one schema that writers (runner, store) and readers (leaderboard,
report, ``benchbase status``) share, so no reader guesses a writer's format.

A run folder holds::

    run.json          RunInfo: the suite, hashes, versions, device, backend, status, counts
    results.jsonl     one Record per (cell, metric), cells in suite order
    store/ (or --store)
      <stage>/<key[:2]>/<key>/_done.json   StageMeta: stage, key, key parts, info, cost, files

Every stage a record depends on is named by its key in ``Record.stages`` (``clean``,
``protect``, ``purify``, ``personalize``, ``generate``) and ``Record.key`` (the score), so a
reader finds each cell's folders from the records alone.

Readers accept files of older runs where a field is simply missing (it reads as its
default); they never infer one field from another.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from benchbase.errors import DataError

SCHEMA = 2  # 1: before run.json/_done.json carried a schema number

RESULTS = "results.jsonl"  # one record per (cell, metric), in the run folder
RUN_JSON = "run.json"  # suite, hashes, versions, device, seeds, status
DONE = "_done.json"  # a stage folder is complete when this file is in it
INVALID = "_invalid.json"  # `benchbase verify` renamed DONE to this: the next run recomputes the stage


class Stage(str, Enum):
    """The stages of a cell, in data-path order (plus ``score``, one per metric)."""

    CLEAN = "clean"  # the identity's set_B as 8-bit PNGs (once per identity and resolution)
    PROTECT = "protect"
    PURIFY = "purify"
    PERSONALIZE = "personalize"
    GENERATE = "generate"
    SCORE = "score"

    def __str__(self) -> str:  # "protect", in paths, messages and f-strings alike
        return self.value

    __format__ = str.__format__
    __hash__ = str.__hash__  # a member and its value are the same dict key


#: the stages ``Record.stages`` names (a score's own key is ``Record.key``)
CELL_STAGES = (Stage.CLEAN, Stage.PROTECT, Stage.PURIFY, Stage.PERSONALIZE, Stage.GENERATE)


class Status(str, Enum):
    OK = "ok"  # a value
    EMPTY = "empty"  # the metric ran but had nothing to score (e.g. no face): left out of means, never 0
    #: a stage the record needs cannot run here: a model, its weights or an optional package is
    #: absent (``benchbase.Unavailable``; error names the stage, unless it is the metric's own, and
    #: how to provide it). Not cached: the next run tries again.
    UNAVAILABLE = "unavailable"
    FAILED = "failed"  # a stage of the cell went wrong (error names the stage and the cause)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
    __hash__ = str.__hash__


def strict(obj: Any) -> Any:
    """NaN/inf -> None and enums -> their value, so files are strict JSON any tool reads."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


_FIELD_NAMES: dict[type, frozenset] = {}


def _known(cls, data: dict) -> dict:
    names = _FIELD_NAMES.get(cls)
    if names is None:  # dataclasses.fields() per record was a third of reading 100,000 of them
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    return {k: v for k, v in data.items() if k in names}


# ---------------------------------------------------------------------------------------
# results.jsonl
# ---------------------------------------------------------------------------------------


@dataclass
class Record:
    """One line of ``results.jsonl``: the score of one metric for one cell.

    ``value`` is what leaderboards average (None unless ``status`` is ok); ``per_prompt``
    its value per eval prompt; ``details`` what the metric recorded besides (``of``: the
    image set it scored, ``per_image``: one value per image of that set, ``reason``...).
    ``direction`` says which way favours the protector ("higher" or "lower").
    """

    identity: str
    seed: int
    attack: str  # labels, as the suite names them (a chain of purifiers joined by "+")
    purifier: str
    defense: str
    personalizer: str
    metric: str  # the metric's label
    direction: str
    status: str
    suite: str = ""
    suite_hash: str = ""
    attack_name: str = ""
    adaptive: bool = False
    metric_name: str = ""  # the registered name
    value: float | None = None
    per_prompt: dict = field(default_factory=dict)
    count: int | None = None
    error: str | None = None
    backend: str = ""  # backend fingerprint
    device: str = ""
    details: dict = field(default_factory=dict)
    key: str | None = None  # the score stage's key (None when the identity could not be loaded)
    stages: dict = field(default_factory=dict)  # {stage: key} for CELL_STAGES
    #: transfer: the model the protection was optimised against (the attack's ``surrogate``, else
    #: the suite's backend) and the model the victim fine-tunes (the suite's backend), as labels
    #: (``mini``, ``mini(version=v3)``: the name and the parameters that differ from their defaults)
    surrogate: str = ""
    victim: str = ""
    attack_base: str = ""  # the attack's label without its ``@surrogate`` suffix (a transfer matrix's row)
    #: swept entries of the cell: {"attack"|"purifier": {"param", "value", "curve"}}; ``curve``: the
    #: label without the ``[param=value]`` suffix (one line of a budget curve)
    sweep: dict = field(default_factory=dict)

    CELL = ("identity", "seed", "attack", "purifier", "defense", "personalizer")
    #: the order of a record's fields in results.jsonl
    ORDER = ("suite", "suite_hash", *CELL, "attack_name", "adaptive", "metric", "metric_name", "direction",
             "status", "value", "per_prompt", "count", "error", "backend", "device", "details", "key", "stages",
             "surrogate", "victim", "attack_base", "sweep")

    @property
    def cell(self) -> tuple:
        return tuple(getattr(self, k) for k in self.CELL)

    def to_json(self) -> dict:
        data = asdict(self)
        return strict({k: data[k] for k in self.ORDER})

    @classmethod
    def from_json(cls, data: dict) -> "Record":
        rec = cls(**_known(cls, data))
        rec.details = rec.details if isinstance(rec.details, dict) else {}
        rec.per_prompt = rec.per_prompt if isinstance(rec.per_prompt, dict) else {}
        rec.stages = rec.stages if isinstance(rec.stages, dict) else {}
        rec.sweep = rec.sweep if isinstance(rec.sweep, dict) else {}
        return rec


def dumps_records(records: list[dict | Record]) -> str:
    return "".join(json.dumps(strict(r.to_json() if isinstance(r, Record) else r), default=str) + "\n"
                   for r in records)


def read_records(run_dir: Path) -> list[Record]:
    """The records of a run folder (a clear error if it has none)."""
    return read_records_and_rows(run_dir, rows=False)[0]


_REQUIRED = tuple(f.name for f in fields(Record) if f.default is MISSING and f.default_factory is MISSING)
_DEFAULTS = {f.name: f.default for f in fields(Record) if f.default is not MISSING}
_FACTORIES = {f.name: f.default_factory for f in fields(Record) if f.default_factory is not MISSING}


def _row(data: dict) -> dict | None:
    """``Record.from_json(data).to_json()`` for a line with no non-finite number (nothing left
    for ``strict`` to change), without the dataclass's deep copies; None when the line needs
    the exact path (missing fields)."""
    if not isinstance(data, dict) or any(k not in data for k in _REQUIRED):
        return None
    row = {}
    for k in Record.ORDER:
        v = data[k] if k in data else (_DEFAULTS[k] if k in _DEFAULTS else _FACTORIES[k]())
        if k in ("per_prompt", "details", "stages", "sweep") and not isinstance(v, dict):
            v = {}
        row[k] = v
    return row


def read_records_and_rows(run_dir: Path, rows: bool = True, records: bool = True
                          ) -> tuple[list[Record], list[dict]]:
    """The records of a run folder and, with ``rows``, each as ``Record.to_json()`` gives it (the
    rows of a table: built straight from the parsed line, since deep-copying 100,000 records
    took most of a leaderboard's time; ``records=False``: the rows alone). A clear error if the
    folder has no records file, or a line is not a record."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise DataError(f"{run_dir} has no {RESULTS}: is it a benchbase run folder? (run `benchbase run` first)")
    out, table = [], []
    nonfinite = []  # set by the parser when a line holds NaN, Infinity or an overflowing number

    def parse_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            nonfinite.append(text)
        return value

    def parse_constant(text: str) -> float:
        nonfinite.append(text)
        return float(text)  # what json.loads gives by default

    decoder = json.JSONDecoder(parse_float=parse_float, parse_constant=parse_constant)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            nonfinite.clear()
            data = decoder.decode(line)
            row = None if nonfinite or not rows else _row(data)
            if records or row is None:  # a table alone needs no Record where the row is exact
                rec = Record.from_json(data)
                if records:
                    out.append(rec)
                if rows and row is None:
                    row = rec.to_json()
            if rows:
                table.append(row)
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"{path}:{n}: not a benchbase record ({exc})") from None
    return out, table


# ---------------------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------------------


@dataclass
class BackendInfo:
    fingerprint: str = ""
    description: str = ""
    #: the model's weights are random (a machinery check): its numbers say nothing about protection
    random_weights: bool = False


@dataclass
class FigureSpec:
    """A plot the report draws from values a component records, declared by the component
    (``Component.report_figures``) so the report never names a plugin.

    ``source``:
      - ``"records"``: the records of each metric of this component. ``kind = "boxes"``: one box
        per image set it scored (``details.of``: clean, protected per attack, purified per
        attack and purifier), of the values at ``values`` (a dotted path into the record,
        e.g. ``details.per_image``; the record's value when absent); ``image_sets`` keeps
        only those sets (empty: all). A score shared by several cells counts once.
      - ``"purify-info"``: the info this purifier recorded in each purify stage
        (``_done.json`` info ``purifiers.<label>``). ``kind = "scatter"``: ``x`` against
        ``y`` (dotted paths to equal-length lists), one colour per attack, with the
        diagonal; ``hline`` (a dotted path to a number) is drawn as a horizontal line.
    """

    title: str
    kind: str = "boxes"  # boxes | scatter
    source: str = "records"  # records | purify-info
    values: str = "details.per_image"
    image_sets: tuple = ()
    x: str = ""
    y: str = ""
    hline: str = ""
    xlabel: str = ""
    ylabel: str = ""
    hline_label: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def dig(obj: Any, path: str) -> Any:
    """``dig({"a": {"b": [1, 2]}}, "a.b.1") == 2``; None where the path does not exist."""
    for part in path.split(".") if path else []:
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, (list, tuple)) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


@dataclass
class ExecutorInfo:
    name: str = "local"
    stages: dict = field(default_factory=dict)  # total, done, running, failed, cached
    extra: dict = field(default_factory=dict)  # executor-specific facts (Ray address, GPUs)


@dataclass
class RunInfo:
    """``run.json``: what ran, where, with which versions, and how far it got."""

    suite: str = "?"
    suite_hash: str = "?"
    suite_source: str = ""
    suite_data: dict = field(default_factory=dict)  # the suite as parsed from its file
    status: str = "?"  # running | finished | interrupted | failed
    started: float | None = None
    updated: float | None = None
    backend: BackendInfo = field(default_factory=BackendInfo)
    device: str = "?"
    dtype: str = "?"
    cuda_device: str | None = None
    seeds: list = field(default_factory=list)
    store: str = ""  # the store's absolute path
    platform: str = ""
    python: str = ""
    packages: dict = field(default_factory=dict)
    plugins: dict = field(default_factory=dict)  # {family: {name: {version, plugin, distribution...}}}
    n_cells: int | None = None  # cells per identity
    figures: list = field(default_factory=list)  # [{"family", "name", "labels", "figure": FigureSpec}]
    executor: ExecutorInfo = field(default_factory=ExecutorInfo)
    seconds: float | None = None  # wall time of the last invocation
    executed: dict = field(default_factory=dict)  # stages computed by the last invocation
    cached: dict = field(default_factory=dict)  # stages it found complete in the store
    failed_records: int | None = None
    unavailable_records: int | None = None
    schema: int = SCHEMA

    def to_json(self) -> dict:
        return strict(asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> "RunInfo":
        info = cls(**_known(cls, data))
        info.backend = BackendInfo(**_known(BackendInfo, data.get("backend") or {}))
        ex = data.get("executor") or {}
        info.executor = ExecutorInfo(**_known(ExecutorInfo, ex)) if isinstance(ex, dict) else ExecutorInfo()
        info.schema = int(data.get("schema", 1))
        return info

    def figure_specs(self) -> list[tuple[dict, FigureSpec]]:
        """``(declaration, FigureSpec)`` of every figure the run's components declared."""
        out = []
        for entry in self.figures:
            try:
                out.append((entry, FigureSpec(**_known(FigureSpec, entry.get("figure") or {}))))
            except TypeError:
                continue
        return out


def read_run_info(run_dir: Path, required: bool = False) -> RunInfo | None:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        if required:
            raise DataError(f"{run_dir} is not a benchbase run folder (no {RUN_JSON})")
        return None
    try:
        return RunInfo.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{path}: not a benchbase run.json ({exc})") from None


def resolve_store(run_dir: Path, store: Path | None = None, info: RunInfo | None = None) -> Path:
    """The store a run used: ``store`` when given, else the run's own ``store/`` folder (also
    after the run folder moved), else the store run.json names (``benchbase run --store``)."""
    if store is not None:
        return Path(store)
    local = Path(run_dir) / "store"
    info = info or read_run_info(run_dir) or RunInfo()
    if local.is_dir() or not info.store:
        return local
    return Path(info.store)


# ---------------------------------------------------------------------------------------
# _done.json
# ---------------------------------------------------------------------------------------


@dataclass
class StageMeta:
    """``_done.json`` of a stage folder.

    ``seconds`` is the stage's own time; ``inclusive_seconds`` adds the stages it computed
    inside it (shared stages such as class images, requested through ``ctx.shared``).
    ``peak_rss_mb`` is the process's resident-memory high-water mark when the stage finished
    (it never goes down, so it bounds the stage from above); ``peak_cuda_memory_mb`` is the
    CUDA memory the stage allocated at its peak (None off CUDA). ``files`` lists every file
    of the folder with its size, so a complete stage can be checked; ``sha256`` the SHA-256 of
    each (None: written before stages recorded hashes), which ``benchbase verify`` checks.
    ``uses``: ``[stage, key]`` of the shared stages (class images, surrogates) it read through
    ``ctx.shared`` — its upstream core stages are named in ``parts`` — so a damaged one's
    dependents can be found.
    """

    stage: str
    key: str
    parts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: float | None = None
    inclusive_seconds: float | None = None
    finished: float | None = None
    peak_rss_mb: float | None = None
    peak_cuda_memory_mb: float | None = None
    files: dict = field(default_factory=dict)  # {relative path: bytes}
    sha256: dict | None = None  # {relative path: hex digest}
    uses: list = field(default_factory=list)  # [[stage, key]] of shared stages it read
    host: str = ""
    pid: int | None = None
    schema: int = SCHEMA

    def to_json(self) -> dict:
        return strict(asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> "StageMeta":
        meta = cls(**_known(cls, data))
        meta.schema = int(data.get("schema", 1))
        if meta.schema < 2:  # schema 1 wrote only the inclusive time, under "seconds"
            meta.inclusive_seconds, meta.seconds = meta.seconds, None
        return meta

    def missing_files(self, folder: Path) -> list[str]:
        """Files the stage recorded that are absent or of another size (empty: complete)."""
        bad = []
        for rel, size in self.files.items():
            path = Path(folder) / rel
            if not path.is_file() or path.stat().st_size != size:
                bad.append(rel)
        return bad
