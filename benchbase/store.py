"""Content-addressed artifact store with atomic writes.

Each stage output lives in ``<root>/<stage>/<key[:2]>/<key>/``. A stage is computed into a
temporary folder, then ``_done.json`` (a ``StageMeta``: key parts, info, cost, the list of its
files) is written and the folder is renamed into place: a folder that exists is complete, so a
killed run never leaves a half result, and rerunning resumes with whatever finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchbase.records import DONE, RESULTS, RUN_JSON, Stage, StageMeta  # noqa: F401  (re-exported)


def _cuda_in_use():
    """torch.cuda when torch is already imported and CUDA is initialised, else None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


def _peak_rss_mb() -> float | None:
    """Process-wide peak resident memory so far (a high-water mark, not this stage alone)."""
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):  # pragma: no cover - not on every platform
        return None


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_key(stage: str, parts: dict) -> str:
    return hashlib.sha256(canonical({"stage": str(stage), **parts}).encode()).hexdigest()[:24]


def file_mode() -> int:
    """The mode a plain ``open()`` would give (mkstemp's 0600 would hide results from others)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != DONE}


def read_stage_metas(root: Path) -> dict[str, dict[str, StageMeta]]:
    """Every complete stage folder of a store: ``{stage: {key: meta}}`` (unreadable ones skipped)."""
    out: dict[str, dict[str, StageMeta]] = {}
    for done in sorted(Path(root).glob(f"*/*/*/{DONE}")):
        if done.parent.name.startswith("."):  # a temporary
            continue
        try:
            meta = StageMeta.from_json(json.loads(done.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        out.setdefault(done.parts[-4], {})[done.parent.name] = meta
    return out


def stage_counts(root: Path) -> dict[str, int]:
    """Complete stage folders per stage of a store."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {d.name: n for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            if (n := sum(1 for _ in d.glob(f"*/*/{DONE}")))}


@dataclass
class _Frame:
    """A stage being computed in this thread: the time and CUDA peak of the stages nested in it."""

    children: float = 0.0
    cuda_peak: int = 0


class Store:
    """Stage outputs keyed by a hash of (stage, plugin name + version, parameters, upstream keys, seed)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.executed: Counter = Counter()  # stages computed by this process
        self.cached: Counter = Counter()  # stages found complete
        self._local = threading.local()

    def key(self, stage: str, parts: dict) -> str:
        return hash_key(stage, parts)

    def path(self, stage: str, key: str) -> Path:
        return self.root / str(stage) / key[:2] / key

    def done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / DONE).is_file()

    def meta(self, stage: str, key: str) -> StageMeta:
        return StageMeta.from_json(json.loads((self.path(stage, key) / DONE).read_text()))

    def metas(self) -> dict[str, dict[str, StageMeta]]:
        return read_stage_metas(self.root)

    def counts(self) -> dict[str, int]:
        return stage_counts(self.root)

    def _frames(self) -> list[_Frame]:
        if not hasattr(self._local, "frames"):
            self._local.frames = []
        return self._local.frames

    def compute(self, stage: str, key: str, parts: dict, fn: Callable[[Path], dict | None]) -> Path:
        """Return the stage folder, running ``fn(tmp_folder) -> info`` only if it is not complete."""
        stage = str(stage)
        final = self.path(stage, key)
        if (final / DONE).is_file():
            self.cached[stage] += 1
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}-"))
        try:
            meta = self._run(stage, key, parts, fn, tmp)
            (tmp / DONE).write_text(json.dumps(meta.to_json(), indent=1, default=str))
            if final.exists() and not (final / DONE).is_file():  # a leftover without _done.json
                shutil.rmtree(final)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / DONE).is_file():  # lost a race to a finished twin: keep theirs
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.executed[stage] += 1
        return final

    def _run(self, stage: str, key: str, parts: dict, fn: Callable[[Path], dict | None], tmp: Path) -> StageMeta:
        """Run ``fn`` and measure it: own time (stages computed inside it subtracted) and peaks."""
        frames = self._frames()
        parent = frames[-1] if frames else None
        cuda = _cuda_in_use()
        if cuda:
            if parent is not None:  # the parent's peak so far, before the reset below forgets it
                parent.cuda_peak = max(parent.cuda_peak, cuda.max_memory_allocated())
            cuda.reset_peak_memory_stats()
        frame = _Frame()
        frames.append(frame)
        start = time.perf_counter()
        try:
            info = fn(tmp) or {}
        finally:
            frames.pop()
            inclusive = time.perf_counter() - start
            if parent is not None:
                parent.children += inclusive
        cuda = cuda or _cuda_in_use()
        peak = max(frame.cuda_peak, cuda.max_memory_allocated()) if cuda else None
        if cuda and parent is not None:
            parent.cuda_peak = max(parent.cuda_peak, peak)
        return StageMeta(stage=stage, key=key, parts=parts, info=info,
                         seconds=round(max(0.0, inclusive - frame.children), 3),
                         inclusive_seconds=round(inclusive, 3), finished=time.time(),
                         peak_rss_mb=_peak_rss_mb(),
                         peak_cuda_memory_mb=round(peak / 2**20, 1) if peak is not None else None,
                         files=_files(tmp), host=socket.gethostname(), pid=os.getpid())

    def shared_stage(self, stage: str, parts: dict, fn: Callable[[Path], None]) -> Path:
        """A stage shared across cells (class images, surrogates), for ``Context.shared``."""
        if stage in {s.value for s in Stage}:
            raise ValueError(f"a shared stage cannot be named {stage!r}: it is one of the core's stages")
        key = self.key(stage, parts)
        return self.compute(stage, key, parts, lambda folder: fn(folder) or {})

    def clean_temporaries(self) -> int:
        """Remove temporary folders left by killed processes."""
        removed = 0
        for tmp in self.root.glob("*/*/.*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        return removed
