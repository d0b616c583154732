"""``benchbase verify``: re-hash a store against the SHA-256 every stage recorded when it was
written, and mark what is damaged for the next run to recompute.

Stores are shared between runs and machines; a truncated copy or a flipped bit in a stored PNG
or weight file would otherwise flow into every later stage that reads it. A stage is *damaged*
when a file it recorded is missing, or differs in size or hash. It is marked by renaming its
``_done.json`` to ``_invalid.json`` (the folder is left as it is until then): the runner treats
it as never computed. Keys hash upstream keys, not contents, so the stages computed from a damaged
one would still look complete: they are marked too, transitively — every stage whose key parts
name a marked stage's key (purify names its protect, personalize its purify, a score its inputs…)
or that read a marked shared stage (``StageMeta.uses``: class images, surrogates). The next
``benchbase run`` of any suite that needs them recomputes exactly those.

Stages written before stages recorded hashes cannot be checked: they are reported as
unverifiable, never as damaged. Verify a store while no run writes to it (a stage being written
has no ``_done.json`` yet and is not checked).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchbase.errors import DataError
from benchbase.records import DONE, INVALID, RUN_JSON, StageMeta, read_run_info, resolve_store
from benchbase.store import atomic_write_text, file_sha256, read_stage_metas


@dataclass
class Damage:
    stage: str
    key: str
    folder: Path
    problems: list[str]  # "images/000_x.png differs", "unet/model.safetensors is missing"


@dataclass
class Verification:
    store: Path
    checked: int = 0  # stages with hashes, re-hashed
    unverifiable: list[tuple[str, str]] = field(default_factory=list)  # (stage, key): no hashes recorded
    damaged: list[Damage] = field(default_factory=list)
    downstream: list[tuple[str, str]] = field(default_factory=list)  # computed from a damaged stage
    pending: list[tuple[str, str]] = field(default_factory=list)  # marked by an earlier verify, not recomputed yet
    marked: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged


def store_of(path: Path) -> Path:
    """The store of a run folder (its ``store/`` or the ``--store`` run.json names), or ``path``
    itself when it is a store; a clear error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} does not exist or is not a folder (give a run folder or a store)")
    if (path / RUN_JSON).is_file():
        store = resolve_store(path, None, read_run_info(path))
        if not store.is_dir():
            raise DataError(f"{path}: its store {store} does not exist")
        return store
    if any(path.glob(f"*/*/*/{DONE}")) or any(path.glob(f"*/*/*/{INVALID}")):
        return path
    raise DataError(f"{path} is neither a benchbase run folder (no {RUN_JSON}) nor a store (no <stage>/<key>/{DONE})")


def check_stage(folder: Path, meta: StageMeta) -> list[str]:
    """What is wrong with a stage folder's files against its recorded hashes (empty: intact)."""
    problems = []
    for rel, digest in sorted((meta.sha256 or {}).items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif rel in meta.files and path.stat().st_size != meta.files[rel]:
            problems.append(f"{rel} differs (size {path.stat().st_size}, recorded {meta.files[rel]})")
        elif file_sha256(path) != digest:
            problems.append(f"{rel} differs (SHA-256)")
    return problems


def _keys_in(obj: Any, keys: set[str], out: set[str]) -> set[str]:
    """Every stage key named anywhere in ``obj`` (key parts: nested dicts and lists of strings)."""
    if isinstance(obj, str):
        if obj in keys:
            out.add(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _keys_in(v, keys, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _keys_in(v, keys, out)
    return out


def dependents(metas: dict[str, dict[str, StageMeta]], roots: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every complete stage computed, directly or not, from one of ``roots`` (``(stage, key)``),
    roots excluded, in store order."""
    keys = {key for by_key in metas.values() for key in by_key}
    reads: dict[tuple[str, str], set[str]] = {}
    for stage, by_key in metas.items():
        for key, meta in by_key.items():
            named = _keys_in(meta.parts, keys, set())
            named |= {str(u[1]) for u in meta.uses if isinstance(u, (list, tuple)) and len(u) == 2}
            reads[(stage, key)] = named - {key}
    bad = {key for _, key in roots}
    out: list[tuple[str, str]] = []
    grew = True
    while grew:  # a fixed point: stage graphs are shallow (five stages and a shared one)
        grew = False
        for node, named in reads.items():
            if node[1] not in bad and named & bad:
                bad.add(node[1])
                out.append(node)
                grew = True
    return sorted(out)


def mark(folder: Path, reason: str) -> None:
    """Make a complete stage incomplete for the runner: ``_done.json`` becomes ``_invalid.json``
    (with the reason), so the next run that needs it computes it afresh."""
    done = folder / DONE
    try:
        data = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    atomic_write_text(folder / INVALID, json.dumps({**data, "invalid": reason}, indent=1, default=str))
    done.unlink(missing_ok=True)


def pending_stages(root: Path) -> list[tuple[str, str]]:
    """Stages an earlier verify marked that no run has recomputed yet."""
    out = []
    for path in sorted(Path(root).glob(f"*/*/*/{INVALID}")):
        if not (path.parent / DONE).is_file():
            out.append((path.parts[-4], path.parts[-2]))
    return out


def verify(path: Path, apply: bool = True) -> Verification:
    """Re-hash every complete stage of the store of ``path`` (a run folder or a store); with
    ``apply``, mark the damaged stages and everything computed from them for recomputation."""
    root = store_of(path)
    result = Verification(store=root)
    metas = read_stage_metas(root)
    for stage, by_key in metas.items():
        for key, meta in by_key.items():
            folder = root / stage / key[:2] / key
            if meta.sha256 is None:
                result.unverifiable.append((stage, key))
                continue
            result.checked += 1
            problems = check_stage(folder, meta)
            if problems:
                result.damaged.append(Damage(stage, key, folder, problems))
    result.downstream = dependents(metas, {(d.stage, d.key) for d in result.damaged})
    result.pending = pending_stages(root)
    if apply and result.damaged:
        for d in result.damaged:
            mark(d.folder, "; ".join(d.problems))
        for stage, key in result.downstream:
            mark(root / stage / key[:2] / key, "computed from a damaged stage")
        result.marked = True
    return result


def render(result: Verification) -> list[str]:
    """The lines ``benchbase verify`` prints: the damaged stages one per line, then a summary."""
    lines = [f"damaged: {d.stage} {d.key} ({os.path.relpath(d.folder, result.store.parent)}): "
             + "; ".join(d.problems) for d in result.damaged]
    lines.append(f"store {result.store}: {result.checked} stages verified, {len(result.damaged)} damaged, "
                 f"{len(result.unverifiable)} unverifiable (no hashes: written by an older benchbase)")
    if result.damaged:
        counts: dict[str, int] = {}
        for stage, _ in result.downstream:
            counts[stage] = counts.get(stage, 0) + 1
        what = ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "none"
        verb = "marked for recomputation" if result.marked else "would be marked (--dry-run)"
        lines.append(f"{verb}: {len(result.damaged)} damaged and {len(result.downstream)} computed from them "
                     f"({what}); the next `benchbase run` of a suite that needs them recomputes them")
    elif result.pending:
        lines.append(f"{len(result.pending)} stages marked by an earlier verify wait for a run to recompute them")
    return lines
