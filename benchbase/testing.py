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
    from benchbase_plugins.worlds.tiny.backend import TinyBackend

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


_DENOISER_STATES: dict[tuple, dict] = {}


class PretrainedTiny:
    """The tiny backend with its UNet briefly trained as a denoiser on the sample portraits.

    A random-weight UNet's prediction hardly depends on its input, so a denoising loss moves
    by less than its own sampling noise and attack-vs-noise checks are coin flips. A few
    dozen steps of denoising training give the UNet the input dependence the methods rely
    on, while staying tiny. The trained state is kept in memory, once per process.
    """

    random_weights = True  # a few dozen denoising steps on two portraits: still a machinery check

    def __init__(self, steps: int = 60, prompt: str = "a photo of sks person", **tiny_params):
        self._base = tiny_backend(**tiny_params)
        self._steps, self._prompt = steps, prompt
        self.name, self.version, self.params = "tiny-denoiser", "test", self._base.params
        self.default_models = self._base.default_models

    def fingerprint(self) -> str:
        return f"{self._base.fingerprint()}-denoiser{self._steps}"

    def describe(self) -> str:
        return f"{self._base.describe()}, UNet denoising-pretrained for {self._steps} steps (tests)"

    @property
    def resolution(self) -> int:
        return self._base.resolution

    def _state(self) -> dict:
        key = (self._base.fingerprint(), self._steps, self._prompt)
        if key not in _DENOISER_STATES:
            models = self._base.load(torch.device("cpu"), torch.float32)
            images = torch.cat([sample_identity("astronaut", self.resolution).set_A,
                                sample_identity("hopper", self.resolution).set_A])
            gen = torch.Generator().manual_seed(0)
            unet = models.unet.requires_grad_(True).train()
            opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
            with torch.no_grad():
                cond = models.encode_prompt([self._prompt] * len(images))
            for _ in range(self._steps):
                with torch.no_grad():
                    z = models.encode_images(images, sample=True, generator=gen)
                loss = models.diffusion_loss(z, cond, generator=gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
            _DENOISER_STATES[key] = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        return _DENOISER_STATES[key]

    def load(self, device, dtype):
        models = self._base.load(device, dtype)
        models.unet.load_state_dict(self._state())
        return models.freeze()
