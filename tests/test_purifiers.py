"""Purifier family: the science of the classic transforms on a real photo, the contract of
every purifier on the tiny stand-ins, realign's alignment-guided strength, and gradients of
the differentiable views."""

from __future__ import annotations

import pytest
import torch

from benchbase.components import Threat
from benchbase.errors import WeightsUnavailableError
from benchbase.images import psnr, quantize
from benchbase.plugins import get_plugin_manager
from benchbase.testing import make_context, sample_identity

NAMES = ["none", "oracle", "jpeg", "blur", "resize", "diffpure", "pixel-diffpure", "gridpure", "sr",
         "noisy-upscale", "impress", "realign"]

# shrunk settings: every model is a tiny random-weight stand-in, step counts are minimal
TINY_PARAMS = {
    "diffpure": {"t": 4},
    "pixel-diffpure": {"model": "tiny", "t": 4},
    "gridpure": {"model": "tiny", "t": 2, "iterations": 2},
    "sr": {"model": "tiny", "num_inference_steps": 2},
    "noisy-upscale": {"model": "tiny", "num_inference_steps": 2, "low_res": 128},
    "impress": {"iterations": 3, "lpips": "tiny"},  # float16, the release precision
    "realign": {"model": "tiny", "num_inference_steps": 2, "clip_model": "tiny", "min_alignment": 0.07},
}
STOCHASTIC = {"diffpure", "pixel-diffpure", "gridpure", "sr", "noisy-upscale", "impress"}


def create(name: str, **params):
    return get_plugin_manager().create("purifiers", name, {**TINY_PARAMS.get(name, {}), **params})


@pytest.fixture(scope="module")
def identity():
    return sample_identity("astronaut", 64, images_per_set=2)


@pytest.fixture(scope="module")
def purifiers():
    """One instance per name, so loaded models are reused across tests."""
    return {name: create(name) for name in NAMES}


def ctx_for(tiny, identity, seed=0):
    return make_context(backend=tiny, identity=identity, seed=seed)


def test_all_twelve_registered():
    assert set(NAMES) <= set(get_plugin_manager().entries("purifiers"))


# ---------------------------------------------------------------------------------------
# Classic transforms on a real photo
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_photo():
    """The astronaut portrait at 512 px (the protocol resolution) with uniform ±8/255 noise."""
    clean = sample_identity("astronaut", 512, images_per_set=2).set_B
    g = torch.Generator().manual_seed(0)
    noisy = quantize((clean + (torch.rand(clean.shape, generator=g) * 2 - 1) * 8 / 255).clamp(0, 1))
    return clean, noisy


@pytest.mark.parametrize("name,params", [
    ("jpeg", {}),
    ("resize", {}),
    # radius 5 at 512 px is a strong blur that also removes content; a 1-px blur removes the noise
    ("blur", {"radius": 1.0, "scale_with_resolution": False}),
])
def test_classic_purifiers_raise_psnr(noisy_photo, name, params):
    clean, noisy = noisy_photo
    purifier = create(name, **params)
    out = purifier.purify(noisy, make_context())
    before, after = psnr(noisy, clean).mean(), psnr(out, clean).mean()
    assert after > before + 0.5, (name, float(before), float(after))


def test_default_blur_scales_with_resolution():
    blur = create("blur")
    assert blur.radius_for(512) == pytest.approx(5.0)
    assert blur.radius_for(64) == pytest.approx(0.625)
    assert create("resize").size_for(64) == 16


def test_torch_views_follow_pil(identity):
    x = identity.set_B
    for name in ("blur", "resize"):
        p = create(name)
        diff = (p.differentiable_view(x, None) - p.purify(x, None)).abs() * 255
        assert diff.mean() < 1.0, (name, float(diff.mean()))
    jpeg = create("jpeg", gradient="approx")
    assert psnr(jpeg.differentiable_view(x, None), create("jpeg").purify(x, None)).mean() > 38


# ---------------------------------------------------------------------------------------
# The contract of every purifier
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_contract_shape_range_dtype_determinism(name, purifiers, tiny, identity):
    purifier = purifiers[name]
    x = identity.set_B
    a = purifier.purify(x, ctx_for(tiny, identity, seed=1))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and torch.isfinite(a).all()
    b = purifier.purify(x, ctx_for(tiny, identity, seed=1))
    assert torch.equal(a, b), "same seed must give the same output"
    if name in STOCHASTIC:
        c = purifier.purify(x, ctx_for(tiny, identity, seed=2))
        assert not torch.equal(a, c), "the output must depend on ctx.generator"
    if name not in ("none", "oracle", "realign"):
        assert not torch.equal(a, x), "a purifier must change its input"


def test_oracle_returns_clean_set_b(purifiers, tiny, identity):
    protected = (identity.set_B + 0.03).clamp(0, 1)
    assert torch.equal(purifiers["oracle"].purify(protected, ctx_for(tiny, identity)), identity.set_B)


def test_upscale_sampler_reproduces_the_diffusers_pipeline(identity):
    from benchbase_plugins.purifiers.upscale import load_upscaler, pil_resize, upscale

    pipe = load_upscaler("tiny", torch.device("cpu"), torch.float32)
    low = pil_resize(identity.set_B, 16)
    ours = upscale(pipe, low, make_context(seed=3), "A photo of a person", "", 2, 9.0, 20)
    ref = pipe(prompt=["A photo of a person"] * len(low), image=low, num_inference_steps=2, guidance_scale=9.0,
               noise_level=20, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert ours.shape == (len(low), 3, 64, 64)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_noisy_upscale_conditions_without_adding_low_res_noise(purifiers):
    p = purifiers["noisy-upscale"]
    assert p.added_noise_level() == 0 and p.params.noise_level == 320


def test_tiny_clip_loads_its_checkpoint():
    from benchbase_plugins.purifiers._tiny_models import tiny_clip_checkpoint
    from benchbase_plugins.purifiers.realign import ClipAlignment

    saved = torch.load(tiny_clip_checkpoint(), map_location="cpu")
    loaded = ClipAlignment("tiny", None, torch.device("cpu")).model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


# ---------------------------------------------------------------------------------------
# realign
# ---------------------------------------------------------------------------------------


def test_realign_calibrates_on_class_images_and_records_alignment(tiny, identity):
    realign = create("realign", min_alignment=None, calibration_images=2, calibration_steps=2)
    ctx = ctx_for(tiny, identity)
    out = realign.purify(identity.set_B, ctx)
    info = ctx.info["realign"]
    n = len(identity.set_B)
    assert info["calibration_images"] == 2
    low, high = info["clean_range"]
    assert low <= high
    assert len(info["alignment_before"]) == len(info["alignment_after"]) == len(info["strength"]) == n
    assert all(s in realign.params.strengths for s in info["strength"])
    for i, s in enumerate(info["strength"]):
        if s == 0:  # the identity is chosen only for images already in the clean range
            assert info["alignment_before"][i] >= low and torch.equal(out[i], identity.set_B[i])
        else:
            assert info["in_range_after"][i] or info["alignment_after"][i] > info["alignment_before"][i]


def test_realign_picks_the_lightest_strength(tiny, identity):
    x = identity.set_B
    # every image already in range: nothing is purified
    ctx = ctx_for(tiny, identity)
    out = create("realign", min_alignment=-1.0).purify(x, ctx)
    assert ctx.info["realign"]["strength"] == [0.0] * len(x) and torch.equal(out, x)
    # an unreachable range: the best-aligned candidate, never below the input's alignment
    ctx = ctx_for(tiny, identity)
    create("realign", min_alignment=1.0).purify(x, ctx)
    info = ctx.info["realign"]
    assert not any(info["in_range_after"])
    assert all(a >= b for a, b in zip(info["alignment_after"], info["alignment_before"]))
    # the fixed paper chain: strength 0.5 is sr with noise level 20
    ctx = ctx_for(tiny, identity)
    create("realign", adaptive=False).purify(x, ctx)
    assert ctx.info["realign"]["strength"] == [0.5] * len(x)


# ---------------------------------------------------------------------------------------
# impress
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_impress_does_not_depend_on_the_batch_size(tiny, identity, precision):
    """The reference purifies one image at a time; a batch must give each image the same
    trajectory (a loss averaged over the batch would shrink every step by the batch size)."""
    x = torch.cat([identity.set_B, identity.set_A])  # 4 images
    outs = {}
    for batch_size in (1, 4):
        ctx = ctx_for(tiny, identity, seed=3)
        outs[batch_size] = create("impress", iterations=4, precision=precision, batch_size=batch_size).purify(x, ctx)
        assert ctx.info["impress"]["precision"] == precision and len(ctx.info["impress"]["final_loss"]) == 4
    moved = float((outs[1] - x).abs().mean() * 255)
    assert moved > 1.0  # it did optimise
    diff = (outs[1] - outs[4]).abs() * 255
    if precision == "float32":
        assert float(diff.max()) < 0.01
    else:  # float16 convolutions of a batch and of one image round differently, and float16
        # Adam amplifies some of those differences at single pixels (0.8 level on average
        # after 4 steps on this random-weight VAE); the default batch_size is the reference's 1
        assert float(diff.mean()) < 1.5, float(diff.mean())


# ---------------------------------------------------------------------------------------
# Differentiable views
# ---------------------------------------------------------------------------------------


def _grad(view, x):
    x = x.clone().requires_grad_(True)
    y = view(x)
    (y * torch.linspace(0, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("name,params", [
    ("blur", {"radius": 1.5, "scale_with_resolution": False}),
    ("resize", {"size": 4, "scale_with_resolution": False}),
])
def test_blur_and_resize_views_match_finite_differences(name, params):
    p = create(name, **params)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 12, 12, generator=g, dtype=torch.float64) * 0.6 + 0.2  # away from the clamp
    w = torch.rand(1, 3, 12, 12, generator=g, dtype=torch.float64)
    f = lambda z: (p.differentiable_view(z, None) * w).sum()
    xr = x.clone().requires_grad_(True)
    f(xr).backward()
    for idx in [(0, 0, 0, 0), (0, 1, 5, 6), (0, 2, 11, 3)]:
        e = torch.zeros_like(x)
        e[idx] = 1e-6
        fd = (f(x + e) - f(x - e)) / 2e-6
        assert float(xr.grad[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)
    assert xr.grad.abs().sum() > 0


def test_jpeg_view_has_a_useful_gradient(identity):
    x = identity.set_B
    y, grad = _grad(lambda z: create("jpeg").differentiable_view(z, None), x)
    assert torch.equal(y.detach(), create("jpeg").purify(x, None))  # the real JPEG forward
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # not the identity: quantisation attenuates high frequencies
    assert not torch.allclose(grad, torch.linspace(0, 1, grad.numel()).view_as(grad))


@pytest.mark.parametrize("name", ["diffpure", "pixel-diffpure", "gridpure", "sr", "noisy-upscale"])
def test_truncated_views_keep_the_value_and_pass_gradients(name, purifiers, tiny, identity):
    x = identity.set_B[:1]
    value = purifiers[name].purify(x, ctx_for(tiny, identity, seed=5))
    p = create(name, gradient="truncated", truncated_steps=1)
    for attr in ("_pipe", "_pipe_key", "_model", "_model_key"):  # reuse the loaded models
        if hasattr(purifiers[name], attr):
            setattr(p, attr, getattr(purifiers[name], attr))
    y, grad = _grad(lambda z: p.differentiable_view(z, ctx_for(tiny, identity, seed=5)), x)
    assert torch.allclose(y.detach(), value, atol=1e-5)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["impress", "realign"])
def test_bpda_views_are_straight_through(name, purifiers, tiny, identity):
    x = identity.set_B[:1]
    _y, grad = _grad(lambda z: purifiers[name].differentiable_view(z, ctx_for(tiny, identity)), x)
    assert torch.allclose(grad, torch.linspace(0, 1, grad.numel()).view_as(grad))


def test_chain_of_views_is_differentiable(identity):
    threat = Threat(purifiers=[create("jpeg"), create("blur"), create("resize")])
    _, grad = _grad(lambda z: threat.purify_differentiable(z, make_context()), identity.set_B)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# Real weights: one clear error when absent
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,needle", [
    ("sr", {"model": "stabilityai/stable-diffusion-x4-upscaler"}, "x4 upscaler"),
    ("pixel-diffpure", {"model": "/nonexistent/pixel-model"}, "pixel diffusion model"),
    ("realign", {"clip_model": "ViT-B-32", "clip_pretrained": "/nonexistent/clip.pt"}, "open_clip ViT-B-32"),
    ("realign", {"restorer": "codeformer", "adaptive": False}, "CodeFormer"),
])
def test_missing_weights_raise_one_clear_error(name, params, needle, tiny, identity):
    with pytest.raises(WeightsUnavailableError, match=needle):
        create(name, **params).purify(identity.set_B[:1], ctx_for(tiny, identity))
