"""Helpers for tests and benchmarks: a tiny backend, a sample identity, a ready Context.

Everything here is offline and deterministic.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchbase.components import Context, IdentityData, Prompts, SharedStages
from benchbase.store import Store


def tiny_backend(resolution: int = 64, preset: str = "tiny", seed: int = 0, prediction_type: str = "epsilon"):
    from benchbase_plugins.backends.stable_diffusion import TinyBackend

    return TinyBackend(resolution=resolution, preset=preset, seed=seed, prediction_type=prediction_type)


def sample_identity(name: str = "astronaut", resolution: int = 64, images_per_set: int = 4) -> IdentityData:
    from benchbase_plugins.datasets.sample import SampleDataset

    return SampleDataset(identities=[name], images_per_set=images_per_set).load(name, resolution)


def make_context(
    backend=None, identity: IdentityData | None = None, seed: int = 0, store_dir: Path | None = None,
    prompts: Prompts | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
) -> Context:
    """A Context like the runner builds, with a store for shared stages in ``store_dir``
    (a fresh temporary folder by default)."""
    store = Store(Path(store_dir or tempfile.mkdtemp(prefix="benchbase-test-")))
    return Context(
        device=torch.device(device), dtype=dtype, seed=seed,
        generator=torch.Generator().manual_seed(seed), backend=backend, identity=identity,
        prompts=prompts or Prompts(), shared=SharedStages(store.shared_stage),
        workdir=store.root / "work",
    )
