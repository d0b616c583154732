"""Content-addressed artifact store with atomic writes, safe to share between processes.

Each stage output lives in ``<root>/<stage>/<key[:2]>/<key>/``. A stage is computed into a
temporary folder ``.<key>-<random>`` beside it, then ``_done.json`` (a ``StageMeta``: key parts,
info, cost, the list of its files with their sizes and SHA-256, the shared stages it read) is written and the folder is renamed into place: a folder
that exists is complete, so a killed process never leaves a half result visible, and rerunning
resumes with whatever finished.

Several processes may share one store (runs started with the same ``--store``, Ray workers):
a stage is computed under an exclusive ``flock`` on ``<root>/.locks/<stage>/<key>.lock``, so a
stage two processes need is computed once — the second waits, then finds it complete. The
kernel drops the lock of a process that dies, so nobody waits on a dead holder; a temporary
folder is removed only when its stage's lock is free, so starting a run never removes another
live process's work in progress. (On a network filesystem, ``flock`` must be supported — NFSv4,
Lustre mounted with ``flock``.)
"""

from __future__ import annotations

import errno
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per store, atomic renames only
    fcntl = None

from benchbase.errors import DiskError
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


#: errors of the filesystem, not of the stage: the store (or the run folder) cannot be written
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "read-only file system"}


def is_disk_error(exc: BaseException, root: Path | None = None) -> bool:
    """A full or read-only filesystem (or, under ``root``, a permission denied)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in DISK_ERRNOS:
        return True
    if exc.errno in (errno.EACCES, errno.EPERM) and root is not None and exc.filename:
        try:
            return Path(exc.filename).resolve().is_relative_to(Path(root).resolve())
        except (OSError, ValueError):
            return False
    return False


def disk_error(exc: BaseException, what: str, cause: str | None = None) -> DiskError:
    """One line naming the cause and what to do, for an error writing ``what``."""
    if isinstance(exc, OSError) and cause is None:
        cause = CAUSES.get(exc.errno, exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename else ""
    else:  # raised by a library that wraps the OS error (safetensors, PIL...): say what it said
        where = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return DiskError(f"cannot write {what}: {cause}{where}; free space or make it writable, then run the same "
                     "command again (everything finished is kept)")


def wrapped_disk_cause(exc: BaseException) -> str | None:
    """The cause when ``exc`` (or what it wraps) is a full, over-quota or read-only filesystem.
    Libraries that write files from native code (safetensors, torch) raise their own exception
    types carrying the OS message ("No space left on device (os error 28)"), so that is matched too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in CAUSES:
            return CAUSES[exc.errno]
        text = str(exc)
        for code, cause in CAUSES.items():
            if os.strerror(code) in text:
                return cause
        exc = exc.__cause__ or exc.__context__
    return None


def filesystem_trouble(path: Path) -> str | None:
    """"no space left on device" or "read-only file system" when the filesystem holding ``path`` is
    (nearly: under 1 MiB free) full or read-only, else None. Libraries that write files (safetensors,
    PIL) do not always raise an ``OSError`` with its errno; the filesystem itself says what happened."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs on Windows
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return "read-only file system"
    free = (st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return "no space left on device" if free < 2**20 else None


@contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (yields False when ``blocking=False`` and it is held).

    The holder removes the file before releasing it, so lock files do not pile up; a waiter
    that wakes on a removed file retries on the current one (the usual lock-file protocol)."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.ENOLCK:
                raise
            # a filesystem without flock (some NFS mounts): atomic renames still keep every stage
            # whole, but two processes may both compute a stage they share
            yield True
            return
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed it after we opened it: lock the current file
    try:
        yield True
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


RUN_LOCK = ".lock"  # in the run folder: who runs it now


def _holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    when = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[str | None]:
    """Hold ``RUN_DIR/.lock`` (an exclusive ``flock``) while a run writes its folder.

    A second run of the same folder gets ``RunInProgressError`` naming the holder's pid and host.
    A holder that died (killed, lost power) holds nothing — the kernel dropped its lock — and its
    note is taken over: the context yields a line saying so (None when the lock was free)."""
    from benchbase.errors import RunInProgressError

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInProgressError(
                    f"{run_dir}: a run is in progress ({_describe(_holder(fd))}); wait for it to finish, stop "
                    "it, or give another --run-dir") from None
            except OSError as exc:
                if exc.errno != errno.ENOLCK:
                    raise
                holder = _holder(fd)  # no flock on this filesystem: trust a live pid on this host
                if holder.get("host") == socket.gethostname() and _alive(holder.get("pid")):
                    raise RunInProgressError(f"{run_dir}: a run is in progress ({_describe(holder)})") from None
        previous = _holder(fd)
        note = (f"took over the lock of a run that ended without releasing it ({_describe(previous)})"
                if previous.get("pid") else None)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                         "argv": sys.argv[:8]}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield note
    finally:
        try:
            os.ftruncate(fd, 0)  # released cleanly: nothing to take over
        except OSError:
            pass
        os.close(fd)


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def _files(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Size and SHA-256 of every file of a stage folder (what ``benchbase verify`` checks later:
    hashing as the stage is written costs one read of files just written, still in the page cache)."""
    sizes, hashes = {}, {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != DONE:
            rel = p.relative_to(folder).as_posix()
            sizes[rel], hashes[rel] = p.stat().st_size, file_sha256(p)
    return sizes, hashes


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_stage_metas(root: Path) -> dict[str, dict[str, StageMeta]]:
    """Every complete stage folder of a store: ``{stage: {key: meta}}`` (unreadable ones skipped).

    Walked with ``os.scandir`` in sorted order (what ``sorted(glob("*/*/*/_done.json"))`` gave):
    a store of a 10,000-cell grid has 120,000 stage folders."""
    out: dict[str, dict[str, StageMeta]] = {}

    def entries(path: str) -> list[str]:
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())  # as glob's "*"
        except OSError:
            return []

    base = str(root)
    for stage in entries(base):
        for prefix in entries(os.path.join(base, stage)):
            for key in entries(os.path.join(base, stage, prefix)):
                try:
                    with open(os.path.join(base, stage, prefix, key, DONE), encoding="utf-8") as fh:
                        meta = StageMeta.from_json(json.loads(fh.read()))
                except (OSError, ValueError, TypeError):
                    continue
                out.setdefault(stage, {})[key] = meta
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
    uses: list = field(default_factory=list)  # [stage, key] of the stages it asked the store for


class Store:
    """Stage outputs keyed by a hash of (stage, plugin name + version, parameters, upstream keys, seed)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        self.executed: Counter = Counter()  # stages computed by this process
        self.cached: Counter = Counter()  # stages found complete
        self._local = threading.local()

    def key(self, stage: str, parts: dict) -> str:
        return hash_key(stage, parts)

    def path(self, stage: str, key: str) -> Path:
        return self.root / str(stage) / key[:2] / key

    def done(self, stage: str, key: str) -> bool:
        # plain strings, not Path joins: planning a large grid asks this for every stage
        return os.path.isfile(os.path.join(self._root, str(stage), key[:2], key, DONE))

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

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / ".locks" / str(stage) / f"{key}.lock"

    def compute(self, stage: str, key: str, parts: dict, fn: Callable[[Path], dict | None]) -> Path:
        """Return the stage folder, running ``fn(tmp_folder) -> info`` only if it is not complete
        (in this or any other process sharing the store: the stage's lock makes the second wait)."""
        stage = str(stage)
        final = self.path(stage, key)
        frames = self._frames()
        if frames and [stage, key] not in frames[-1].uses:  # a shared stage read inside another
            frames[-1].uses.append([stage, key])
        if (final / DONE).is_file():
            self.cached[stage] += 1
            return final
        try:
            with file_lock(self.lock_path(stage, key)):
                if (final / DONE).is_file():  # computed by another process while we waited
                    self.cached[stage] += 1
                    return final
                self._compute_locked(stage, key, parts, fn, final)
        except OSError as exc:
            if is_disk_error(exc, self.root):
                raise disk_error(exc, f"the store {self.root}") from exc
            raise
        self.executed[stage] += 1
        return final

    def _compute_locked(self, stage: str, key: str, parts: dict, fn: Callable[[Path], dict | None],
                        final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}-"))
        try:
            meta = self._run(stage, key, parts, fn, tmp)
            self._write_meta(tmp, meta)
            if final.exists() and not (final / DONE).is_file():  # a leftover without _done.json
                shutil.rmtree(final)
            self._publish(tmp, final)
        except Exception as exc:
            # ask the filesystem before the temporary is removed (which frees the space again)
            trouble = None if is_disk_error(exc, self.root) else (wrapped_disk_cause(exc) or filesystem_trouble(tmp))
            if trouble:
                raise disk_error(exc, f"the store {self.root}", trouble) from exc
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_meta(self, tmp: Path, meta: StageMeta) -> None:
        (tmp / DONE).write_text(json.dumps(meta.to_json(), indent=1, default=str))

    def _publish(self, tmp: Path, final: Path) -> None:
        """The one step that makes a stage visible: an atomic rename of its complete folder."""
        os.replace(tmp, final)

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
        sizes, hashes = _files(tmp)
        return StageMeta(stage=stage, key=key, parts=parts, info=info,
                         seconds=round(max(0.0, inclusive - frame.children), 3),
                         inclusive_seconds=round(inclusive, 3), finished=time.time(),
                         peak_rss_mb=_peak_rss_mb(),
                         peak_cuda_memory_mb=round(peak / 2**20, 1) if peak is not None else None,
                         files=sizes, sha256=hashes, uses=frame.uses, host=socket.gethostname(), pid=os.getpid())

    def shared_stage(self, stage: str, parts: dict, fn: Callable[[Path], None]) -> Path:
        """A stage shared across cells (class images, surrogates), for ``Context.shared``."""
        if stage in {s.value for s in Stage}:
            raise ValueError(f"a shared stage cannot be named {stage!r}: it is one of the core's stages")
        key = self.key(stage, parts)
        return self.compute(stage, key, parts, lambda folder: fn(folder) or {})

    def clean_temporaries(self) -> int:
        """Remove temporary folders left by processes that died while computing a stage. A
        temporary whose stage lock is held belongs to a live process (another run sharing the
        store, a worker) and is left alone."""
        removed = 0
        for tmp in sorted(self.root.glob("*/*/.*")):
            if not tmp.is_dir() or tmp.parts[-3] == ".locks":
                continue
            stage, key = tmp.parts[-3], tmp.name[1:].split("-", 1)[0]
            with file_lock(self.lock_path(stage, key), blocking=False) as free:
                if free:
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
