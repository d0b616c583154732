"""Test setup: offline hub, a per-session model cache, and shared tiny fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def benchbase_cache(tmp_path_factory):
    """Tiny models are built once per test session (or reuse BENCHBASE_CACHE when set)."""
    if "BENCHBASE_CACHE" not in os.environ:
        os.environ["BENCHBASE_CACHE"] = str(tmp_path_factory.mktemp("benchbase-cache"))
    return Path(os.environ["BENCHBASE_CACHE"])


@pytest.fixture(scope="session")
def tiny():
    from benchbase.testing import tiny_backend

    backend = tiny_backend()
    backend.name, backend.version = "tiny", "test"
    return backend


@pytest.fixture(scope="session")
def n000050():
    """The real Anti-DreamBooth identity from shared/ (skips when absent: users' clones lack it)."""
    folder = SHARED_DATA / "n000050"
    if not folder.is_dir():
        pytest.skip("shared/data/n000050 is not present (it ships only with the development workspace)")
    return folder
