"""The attacks on a FROZEN model (AdvDM, Mist, PhotoGuard, SDS) on the tiny backend.

Science check: each attack moves its own objective further than uniform noise at the same
budget — the denoising loss for the loss attacks (up for ``+``, down for ``−``), the distance
to the target for the targeted/encoder attacks — measured on the saved 8-bit PNGs with common
random numbers (fixed timesteps × noise draws, the same for every batch compared).

The surrogate is the tiny backend with its UNet briefly trained as a denoiser (60 steps on
sample images, ~10 s). With purely random weights the UNet output hardly depends on its
input, so the denoising loss moves by less than its own sampling noise, and SDS — which
drops the UNet Jacobian — has nothing to correlate with; a crude denoiser restores the
structure the methods rely on while staying tiny.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchbase.components import Purifier, Threat
from benchbase.errors import ConfigError
from benchbase.images import linf_levels, load_pngs, quantize_to_budget, save_pngs
from benchbase.testing import PretrainedTiny, make_context, sample_identity

STEPS = {"steps": 6, "step_size": 2.0}  # shrunk: 6 steps of 2 levels cover the 16-level ball's core
TIMESTEPS = (50, 250, 500, 750, 950)
DRAWS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    backend = PretrainedTiny(prompt="a photo")  # the frozen attacks' prompt (Diff-Protect)
    identity = sample_identity("astronaut", 64)
    return {"backend": backend, "identity": identity, "clean": identity.set_B, "models": backend.load(
        torch.device("cpu"), torch.float32), "tmp": tmp_path_factory.mktemp("frozen"), "runs": {}}


def _cases():
    from benchbase_plugins.attacks.advdm import AdvDM
    from benchbase_plugins.attacks.mist import Mist
    from benchbase_plugins.attacks.photoguard import PhotoGuard
    from benchbase_plugins.attacks.sds import SDS

    return {
        "advdm+": lambda: AdvDM(**STEPS),
        "advdm-": lambda: AdvDM(sign="-", **STEPS),
        "mist-semantic": lambda: Mist(mode="semantic", **STEPS),
        "mist-textural": lambda: Mist(mode="textural", **STEPS),
        "mist-fused": lambda: Mist(mode="fused", **STEPS),
        "photoguard": lambda: PhotoGuard(steps=6),
        # the released 5 EOT repetitions, no random start, constant step (with 2 repetitions and
        # 3 steps from the clean image the sign of the gradient estimate is too noisy to beat noise)
        "photoguard-diffusion": lambda: PhotoGuard(mode="diffusion", steps=4, step_size=2.0, sampling_steps=2),
        "sds+": lambda: SDS(sign="+", **STEPS),
        "sds-": lambda: SDS(sign="-", **STEPS),
        "sdst": lambda: SDS(sign="-", target=True, **STEPS),
    }


NAMES = list(_cases())


def _png_roundtrip(images, folder):
    save_pngs(images, folder)
    return load_pngs(folder)


def _protect(env, attack, seed=0, threat=None, info=None):
    ctx = make_context(backend=env["backend"], identity=env["identity"], seed=seed, store_dir=env["tmp"] / "store")
    ctx.threat = threat
    adv = attack.protect(env["clean"].clone(), ctx)
    if info is not None:
        info.update(ctx.info)
    return quantize_to_budget(adv, env["clean"], attack.eps, mode=attack.params.quantization)


def _run(env, name):
    """Each attack once with seed 0 and the noise baseline at its budget (memoised)."""
    if name not in env["runs"]:
        from benchbase_plugins.attacks.baseline import UniformNoise

        attack = _cases()[name]()
        env.setdefault("info", {})[name] = info = {}
        adv = _png_roundtrip(_protect(env, attack, info=info), env["tmp"] / name)
        noise = UniformNoise(eps=attack.eps)
        noisy = _png_roundtrip(_protect(env, noise), env["tmp"] / f"{name}-noise")
        env["runs"][name] = (attack, adv, noisy)
    return env["runs"][name]


# ---------------------------------------------------------------------------------------
# Objectives, evaluated with common random numbers
# ---------------------------------------------------------------------------------------


def denoising_loss(models, x, prompt):
    """Mean ε-MSE over fixed timesteps × DRAWS noise/posterior draws (same draws for every x)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        cond = models.encode_prompt([prompt]).expand(len(x), -1, -1)
        total = 0.0
        for _ in range(DRAWS):
            for t in TIMESTEPS:
                z = models.encode_images(x, sample=True, generator=gen)
                ts = torch.full((len(x),), t, dtype=torch.long)
                total += float(models.diffusion_loss(z, cond, generator=gen, timesteps=ts))
    return total / (DRAWS * len(TIMESTEPS))


def target_distance(models, x, target):
    """Per-image ‖z(x) − z(target)‖² on posterior means (deterministic)."""
    with torch.no_grad():
        zx, zt = models.encode_images(x, sample=False), models.encode_images(target, sample=False)
    return float((zx - zt).pow(2).flatten(1).sum(1).mean())


def mean_latent_norm(models, x):
    with torch.no_grad():
        return float(models.encode_images(x, sample=False).flatten(1).norm(dim=1).mean())


def objective(env, name, x, attack):
    """(value, direction): the quantity the attack pushes, and +1 if it ascends, −1 if it descends."""
    from benchbase_plugins.attacks._frozen import load_target

    models = env["models"]
    target = load_target(None, 64)
    if name in ("advdm+", "sds+"):
        return denoising_loss(models, x, "a photo"), +1
    if name in ("advdm-", "sds-"):
        return denoising_loss(models, x, "a photo"), -1
    if name == "mist-semantic":
        return denoising_loss(models, x, "a painting"), +1
    if name in ("mist-textural", "sdst"):
        return target_distance(models, x, target), -1
    if name == "mist-fused":  # L_T − rate·L_S per image, minimised
        return target_distance(models, x, target) - attack.params.rate * denoising_loss(models, x, "a painting"), -1
    if name == "photoguard":
        return mean_latent_norm(models, x), -1
    if name == "photoguard-diffusion":  # the attack's own loss, with a fixed draw of the sampler noise
        ctx = make_context(backend=env["backend"], seed=99)
        loss_fn = attack._diffusion_loss(models, 64, ctx)
        with torch.no_grad():
            return sum(float(loss_fn(x)) for _ in range(3)) / 3, -1
    raise KeyError(name)


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_beats_uniform_noise_on_its_own_objective(env, name):
    attack, adv, noisy = _run(env, name)
    clean_value, direction = objective(env, name, env["clean"], attack)
    adv_gain = direction * (objective(env, name, adv, attack)[0] - clean_value)
    noise_gain = direction * (objective(env, name, noisy, attack)[0] - clean_value)
    assert adv_gain > 0, f"{name} did not move its objective ({adv_gain:.3g})"
    assert adv_gain > noise_gain + 0.5 * abs(noise_gain) + 1e-4 * max(1.0, abs(clean_value)), (
        f"{name}: gain {adv_gain:.4g} vs noise {noise_gain:.4g}")


@pytest.mark.parametrize("name", NAMES)
def test_budget_holds_after_png(env, name):
    attack, adv, _ = _run(env, name)
    bound = math.floor(attack.eps + 1e-6)
    dist = linf_levels(adv, env["clean"])
    assert 0 < dist <= bound, f"{name}: saved L∞ {dist} levels, budget {bound}"


@pytest.mark.parametrize("name", NAMES)
def test_objective_trajectory_is_recorded(env, name):
    """One objective value per PGD step, named with its direction (+: ascent, −: descent)."""
    attack, _, _ = _run(env, name)
    info = env["info"][name]
    trajectory = info["objective_trajectory"]
    assert len(trajectory) == attack.params.steps and all(math.isfinite(v) for v in trajectory)
    maximised = name in ("advdm+", "sds+")
    assert info["objective"].endswith("(maximised)" if maximised else "(minimised)")
    assert info["objective_points"] == "one per PGD step"
    if name.startswith("photoguard"):  # the raw loss of the one batch: starts at its first step's
        assert trajectory[0] == pytest.approx(info["loss_first"][0]) and trajectory[-1] == pytest.approx(
            info["loss_last"][0])
    if name.startswith("advdm"):  # the per-image loss
        assert trajectory[0] == pytest.approx(info["loss_per_image_first"][0])


def test_objective_trajectory_averages_the_batches(env):
    """With ``batch_size`` the attack runs one PGD per batch; the trajectory is their mean per step."""
    from benchbase_plugins.attacks.advdm import AdvDM

    ctx = make_context(backend=env["backend"], identity=env["identity"], store_dir=env["tmp"] / "store")
    AdvDM(steps=3, step_size=2.0, batch_size=2).protect(env["clean"].clone(), ctx)  # 4 images: 2 batches
    first, last = ctx.info["loss_per_image_first"], ctx.info["loss_per_image_last"]
    trajectory = ctx.info["objective_trajectory"]
    assert len(first) == 2 and len(trajectory) == 3
    assert trajectory[0] == pytest.approx(sum(first) / 2) and trajectory[-1] == pytest.approx(sum(last) / 2)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(env, name):
    _, adv, _ = _run(env, name)
    again = _png_roundtrip(_protect(env, _cases()[name]()), env["tmp"] / f"{name}-again")
    assert torch.equal(adv, again)


def test_seed_changes_random_start(env):
    from benchbase_plugins.attacks.advdm import AdvDM

    a = _protect(env, AdvDM(steps=1), seed=0)
    b = _protect(env, AdvDM(steps=1), seed=1)
    assert not torch.equal(a, b)


def test_truncate_quantisation_respects_budget(env):
    from benchbase_plugins.attacks.mist import Mist

    attack = Mist(mode="textural", steps=2, quantization="truncate")
    adv = _png_roundtrip(_protect(env, attack), env["tmp"] / "mist-trunc")
    assert linf_levels(adv, env["clean"]) <= 16


class _RecordingBlur(Purifier):
    """A differentiable 3x3 box blur that records that the attack looked through it."""

    differentiable = True

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.saw_grad = False

    def purify(self, images, ctx):
        self.calls += 1
        self.saw_grad |= images.requires_grad
        k = torch.full((3, 1, 3, 3), 1 / 9, dtype=images.dtype, device=images.device)
        return torch.nn.functional.conv2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), k, groups=3)


@pytest.mark.parametrize("cls", ["advdm", "mist", "sds"])
def test_adaptive_attacks_optimise_through_the_threat(env, cls):
    from benchbase_plugins.attacks.advdm import AdvDM
    from benchbase_plugins.attacks.mist import Mist
    from benchbase_plugins.attacks.sds import SDS

    attack = {"advdm": AdvDM, "mist": Mist, "sds": SDS}[cls](steps=2)
    assert attack.supports_adaptive
    purifier = _RecordingBlur()
    plain = _protect(env, {"advdm": AdvDM, "mist": Mist, "sds": SDS}[cls](steps=2))
    adaptive = _protect(env, attack, threat=Threat(purifiers=[purifier]))
    assert purifier.calls >= 2 and purifier.saw_grad
    assert not torch.equal(plain, adaptive)


def test_modes_are_named_and_photoguard_budget_follows_mode():
    from benchbase_plugins.attacks.mist import Mist
    from benchbase_plugins.attacks.photoguard import PhotoGuard

    with pytest.raises(ConfigError):
        Mist(mode="1")
    assert Mist().params.mode == "fused" and Mist().params.rate == 1e4 and Mist().eps == 16
    assert PhotoGuard().eps == pytest.approx(7.65)
    assert PhotoGuard(mode="diffusion").eps == pytest.approx(12.75)
    assert PhotoGuard(eps=11).eps == 11
    with pytest.raises(ConfigError):
        PhotoGuard(foo=1)


def test_photoguard_decaying_step():
    from benchbase_plugins.attacks.photoguard import decaying_step

    step = decaying_step(2.55, 1000)
    assert step(0) == pytest.approx(2.55)
    assert step(999) == pytest.approx(2.55 * (1 - 0.99 * 0.999))
    assert step(1000) == pytest.approx(0.0255)  # α/100 at i = N
    assert all(step(i) > step(i + 1) for i in range(0, 999, 100))


def test_bundled_target_is_the_documented_pattern():
    from PIL import Image

    from benchbase_plugins.attacks._frozen import BUNDLED_TARGET, make_target_pattern

    assert BUNDLED_TARGET.is_file() and BUNDLED_TARGET.stat().st_size < 100_000
    assert np.array_equal(np.asarray(Image.open(BUNDLED_TARGET).convert("RGB")), make_target_pattern())


def test_photoguard_diffusion_defaults_follow_the_linf_notebook_call(env, monkeypatch):
    """super_linf as the complex notebook's L∞ call runs it: 5 EOT repetitions (its default; the
    call passes none), no random start, constant step. The encoder attack keeps its own."""
    from benchbase_plugins.attacks import photoguard as pg

    diffusion, encoder = pg.PhotoGuard(mode="diffusion"), pg.PhotoGuard()
    assert [diffusion._native(k) for k in ("grad_reps", "random_start", "decay")] == [5, False, False]
    assert [encoder._native(k) for k in ("random_start", "decay")] == [True, True]
    calls = []
    original = pg.PhotoGuard._diffusion_loss

    def counting(self, *args, **kwargs):
        loss_fn = original(self, *args, **kwargs)
        return lambda x: calls.append(1) or loss_fn(x)

    monkeypatch.setattr(pg.PhotoGuard, "_diffusion_loss", counting)
    ctx = make_context(backend=env["backend"], seed=0)
    attack = pg.PhotoGuard(mode="diffusion", steps=2, sampling_steps=1)
    attack.protect(env["clean"][:1].clone(), ctx)
    assert len(calls) == 2 * 5 and ctx.info["eot_samples"] == 5


@pytest.mark.parametrize("mode", ["encoder", "diffusion"])
def test_photoguard_gives_each_image_the_gradient_of_its_own_norm(env, mode):
    """The notebooks attack one image at a time (a batch of one, ``.norm()`` of it): in a batch,
    an image's gradient must not depend on the other images, as it would under the norm of the
    whole batch (each gradient scaled by 1/‖batch‖, which reweighs the diffusion attack's EOT)."""
    from benchbase_plugins.attacks.photoguard import PhotoGuard

    attack = PhotoGuard(mode=mode, sampling_steps=1)

    def grad_of_first(batch):
        ctx = make_context(backend=env["backend"], seed=5)  # the same draws for batches of one shape
        make = attack._encoder_loss if mode == "encoder" else attack._diffusion_loss
        x = batch.clone().requires_grad_(True)
        make(env["models"], 64, ctx)(x).backward()
        return x.grad[0]

    clean = env["clean"][:2]
    other = clean.clone()
    other[1] = other[1] * 0.5  # another second image: another norm of the batch
    g, g_other = grad_of_first(clean), grad_of_first(other)
    assert float(g.norm()) > 0
    assert float((g - g_other).norm()) < 1e-5 * float(g.norm())
    if mode == "encoder":  # deterministic: the batch of one gives the same gradient
        assert float((g - grad_of_first(clean[:1])).norm()) < 1e-5 * float(g.norm())
