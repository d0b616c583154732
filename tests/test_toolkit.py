"""``benchbase.toolkit``: the public helpers bundled and third-party plugins share.

The DreamBooth loop is checked against a plain step-by-step reference of the algorithm (the
loop the DreamBooth victim ran before the toolkit existed): same seed, same weights, bit for
bit, in both prior modes (class images encoded every step, or a cached posterior).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from benchbase.components import Prompts, Threat
from benchbase.testing import make_context, sample_identity


@pytest.fixture(scope="module")
def identity():
    return sample_identity("astronaut", 64, images_per_set=2)


# -- the package ---------------------------------------------------------------------------


def test_import_benchbase_is_light_and_exports_the_public_api():
    code = ("import sys, benchbase; heavy = [m for m in ('torch', 'pydantic', 'diffusers') if m in sys.modules]; "
            "missing = [n for n in benchbase.__all__ if not hasattr(benchbase, n)]; print(heavy, missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr
    import benchbase
    from benchbase.components import Attack, Context

    assert benchbase.Attack is Attack and benchbase.Context is Context
    assert {"Attack", "Params", "Context", "Prompts", "MetricInputs", "MetricValue", "BenchbaseError",
            "WeightsUnavailableError", "hookimpl"} <= set(benchbase.__all__)
    with pytest.raises(AttributeError):
        benchbase.no_such_name  # noqa: B018


def test_bundled_plugins_share_code_only_through_the_toolkit():
    """No component family imports another family's modules (they meet in benchbase.toolkit)."""
    from pathlib import Path

    from benchbase.plugins import FAMILIES

    root = Path(__file__).resolve().parents[1] / "plugins"
    offenders = []
    for family in FAMILIES:
        for path in (root / family).rglob("*.py"):
            for line in path.read_text().splitlines():
                if "benchbase_plugins." in line and "import" in line and "register(" not in line:
                    other = line.split("benchbase_plugins.")[1].split(".")[0].split()[0]
                    if other != family and other in FAMILIES:
                        offenders.append(f"{path.relative_to(root)}: {line.strip()}")
    assert offenders == []


# -- PGD -------------------------------------------------------------------------------------


def test_pgd_stays_in_the_ball_and_climbs_the_loss():
    from benchbase.toolkit import pgd, project, random_start

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g)
    target = torch.rand(2, 3, 8, 8, generator=g)

    def loss(x):  # distance to a target: ascent moves away from it, descent towards it
        return (x - target).pow(2).sum()

    up, up_losses = pgd(x0, loss, 8, 1, 10)
    down, down_losses = pgd(x0, loss, 8, 1, 10, maximize=False)
    for x in (up, down):
        assert (x - x0).abs().max() <= 8 / 255 + 1e-6 and x.min() >= 0 and x.max() <= 1
    assert up_losses[-1] > up_losses[0] and down_losses[-1] < down_losses[0]
    assert loss(up) > loss(x0) > loss(down)
    start = random_start(x0, 8 / 255, torch.Generator().manual_seed(1))
    assert 0 < (start - x0).abs().max() <= 8 / 255 + 1e-6
    assert torch.equal(project(x0 + 1, x0, 4 / 255), (x0 + 4 / 255).clamp(0, 1))
    # a decaying step (callable) and a random start are reproducible from the generator
    a, _ = pgd(x0, loss, 8, lambda i: 2 - i / 10, 5, generator=torch.Generator().manual_seed(3), use_random_start=True)
    b, _ = pgd(x0, loss, 8, lambda i: 2 - i / 10, 5, generator=torch.Generator().manual_seed(3), use_random_start=True)
    assert torch.equal(a, b)


def test_eot_grad_averages_over_transform_draws():
    from benchbase.toolkit import eot_grad

    x = torch.ones(1, 3, 4, 4)
    flips = iter([1.0, -1.0, 1.0, 1.0])

    def transform(v):  # a random sign per draw: E[T(x)] = x/2 over these four draws
        return v * next(flips)

    grad, loss = eot_grad(x, lambda v: v.sum(), transform, samples=4)
    assert torch.allclose(grad, torch.full_like(x, 0.5)) and loss == pytest.approx(x.numel() / 2)


# -- threat view --------------------------------------------------------------------------------


def test_threat_view_without_and_with_a_threat():
    from benchbase.toolkit import threat_view
    from benchbase_plugins.defenses.cdl import CDL
    from benchbase_plugins.purifiers.classic import GaussianBlur

    ctx = make_context()
    view = threat_view(ctx)
    purify, prompts = view
    assert purify is None and prompts == ctx.prompts and not view.adaptive
    x = torch.rand(1, 3, 16, 16)
    assert view(x) is x
    cdl = CDL()
    ctx.threat = Threat(purifiers=[GaussianBlur()], defense=cdl, training_prompts=cdl.training_prompts(ctx.prompts))
    view = threat_view(ctx)
    assert view.adaptive and view.prompts.instance.endswith("bhj noisy pattern")
    x.requires_grad_(True)
    out = view(x)
    assert not torch.equal(out, x)
    out.sum().backward()  # differentiable: the attack gets a gradient through the chain
    assert x.grad is not None and x.grad.abs().sum() > 0


# -- noising ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoise_targets_and_the_loss(prediction, identity):
    from benchbase.testing import tiny_backend
    from benchbase.toolkit import denoise, diffusion_loss

    models = tiny_backend(prediction_type=prediction).load(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        z = models.encode_images(identity.set_B, generator=torch.Generator().manual_seed(0))
        cond = models.encode_prompt(["a photo of sks person"] * len(z))
        out = denoise(models, None, z, cond, torch.Generator().manual_seed(1))
        noise = out.noise
        expected = noise if prediction == "epsilon" else models.noise_scheduler.get_velocity(z, noise, out.t)
        assert torch.equal(out.target, expected.float())
        assert torch.equal(out.noisy, models.noise_scheduler.add_noise(z, noise, out.t))
        # the draw order is noise, then timesteps: the same generator state gives the same sample
        loss = diffusion_loss(models, z, cond, torch.Generator().manual_seed(1))
        assert torch.equal(loss, out.mse()) and torch.equal(loss, models.diffusion_loss(
            z, cond, generator=torch.Generator().manual_seed(1)))
        per_image = out.mse("none")
        assert per_image.shape == (len(z),) and torch.allclose(per_image.mean(), loss)


# -- diagnostics ------------------------------------------------------------------------------


def test_objective_trace_records_and_thins():
    from benchbase.toolkit import ObjectiveTrace, pgd

    trace = ObjectiveTrace("distance", maximize=False)
    g = torch.Generator().manual_seed(0)
    x0, target = torch.rand(1, 3, 4, 4, generator=g), torch.rand(1, 3, 4, 4, generator=g)
    _, losses = pgd(x0, lambda x: (x - target).pow(2).sum(), 8, 1, 7, maximize=False, trace=trace)
    info = {}
    trace.record(info)
    assert info["objective"] == "distance (minimised)" and info["objective_points"] == "one per PGD step"
    assert info["objective_trajectory"] == losses and len(losses) == 7

    long = ObjectiveTrace("loss", maximize=True, per="step")
    long.extend(range(1000))
    long.record(info)
    points = info["objective_trajectory"]
    assert len(points) == 100 and points[0] == sum(range(10)) / 10 and points[-1] == sum(range(990, 1000)) / 10
    assert info["objective"] == "loss (maximised)" and info["objective_points"].startswith("mean of 10 consecutive")
    long.extend(range(5))  # 1005 values: 11 per point, the last point over what remains
    long.record(info)
    assert len(info["objective_trajectory"]) == 92 and info["objective_trajectory"][-1] == sum(
        long.values[1001:]) / 4

    chunked = ObjectiveTrace("loss", maximize=True)
    chunked.extend_mean([[1.0, 2.0], [4.0, 8.0]], weights=[3, 1])  # two batches of 3 and 1 images
    assert chunked.values == [1.75, 3.5]


def test_dreambooth_steps_trace_the_instance_loss(tiny, identity):
    """The trace holds the instance half's loss of every step (the total adds the prior term);
    the record gives the mean of the last 10 steps and one mean per 10 steps."""
    from benchbase.toolkit import ClassPrior, TrainingTrace, adamw, dreambooth_steps

    models = tiny.load(torch.device("cpu"), torch.float32)
    params = list(models.unet.parameters())
    models.unet.requires_grad_(True)
    trace = TrainingTrace()
    prior = ClassPrior(sample_identity("hopper", 64, images_per_set=2).set_A, models, cache_latents=True)
    losses = dreambooth_steps(models, params, adamw(params, lr=1e-4), identity.set_B, 23, Prompts(),
                              torch.Generator().manual_seed(0), prior=prior, trace=trace)
    assert len(trace) == 23 and all(0 < i < total for i, total in zip(trace.instance, losses))
    info = {}
    trace.record(info)
    assert info["final_instance_loss"] == pytest.approx(sum(trace.instance[-10:]) / 10)
    assert info["instance_loss_every"] == 10 and len(info["instance_loss_trajectory"]) == 3
    assert info["instance_loss_trajectory"][2] == pytest.approx(sum(trace.instance[20:]) / 3)
    empty = {}
    TrainingTrace().record(empty)
    assert empty == {"final_instance_loss": None, "instance_loss_trajectory": [], "instance_loss_every": 10}


# -- LoRA ------------------------------------------------------------------------------------


def test_lora_starts_as_the_identity_and_merges_to_the_same_model(tiny):
    from benchbase.toolkit import UNET_TARGETS, add_lora, lora_parameters, lora_state_dict, merge_lora
    from benchbase.toolkit.lora import split_lora_state

    models = tiny.load(torch.device("cpu"), torch.float32)
    base = tiny.load(torch.device("cpu"), torch.float32)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = torch.randn(1, 77, models.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300])
    params = add_lora(models.unet, 2, alpha=4.0, generator=torch.Generator().manual_seed(2))
    assert params == lora_parameters(models.unet) and all(p.requires_grad for _, p in params)
    assert not any(p.requires_grad for n, p in models.unet.named_parameters() if ".lora_" not in n)
    suffixes = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in params}
    assert suffixes == {"to_q", "to_k", "to_v", "0"} and UNET_TARGETS[-1] == "to_out.0"
    with torch.no_grad():
        assert torch.equal(models.unet(x, t, c).sample, base.unet(x, t, c).sample)  # B = 0
        for name, p in params:
            if ".lora_B." in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        adapted = models.unet(x, t, c).sample
        layers = split_lora_state({f"unet.{k}": v for k, v in lora_state_dict(models.unet).items()})["unet"]
        assert merge_lora(base.unet, layers, scale=2.0) == len(params) // 2
        assert torch.allclose(base.unet(x, t, c).sample, adapted, atol=1e-5)
        assert not torch.allclose(adapted, tiny.load(torch.device("cpu"), torch.float32).unet(x, t, c).sample,
                                  atol=1e-4)


def test_lora_init_comes_from_the_generator(tiny):
    from benchbase.toolkit import add_lora

    def a_matrices(init, seed, global_seed):
        torch.manual_seed(global_seed)
        models = tiny.load(torch.device("cpu"), torch.bfloat16)
        params = add_lora(models.unet, 2, init=init, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float32 if init == "gaussian" else None)
        return [p for n, p in params if ".lora_A." in n]

    for init in ("gaussian", "kaiming"):
        a, b, c = a_matrices(init, 0, 0), a_matrices(init, 0, 123), a_matrices(init, 1, 0)
        assert all(torch.equal(u, v) for u, v in zip(a, b))  # independent of the global RNG
        assert not all(torch.equal(u, v) for u, v in zip(a, c))
    gaussian = a_matrices("gaussian", 0, 0)
    assert all(p.dtype == torch.float32 for p in gaussian)  # fp32 adapters on a bf16 base
    assert a_matrices("kaiming", 0, 0)[0].dtype == torch.bfloat16
    std = torch.cat([p.flatten() for p in gaussian]).std()
    assert 0.4 < std < 0.6  # N(0, 1/rank²) with rank 2


# -- the DreamBooth loop -------------------------------------------------------------------------


def reference_dreambooth(models, params, optimizer, images, class_imgs, steps, prompts, generator,
                         train_text_encoder, max_grad_norm, cached):
    """DreamBooth with prior preservation, one step at a time, batch 1 (the personalizer's loop
    before the toolkit, and ASPL's surrogate loop with cached class latents)."""
    ids = models.tokenize([prompts.instance, prompts.class_])
    models.unet.train()  # as the scripts do (the modules take other kernels in training mode)
    models.text_encoder.train(train_text_encoder)
    if cached:
        with torch.no_grad():
            dist = models.vae.encode(class_imgs * 2 - 1).latent_dist
    for step in range(steps):
        inst, cls = images[[step % len(images)]], class_imgs[[step % len(class_imgs)]]
        with torch.no_grad():
            if cached:
                z_i = models.encode_images(inst, sample=True, generator=generator)
                mean, std = dist.mean[[step % len(class_imgs)]], dist.std[[step % len(class_imgs)]]
                z_c = (mean + std * torch.randn(mean.shape, generator=generator)) * models.scaling_factor
                latents = torch.cat([z_i, z_c])
            else:
                latents = models.encode_images(torch.cat([inst, cls]), sample=True, generator=generator)
        with torch.set_grad_enabled(train_text_encoder):
            cond = models.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, models.num_train_timesteps, (2,), generator=generator)
        pred = models.unet(models.noise_scheduler.add_noise(latents, noise, t), t, cond).sample
        err = (pred - noise).pow(2).flatten(1).mean(1)
        loss = err[0] + 1.0 * err[1]
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("cached", [False, True], ids=["encoded-every-step", "cached-posterior"])
def test_dreambooth_steps_equal_the_reference_loop(cached, tiny, identity):
    from benchbase.toolkit import ClassPrior, adamw, dreambooth_steps

    prompts = Prompts()
    class_imgs = sample_identity("hopper", 64, images_per_set=2).set_A
    weights = []
    for use_toolkit in (True, False):
        models = tiny.load(torch.device("cpu"), torch.float32)
        models.unet.requires_grad_(True)
        models.text_encoder.requires_grad_(True)
        params = [*models.unet.parameters(), *models.text_encoder.parameters()]
        opt = adamw(params, lr=1e-3)
        gen = torch.Generator().manual_seed(7)
        if use_toolkit:
            prior = ClassPrior(class_imgs, models, cache_latents=cached)
            losses = dreambooth_steps(models, params, opt, identity.set_B, 3, prompts, gen, train_text_encoder=True,
                                      prior=prior, max_grad_norm=1.0)
            assert len(losses) == 3
        else:
            reference_dreambooth(models, params, opt, identity.set_B, class_imgs, 3, prompts, gen, True, 1.0, cached)
        weights.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], tiny.load(torch.device("cpu"), torch.float32)
                                                      .unet.parameters()))


def test_personalizer_and_surrogate_run_the_same_steps(tiny, identity, tmp_path):
    """The DreamBooth victim and an attack's surrogate, given one recipe, train the same weights."""
    from safetensors.torch import load_file

    from benchbase.toolkit import ClassPrior, class_images
    from benchbase_plugins.attacks._surrogate import Surrogate
    from benchbase_plugins.defenses.basic import NoDefense
    from benchbase_plugins.personalizers.dreambooth import DreamBooth

    recipe = dict(max_train_steps=3, learning_rate=1e-3, num_class_images=2, class_inference_steps=2,
                  max_grad_norm=1.0)
    ctx = make_context(backend=tiny, identity=identity, seed=3, store_dir=tmp_path / "store")
    out = tmp_path / "victim"
    out.mkdir()
    DreamBooth(**recipe).train(identity.set_B, ctx, NoDefense(), out)
    victim = load_file(str(next((out / "unet").glob("*.safetensors"))))

    ctx = make_context(backend=tiny, identity=identity, seed=3, store_dir=tmp_path / "store")
    s = Surrogate(ctx.models(), "full", train_text_encoder=True)
    prior = ClassPrior(class_images(ctx, ctx.prompts.class_, 2, 2, 7.5))  # the same shared stage
    s.train_steps(identity.set_B, 3, ctx.prompts, ctx.generator, optimizer=s.optimizer(lr=1e-3),
                  class_latents=prior, max_grad_norm=1.0)
    surrogate = {n.removeprefix("unet."): p for n, p in s.named if n.startswith("unet.")}
    assert surrogate and surrogate.keys() <= victim.keys()
    assert all(torch.equal(victim[k], surrogate[k].detach()) for k in surrogate)


@pytest.mark.parametrize("cached", [False, True], ids=["joint-encode", "cached-class-posterior"])
def test_posterior_cache_gives_the_latents_of_encoding_every_step(cached, tiny, identity):
    """A batch that comes round again reuses its VAE posterior: the same weights, bit for bit, as
    encoding it every step (the noise draws stay in order); one cache serves equal images only."""
    from benchbase.toolkit import ClassPrior, PosteriorCache, adamw, dreambooth_steps

    class_imgs = sample_identity("hopper", 64, images_per_set=2).set_A
    weights, caches = [], []
    for posteriors in (False, PosteriorCache()):
        models = tiny.load(torch.device("cpu"), torch.float32)
        models.unet.requires_grad_(True)
        params = list(models.unet.parameters())
        opt = adamw(params, lr=1e-3)
        gen = torch.Generator().manual_seed(7)
        prior = ClassPrior(class_imgs, models, cache_latents=cached)
        for _ in range(2):  # the second call (a copy of the images) runs on the first one's posteriors
            dreambooth_steps(models, params, opt, identity.set_B.clone(), 6, Prompts(), gen, prior=prior,
                             max_grad_norm=1.0, posteriors=posteriors)
        weights.append([p.detach().clone() for p in params])
        caches.append(posteriors)
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    cache = caches[1]
    # one entry per distinct batch: the instance images (with a joint encode: instance-class pairs)
    assert len(cache.entries) == (len(identity.set_B) if cached else math.lcm(len(identity.set_B), 2)) < 12
    assert cache.bind(identity.set_B.clone()) and not cache.bind(identity.set_B.flip(-1))
