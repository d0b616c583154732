"""Content-addressed artifact store with atomic writes.

Each stage output lives in ``<root>/<stage>/<key[:2]>/<key>/``. A stage is computed into a
temporary folder, then ``_done.json`` (its key parts, info, timing) is written and the
folder is renamed into place: a folder that exists is complete, so a killed run never
leaves a half result, and rerunning resumes with whatever finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

DONE = "_done.json"
RESULTS = "results.jsonl"  # one record per (cell, metric), in the run folder
RUN_JSON = "run.json"  # suite, hashes, versions, device, seeds, status


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
    return hashlib.sha256(canonical({"stage": stage, **parts}).encode()).hexdigest()[:24]


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


class Store:
    """Stage outputs keyed by a hash of (stage, plugin name + version, parameters, upstream keys, seed)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.executed: Counter = Counter()  # stages computed by this process
        self.cached: Counter = Counter()  # stages found complete

    def key(self, stage: str, parts: dict) -> str:
        return hash_key(stage, parts)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / key

    def done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / DONE).is_file()

    def meta(self, stage: str, key: str) -> dict:
        return json.loads((self.path(stage, key) / DONE).read_text())

    def compute(self, stage: str, key: str, parts: dict, fn: Callable[[Path], dict | None]) -> Path:
        """Return the stage folder, running ``fn(tmp_folder) -> info`` only if it is not complete."""
        final = self.path(stage, key)
        if (final / DONE).is_file():
            self.cached[stage] += 1
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}-"))
        try:
            cuda = _cuda_in_use()
            if cuda:
                cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            info = fn(tmp) or {}
            # seconds include upstream stages computed on demand inside fn (see docs/report.md)
            meta = {"stage": stage, "key": key, "parts": parts, "info": info,
                    "seconds": round(time.perf_counter() - start, 3), "finished": time.time(),
                    "peak_rss_mb": _peak_rss_mb()}
            if cuda:
                meta["peak_cuda_memory_mb"] = round(cuda.max_memory_allocated() / 2**20, 1)
            (tmp / DONE).write_text(json.dumps(meta, indent=1, default=str))
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

    def shared_stage(self, stage: str, parts: dict, fn: Callable[[Path], None]) -> Path:
        """A stage shared across cells (class images, surrogates), for ``Context.shared``."""
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


def writable_folder(path: Path, what: str = "folder") -> Path:
    """Create ``path`` if needed and check that files can be written in it, or raise one clear
    line (a path under a file, a read-only filesystem, no permission, a full disk)."""
    from benchbase.errors import BenchbaseError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BenchbaseError(f"cannot write the {what} {path}: {exc.strerror or exc}") from None
    return path
