"""Helpers for testing components (bundled or your own) and for benchmarks.

Everything here is offline, CPU and deterministic:

- ``tiny_backend()``: an SD-shaped random-weight backend (built once, cached under
  ``BENCHBASE_CACHE``); ``PretrainedTiny()``: the same with its UNet briefly trained as a
  denoiser, so that a denoising loss depends on the pixels (attack-vs-noise checks need it);
- ``sample_identity()``: a public-domain portrait as an identity (set_A / set_B / set_C);
- ``make_context(...)``: a ``Context`` as the runner builds it, with a store for shared stages;
- ``check_attack`` / ``check_purifier``: the contract every attack / purifier must keep
  (shapes, range, budget, same seed → same output);
- ``denoising_loss``: the mean L_DM of images under fixed timesteps and noise draws (common
  random numbers), to assert that an attack raises it more than noise of the same budget.

See README "Writing a plugin" and docs/example-plugin/tests for a plugin's test file.
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
    plugins=None,
) -> Context:
    """A Context like the runner builds, with a store for shared stages in ``store_dir``
    (a fresh temporary folder by default); ``plugins``: the plugin registry ``ctx.create``
    and ``ctx.find_model`` resolve names in (None: the process-wide one)."""
    store = Store(Path(store_dir or tempfile.mkdtemp(prefix="benchbase-test-")))
    return Context(
        device=torch.device(device), dtype=dtype, seed=seed,
        generator=torch.Generator().manual_seed(seed), backend=backend, identity=identity,
        prompts=prompts or Prompts(), shared=SharedStages(store.shared_stage),
        workdir=store.root / "work", plugins=plugins,
    )


def check_attack(attack, ctx_factory=None, images: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``attack.protect`` twice with the same seed and assert the attack contract: float
    (N, 3, H, W) output in [0, 1], within the L∞ budget ``attack.eps`` (the core would clip a
    violation silently), identical for the same seed. ``ctx_factory()`` makes a fresh Context
    (default: the tiny backend and the sample identity, seed 0); ``images`` default to its set_B.
    Returns the protected images."""
    if ctx_factory is None:
        identity, backend = sample_identity(images_per_set=2), tiny_backend()

        def ctx_factory():
            return make_context(backend=backend, identity=identity)
    first = ctx_factory()
    clean = images if images is not None else first.identity.set_B
    out = attack.protect(clean.clone(), first)
    again = attack.protect(clean.clone(), ctx_factory())
    assert out.shape == clean.shape, f"protect changed the shape: {tuple(clean.shape)} -> {tuple(out.shape)}"
    assert out.is_floating_point() and out.min() >= 0 and out.max() <= 1, "protected images leave [0, 1]"
    over = float((out.float().cpu() - clean.float()).abs().max()) * 255 - attack.eps
    assert over <= 1e-3, f"L∞ {attack.eps + over:.3f} levels exceeds the budget eps = {attack.eps}"
    assert torch.equal(out, again), "the same seed gave different images (draw randomness from ctx.generator)"
    return out


def check_purifier(purifier, images: torch.Tensor | None = None, ctx: Context | None = None) -> torch.Tensor:
    """Run ``purifier.purify`` twice and assert the purifier contract: the input's shape, float
    values in [0, 1], the same output for the same input. ``images`` default to the sample
    identity's set_B at 64 px. Returns the purified images."""
    if images is None:
        images = sample_identity(images_per_set=2).set_B
    out = purifier.purify(images.clone(), ctx or make_context())
    again = purifier.purify(images.clone(), ctx or make_context())
    assert out.shape == images.shape, f"purify changed the shape: {tuple(images.shape)} -> {tuple(out.shape)}"
    assert out.is_floating_point() and out.min() >= 0 and out.max() <= 1, "purified images leave [0, 1]"
    assert torch.equal(out, again), "the same input gave different outputs"
    return out


def denoising_loss(models, images: torch.Tensor, prompt: str, unet=None, draws: int = 8,
                   timesteps: tuple[int, ...] = (50, 200, 400, 600, 800, 950), seed: int = 1234) -> float:
    """Mean L_DM of ``images`` under ``prompt`` over fixed ``timesteps`` × ``draws`` posterior and
    noise draws from one seeded generator: the same draws for every batch compared (common random
    numbers), so differences between batches are not sampling noise."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        cond = models.encode_prompt([prompt]).expand(len(images), -1, -1)
        for _ in range(draws):
            z = models.encode_images(images, sample=True, generator=gen)
            for t in timesteps:
                ts = torch.full((len(images),), t, dtype=torch.long)
                total += float(models.diffusion_loss(z, cond, generator=gen, timesteps=ts, unet=unet))
    return total / (draws * len(timesteps))


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


def fixed_timestep_loss(models, cond: torch.Tensor, images: torch.Tensor, draws: int = 8,
                        timesteps: tuple[int, ...] = (50, 200, 400, 600, 800, 950)) -> float:
    """Mean L_DM of ``images`` over fixed timesteps × ``draws`` posterior and noise draws, from one
    seeded generator, so batches compared with it see the same noise (a low-variance surrogate
    loss for tests and benchmarks that compare protections). ``cond`` has one row per image."""
    g = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(draws):
            z = models.encode_images(images, sample=True, generator=g)
            for t in timesteps:
                ts = torch.full((len(images),), t, dtype=torch.long)
                total += float(models.diffusion_loss(z, cond, generator=g, timesteps=ts))
                count += 1
    return total / count

