"""The attacks that train a surrogate (ASPL, FSMG, SimAC, MetaCloak, CAAT) on the tiny backend.

Step counts are shrunk (and α raised so the few steps can cover the ball); the science check
is that each attack raises the surrogate denoising loss of the protected batch more than
uniform noise at the same budget. The loss is averaged over fixed timesteps × noise draws
with common random numbers for every batch compared. It is evaluated on the model the
attack targets: FSMG's clean-trained surrogate (loaded from its shared stage); for the
alternating attacks the base model — at lr 5e-7 (CAAT 1e-5) and a few steps their final
surrogate stays within rounding of it.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchbase.images import (
    linf_levels,
    load_pngs,
    quantize_to_budget,
    save_pngs,
    to_uint8,
)
from benchbase.testing import PretrainedTiny, make_context, sample_identity

CLASS = dict(num_class_images=2, class_inference_steps=2)


def _cases():
    from benchbase_plugins.attacks.aspl import ASPL
    from benchbase_plugins.attacks.caat import CAAT
    from benchbase_plugins.attacks.fsmg import FSMG
    from benchbase_plugins.attacks.metacloak import MetaCloak
    from benchbase_plugins.attacks.simac import SimAC

    return {
        "aspl": lambda: ASPL(max_train_steps=3, max_f_train_steps=1, max_adv_train_steps=6, pgd_alpha=2.0, **CLASS),
        "fsmg": lambda: FSMG(surrogate_train_steps=3, surrogate_batch_size=1, max_adv_train_steps=24, pgd_alpha=2.0,
                             **CLASS),
        "simac": lambda: SimAC(max_train_steps=3, max_f_train_steps=1, max_adv_train_steps=6, pgd_alpha=2.0,
                               select_keep=960, select_samples=3, **CLASS),
        "metacloak": lambda: MetaCloak(total_trial_num=1, pool_train_steps=2, pool_interval=2, advance_steps=1,
                                       defense_pgd_step_num=5, pgd_alpha=3.0, **CLASS),
        "caat": lambda: CAAT(max_train_steps=20, pgd_alpha=2.0),
    }


NAMES = ["aspl", "fsmg", "simac", "metacloak", "caat"]

# smallest runs that still pass through every phase of each loop (for the same-seed check)
QUICK = {
    "aspl": dict(max_train_steps=1, max_f_train_steps=1, max_adv_train_steps=2),
    "fsmg": dict(max_adv_train_steps=2),
    "simac": dict(max_train_steps=1, max_f_train_steps=1, max_adv_train_steps=2),
    "metacloak": dict(defense_pgd_step_num=2),
    "caat": dict(max_train_steps=2),
}


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory):
    torch.manual_seed(0)
    # a briefly denoising-trained tiny UNet: with random weights the loss barely depends on the pixels
    return {"backend": PretrainedTiny(), "identity": sample_identity("astronaut", 64, images_per_set=2),
            "store": tmp_path_factory.mktemp("store"), "runs": {}}


def _ctx(env, seed=0):
    return make_context(backend=env["backend"], identity=env["identity"], seed=seed, store_dir=env["store"])


def _run(env, name):
    """The attack's science configuration, run once with seed 0 (memoised): (attack, quantised output, ctx)."""
    if name not in env["runs"]:
        attack = _cases()[name]()
        ctx = _ctx(env)
        adv = attack.protect(env["identity"].set_B.clone(), ctx)
        out = quantize_to_budget(adv, env["identity"].set_B, attack.eps, mode=attack.params.quantization)
        env["runs"][name] = (attack, out, ctx)
    return env["runs"][name]


def _eval_loss(models, unet, cond, images, draws=8, timesteps=(50, 200, 400, 600, 800, 950), eot=False):
    """Mean L_DM over fixed timesteps × noise draws; the same generator for every batch compared.
    ``eot``: each draw first applies MetaCloak's blur+flip with a fixed per-draw seed."""
    from benchbase_plugins.attacks.metacloak import BlurFlip

    g = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    with torch.no_grad():
        for d in range(draws):
            view = BlurFlip(torch.Generator().manual_seed(d))(images) if eot else images
            z = models.encode_images(view, sample=True, generator=g)
            for t in timesteps:
                ts = torch.full((len(images),), t, dtype=torch.long)
                total += float(models.diffusion_loss(z, cond[: len(images)], generator=g, timesteps=ts, unet=unet))
                count += 1
    return total / count


@pytest.mark.parametrize("name", NAMES)
def test_budget_holds_after_png_round_trip(env, name, tmp_path):
    attack, out, _ = _run(env, name)
    clean = env["identity"].set_B
    save_pngs(out, tmp_path)
    back = load_pngs(tmp_path)
    dist = linf_levels(back, clean)
    assert dist <= math.floor(attack.eps + 1e-6)
    assert dist >= 1  # it did perturb


# one objective value per outer iteration (ASPL, SimAC: max_train_steps; MetaCloak: trials × pool
# states × rounds), per PGD step (FSMG) or per joint step (CAAT), for the _cases() settings
TRAJECTORY = {"aspl": 3, "simac": 3, "fsmg": 24, "metacloak": 1 * 2 * 2, "caat": 20}


@pytest.mark.parametrize("name", NAMES)
def test_objective_trajectory_is_recorded(env, name):
    _, _, ctx = _run(env, name)
    info = ctx.info
    trajectory = info["objective_trajectory"]
    assert len(trajectory) == TRAJECTORY[name] and all(math.isfinite(v) for v in trajectory)
    assert info["objective"].endswith("(maximised)") and "L_DM" in info["objective"]
    first = {"fsmg": "fsmg_pgd_loss_first", "caat": "caat_loss_first"}.get(name)
    if first:  # one value per step: the trajectory starts at the first step's loss
        assert trajectory[0] == pytest.approx(info[first])
        assert info["objective_points"].startswith("one per")


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(env, name):
    outs = []
    for _ in range(2):
        attack = _cases()[name]()
        for key, value in QUICK[name].items():
            setattr(attack.params, key, value)
        adv = attack.protect(env["identity"].set_B.clone(), _ctx(env))
        outs.append(to_uint8(quantize_to_budget(adv, env["identity"].set_B, attack.eps)))
    assert (outs[0] == outs[1]).all()


# Evaluated on the briefly denoising-trained tiny UNet (PretrainedTiny): on purely random
# weights the loss barely depends on the pixels and gains (~1e-4 on a loss of ~1) drown in
# the sampling noise of the gradient.


@pytest.mark.parametrize("name", NAMES)
def test_raises_surrogate_loss_more_than_uniform_noise(env, name):
    from benchbase_plugins.attacks.baseline import UniformNoise

    attack, out, ctx = _run(env, name)
    clean = env["identity"].set_B
    noise_attack = UniformNoise(eps=attack.eps)
    noisy = quantize_to_budget(noise_attack.protect(clean.clone(), _ctx(env, seed=0)), clean, attack.eps)
    if name == "fsmg":
        surrogate = attack.load_surrogate(ctx, ctx.prompts)  # the cached clean-trained θ*
        models, unet = surrogate.models, surrogate.unet
    else:
        models = ctx.models()
        unet = models.unet
    prompt = f"a photo of a {ctx.prompts.class_noun}" if name == "caat" else ctx.prompts.instance
    cond = models.encode_prompt([prompt] * len(clean))
    eot = name == "metacloak"  # its objective is the loss after blur + flip
    base = _eval_loss(models, unet, cond, clean, eot=eot)
    gain_attack = _eval_loss(models, unet, cond, out, eot=eot) - base
    gain_noise = _eval_loss(models, unet, cond, noisy, eot=eot) - base
    assert gain_attack > gain_noise, (name, gain_attack, gain_noise)


def test_fsmg_surrogate_is_a_shared_stage(env):
    """A second cell with the same backend × set_A × recipe loads θ* instead of training again."""
    attack, _, _ = _run(env, "fsmg")
    ctx = _ctx(env, seed=5)
    folder = attack.surrogate_folder(ctx, ctx.prompts)
    stamp = (folder / "surrogate.safetensors").stat().st_mtime_ns
    again = _cases()["fsmg"]().surrogate_folder(_ctx(env, seed=6), ctx.prompts)
    assert again == folder and (again / "surrogate.safetensors").stat().st_mtime_ns == stamp


def test_surrogate_state_restore_and_optimizer_reset(env):
    from benchbase_plugins.attacks._surrogate import Surrogate

    ctx = _ctx(env)
    s = Surrogate(ctx.models(), "full", train_text_encoder=True)
    before = s.state()
    images = env["identity"].set_A
    s.train_steps(images, 2, ctx.prompts, ctx.generator, optimizer=s.optimizer(lr=1e-3))
    changed = [n for n, p in s.named if not torch.equal(p, before[n])]
    assert any(n.startswith("unet.") for n in changed) and any(n.startswith("text_encoder.") for n in changed)
    s.load_state(before)
    assert all(torch.equal(p, before[n]) for n, p in s.named)
    # a kept optimizer carries Adam moments into the next call; a fresh one starts at zero
    opt = s.optimizer(lr=1e-3)
    s.train_steps(images, 1, ctx.prompts, ctx.generator, optimizer=opt)
    assert all(int(opt.state[p]["step"]) == 1 for p in s.params if p in opt.state)
    s.train_steps(images, 1, ctx.prompts, ctx.generator, optimizer=opt)
    assert all(int(opt.state[p]["step"]) == 2 for p in s.params if p in opt.state)


def test_caat_and_lora_train_only_their_tensors(env):
    from benchbase_plugins.attacks._surrogate import Surrogate

    ctx = _ctx(env)
    kv = Surrogate(ctx.models(), "crossattn_kv")
    assert kv.named and all(".attn2.to_k." in n or ".attn2.to_v." in n for n, _ in kv.named)
    lora = Surrogate(ctx.models(), "lora", train_text_encoder=False, lora_rank=2, generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in lora.named]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    before = {n: p.detach().clone() for n, p in lora.unet.named_parameters()}
    lora.train_steps(env["identity"].set_A, 1, ctx.prompts, ctx.generator, optimizer=lora.optimizer(lr=1e-2))
    moved = {n for n, p in lora.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(n.removeprefix("unet.") for n in names)


def test_caat_detaches_the_start_token_as_custom_diffusions_processor(env):
    """CAAT's release trains K/V through diffusers' ``CustomDiffusionAttnProcessor``, which detaches
    the first text token's key and value. With ``detach_start_token`` (the default) the K/V weight
    gradient is that processor's; off, it is the default processor's, larger by the start token's
    term. The image gradient is the same in all three (K/V depend only on the frozen text)."""
    import copy

    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    from benchbase.toolkit import denoise
    from benchbase_plugins.attacks._surrogate import Surrogate
    from benchbase_plugins.attacks.caat import CAAT, detach_start_token

    assert CAAT().params.detach_start_token is True
    models = _ctx(env).models()
    s = Surrogate(models, "crossattn_kv", train_text_encoder=False)
    cond = s.encode_prompts(["a photo of a person"] * 2)
    images = env["identity"].set_B[:2]

    def grads(unet, weights):
        x = images.clone().requires_grad_(True)
        g = torch.Generator().manual_seed(7)
        out = denoise(models, unet, models.encode_images(x, sample=True, generator=g), cond, g)
        (out["pred"] - out["target"]).pow(2).mean().backward()
        found = [w.grad.clone() for w in weights(unet)]
        for w in weights(unet):
            w.grad = None
        return found, x.grad

    def plain(unet):
        return [m.weight for n, m in unet.named_modules() if n.endswith((".attn2.to_k", ".attn2.to_v"))]

    # the release's path: Custom Diffusion processors on the cross-attention, loaded with to_k/to_v
    custom = copy.deepcopy(s.unet)
    procs = dict(custom.attn_processors)
    for name in procs:
        if name.endswith("attn2.processor"):
            attn = custom.get_submodule(name.removesuffix(".processor"))
            proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                                                cross_attention_dim=attn.to_k.in_features)
            proc.load_state_dict({"to_k_custom_diffusion.weight": attn.to_k.weight.detach(),
                                  "to_v_custom_diffusion.weight": attn.to_v.weight.detach()})
            procs[name] = proc
    custom.set_attn_processor(procs)
    release, x_release = grads(custom, lambda u: [w for n, m in u.attn_processors.items() if n.endswith("attn2.processor")
                                                  for w in (m.to_k_custom_diffusion.weight, m.to_v_custom_diffusion.weight)])
    assert len(release) == len(plain(s.unet)) > 0

    off, x_off = grads(s.unet, plain)
    hooks = detach_start_token(s.unet)
    try:
        on, x_on = grads(s.unet, plain)
    finally:
        for h in hooks:
            h.remove()
    # the processors differ only in the attention kernel (bmm vs SDPA): float32 rounding
    to_release = sum(float((a - b).norm()) for a, b in zip(on, release))
    start_term = sum(float((c - a).norm()) for a, c in zip(on, off))
    total = sum(float(c.norm()) for c in off)
    print(f"K/V gradient: |on - release| {to_release / total:.2e}, |off - on| {start_term / total:.2e} of |off|")
    assert start_term > 1e-2 * total  # the start token's share of the gradient is not negligible...
    assert to_release < 1e-2 * start_term  # ...and the default leaves it out, as the release does
    for xg in (x_off, x_release):
        assert float((x_on - xg).norm()) < 1e-4 * float(x_on.norm())

    ctx = _ctx(env)
    CAAT(max_train_steps=1).protect(images.clone(), ctx)
    assert ctx.info["caat_detach_start_token"] is True
    assert not any(m._forward_hooks for m in ctx.models().unet.modules())  # removed after the run


def test_targeted_and_ensemble_aspl_run(env, tmp_path):
    from benchbase_plugins.attacks.aspl import ASPL

    target = tmp_path / "target.png"
    save_pngs(torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64), tmp_path, ["target"])
    small = dict(max_train_steps=1, max_f_train_steps=1, max_adv_train_steps=1, pgd_alpha=1.5, **CLASS)
    ctx = _ctx(env)
    out_t = ASPL(target_image=str(target), **small).protect(env["identity"].set_B.clone(), ctx)
    assert ctx.info["targeted"] is True
    out_plain = ASPL(**small).protect(env["identity"].set_B.clone(), _ctx(env))
    assert not torch.equal(out_t, out_plain)
    ctx = _ctx(env)
    out_e = ASPL(ensemble=[{"name": "tiny", "seed": 1}], **small).protect(env["identity"].set_B.clone(), ctx)
    assert ctx.info["surrogates"] == 2
    assert linf_levels(out_e, env["identity"].set_B) <= 6.375 + 1e-4


def test_ensemble_backends_come_from_the_runs_registry(env):
    """E-ASPL builds its extra surrogates through ``ctx.create``: a name registered only in the
    run's own PluginManager resolves there, and is unknown to the process-wide registry."""
    from benchbase.errors import UnknownComponentError
    from benchbase.hookspecs import hookimpl
    from benchbase.plugins import PluginManager
    from benchbase_plugins.attacks.aspl import ASPL
    from benchbase_plugins.worlds.tiny.backend import TinyBackend

    class OnlyHere:
        @hookimpl
        def register_backends(self, register):
            register("tiny-only-here", TinyBackend, version="1")

    pm = PluginManager(entry_points=False)
    pm.register(OnlyHere())
    small = dict(max_train_steps=1, max_f_train_steps=1, max_adv_train_steps=1, **CLASS)
    attack = ASPL(ensemble=[{"name": "tiny-only-here", "seed": 1}], **small)
    ctx = _ctx(env)
    ctx.plugins = pm
    attack.protect(env["identity"].set_B.clone(), ctx)
    assert ctx.info["surrogates"] == 2
    with pytest.raises(UnknownComponentError, match="tiny-only-here"):
        attack.protect(env["identity"].set_B.clone(), _ctx(env))  # no manager: the global registry


def test_simac_feature_loss_contributes_gradient(env):
    from benchbase_plugins.attacks.simac import SimAC

    ctx = _ctx(env)
    attack = SimAC(feature_loss="gradient", **CLASS)
    member = attack._member(ctx, ctx.backend, ctx.prompts, 2)
    models = member.models
    x0 = env["identity"].set_B
    x = (x0 + 4 / 255 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    x = x.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    z = models.encode_images(x, sample=True, generator=g)
    with torch.no_grad():
        z_c = models.encode_images(x0, sample=True, generator=g)
    noise = torch.randn(z.shape, generator=g)
    t = torch.tensor([100, 500])
    cond = member.surrogate.encode_prompts([ctx.prompts.instance] * 2)
    _, feature = attack.feature_interference(member, z, z_c, noise, t, cond)
    grad = torch.autograd.grad(feature, x)[0]
    assert float(feature.detach()) > 0 and grad.abs().sum() > 0


def test_simac_selection_shrinks_each_timestep_set(env):
    _, _, ctx = _run(env, "simac")
    kept = ctx.info["simac_timesteps_kept"]
    assert len(kept) == 2 and all(k <= 960 for k in kept) and ctx.info["simac_selection_unfinished"] == 0


def test_metacloak_pool_points_and_eot():
    from benchbase_plugins.attacks.metacloak import BlurFlip, MetaCloak

    assert MetaCloak()._save_points() == [0, 199, 399, 599, 799, 999]
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = BlurFlip(torch.Generator().manual_seed(0))(x)
    assert y.shape == x.shape and not torch.allclose(x, y)
    assert abs(float(y.mean()) - float(x.mean())) < 0.05  # a blur (and flip) keeps the mean


def test_adaptive_attacks_see_the_threat(env):
    """With ctx.threat, the loss is taken on the purifier's differentiable view and training uses
    the threat's prompts."""
    from benchbase.components import Prompts, Purifier, Threat
    from benchbase_plugins.attacks.caat import CAAT

    calls = []

    class Halve(Purifier):
        differentiable = True

        def purify(self, images, ctx):
            calls.append(images.requires_grad)
            return images * 0.5 + 0.25

    threat = Threat(purifiers=[Halve()], training_prompts=Prompts(class_noun="face"))
    ctx = _ctx(env).with_(threat=threat)
    out = CAAT(max_train_steps=2, pgd_alpha=2.0).protect(env["identity"].set_B.clone(), ctx)
    assert calls and all(calls)  # the gradient flowed through the purifier view
    assert ctx.info["adaptive"] is True and ctx.info["caat_prompt"] == "a photo of a face"
    assert linf_levels(out, env["identity"].set_B) <= 6.375 + 1e-4


# ---------------------------------------------------------------------------------------
# As released: surrogate precision, MetaCloak's data order, pool and unscaled images
# ---------------------------------------------------------------------------------------


def _fraction_changed(after: dict, before: dict, prefix: str) -> float:
    changed = sum(int((after[k] != before[k]).sum()) for k in after if k.startswith(prefix))
    return changed / sum(after[k].numel() for k in after if k.startswith(prefix))


def test_release_precision_keeps_the_surrogate_in_bf16_where_lr_5e7_updates_round_away(env):
    """The official ASPL loop trains pure bf16 weights at lr 5e-7: almost every AdamW update is
    below half a bf16 ulp, so the surrogate stays the base model. The fp32 option fine-tunes."""
    from benchbase_plugins.attacks.aspl import ASPL

    fractions = {}
    for precision in ("release", "fp32"):
        ctx = _ctx(env)
        attack = ASPL(precision=precision, **CLASS)
        member = attack._member(ctx, ctx.backend, ctx.prompts, 2)
        expected = torch.bfloat16 if precision == "release" else torch.float32
        assert {p.dtype for _, p in member.surrogate.named} == {expected}
        assert member.models.vae.dtype == expected  # the VAE too, as train_one_epoch casts it
        before = member.surrogate.state()
        attack._train(member, env["identity"].set_A, ctx.prompts, ctx)  # one 3-step surrogate call
        fractions[precision] = _fraction_changed(member.surrogate.state(), before, "unet.")
    assert ASPL().params.precision == "release" and ASPL().params.learning_rate == 5e-7
    assert fractions["release"] < 0.02, fractions  # ≈ 0.4 % on this UNet
    assert fractions["fp32"] > 0.9, fractions


def test_release_precision_of_each_method():
    from benchbase_plugins.attacks._precision import weights_precision
    from benchbase_plugins.attacks.aspl import ASPL
    from benchbase_plugins.attacks.fsmg import FSMG
    from benchbase_plugins.attacks.metacloak import MetaCloak
    from benchbase_plugins.attacks.simac import SimAC

    assert weights_precision("release", SimAC.release_precision) == "bf16"
    assert FSMG()._precision() == "fp32"  # train_dreambooth.py keeps fp32 master weights
    assert FSMG(precision="bf16")._precision() == "bf16"
    assert MetaCloak()._dtypes() == ("bf16", torch.float16)  # bf16 training, fp16 PGD
    assert MetaCloak(precision="fp32")._dtypes() == ("fp32", None)
    assert weights_precision("context", ASPL.release_precision) == "context"


def _metacloak_spy(monkeypatch):
    """Records (instance images, steps, offset) of every Surrogate.train_steps call."""
    from benchbase_plugins.attacks import _surrogate

    calls = []
    original = _surrogate.Surrogate.train_steps

    def spy(self, images, steps, *args, offset=0, **kwargs):
        calls.append((images.detach().clone(), steps, offset))
        return original(self, images, steps, *args, offset=offset, **kwargs)

    monkeypatch.setattr(_surrogate.Surrogate, "train_steps", spy)
    return calls


def _which(rows: torch.Tensor, originals: torch.Tensor) -> list[int]:
    """Index of the original image each row is (a perturbation is ≤ 11 levels; images differ more)."""
    dist = (rows[:, None] - originals[None]).abs().flatten(2).mean(-1)
    return dist.argmin(1).tolist()


def test_metacloak_reshuffles_instance_images_in_every_training_call(env, monkeypatch):
    """The released dataset permutes set_B each time it is built (every 2-step meta-training call),
    so all four images are trained on; restarting at index 0 would only ever use images 0 and 1."""
    from benchbase_plugins.attacks.metacloak import MetaCloak

    identity = sample_identity("astronaut", 64, images_per_set=4)
    x0 = identity.set_B
    calls = _metacloak_spy(monkeypatch)
    ctx = make_context(backend=env["backend"], identity=identity, seed=0, store_dir=env["store"])
    attack = MetaCloak(total_trial_num=1, pool_train_steps=2, pool_interval=8, advance_steps=2,
                       defense_pgd_step_num=1, precision="fp32", paper_quirks=False, **CLASS)
    attack.protect(x0.clone(), ctx)
    meta = calls  # the pool is the base model alone here (its only save point is step 0)
    assert len(meta) == 4 and all(steps == 2 and offset == 0 for _, steps, offset in meta)
    used = [_which(images[:steps], x0) for images, steps, _ in meta]
    assert all(len(set(u)) == 2 for u in used)
    assert set().union(*map(set, used)) == {0, 1, 2, 3}, used
    assert len({tuple(u) for u in used}) > 1  # a fresh order per call, not one fixed permutation


def test_metacloak_pool_is_saved_before_the_step_as_released(env, monkeypatch):
    """train_few_step saves at the start of step 0 and of every step with (step+1) % interval == 0:
    the first pool state is the base model itself, the next has `interval − 1` updates."""
    from benchbase_plugins.attacks._surrogate import (
        Surrogate,
        class_latents,
        load_models,
    )
    from benchbase_plugins.attacks.metacloak import MetaCloak

    assert MetaCloak()._save_points() == [0, 199, 399, 599, 799, 999]
    assert MetaCloak(pool_train_steps=1100)._save_points() == [0, 199, 399, 599, 799, 999]
    attack = MetaCloak(pool_train_steps=5, pool_interval=2, precision="fp32", learning_rate=1e-3, **CLASS)
    assert attack._save_points() == [0, 1, 3]
    calls = _metacloak_spy(monkeypatch)
    ctx = _ctx(env)
    s = Surrogate(load_models(ctx, "fp32"), "full")
    base = s.state("cpu")
    pool = attack.model_pool(s, env["identity"].set_B, ctx.prompts, ctx, class_latents(ctx, s.models, attack.params,
                                                                                        ctx.prompts))
    assert len(pool) == 3 and all(torch.equal(pool[0][k], base[k]) for k in base)
    assert [(steps, offset) for _, steps, offset in calls] == [(1, 0), (2, 1)]  # 1 update, then 3 in all
    assert _fraction_changed(pool[1], base, "unet.") > 0.5
    # one dataset for the whole pool run: the same instance order in every chunk
    assert torch.equal(calls[0][0], calls[1][0])


def test_metacloak_trains_on_unscaled_instance_images_as_released(env, monkeypatch):
    """paper_quirks (default): the VAE of the training steps sees instance pixels in [0, 255]
    (encode_images computes 2x − 1 of what it is given); the PGD still sees [−1, 1]."""
    from benchbase_plugins.attacks.metacloak import MetaCloak

    x = env["identity"].set_B
    assert MetaCloak().params.paper_quirks is True
    assert torch.allclose(2 * MetaCloak()._instance_view(x) - 1, 255 * x)
    assert torch.equal(MetaCloak(paper_quirks=False)._instance_view(x), x)
    calls = _metacloak_spy(monkeypatch)
    MetaCloak(total_trial_num=1, pool_train_steps=2, pool_interval=2, advance_steps=1, defense_pgd_step_num=1,
              **CLASS).protect(x.clone(), _ctx(env))
    assert calls and all(float(images.max()) > 100 for images, _, _ in calls)  # ≈ (255·x + 1) / 2


def test_fresh_optimizer_resets_in_place_to_a_new_adamws_update(tiny):
    """ASPL's per-call AdamW reset (one optimizer, state zeroed in place) trains the same weights,
    bit for bit, as a new AdamW per call (the released ``train_one_epoch``)."""
    from benchbase.components import Prompts
    from benchbase_plugins.attacks._surrogate import Surrogate, SurrogateParams

    identity = sample_identity("astronaut", 64)

    p = SurrogateParams(learning_rate=1e-3)
    weights, opts = [], []
    for reuse in (False, True):
        models = tiny.load(torch.device("cpu"), torch.float32)
        s = Surrogate(models, "full", train_text_encoder=True)
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            opt = s.fresh_optimizer(p) if reuse else s.optimizer(p)
            opts.append(opt)
            s.train_steps(identity.set_B, 2, Prompts(), gen, optimizer=opt)
        weights.append([t.detach().clone() for t in s.params])
    assert opts[3] is opts[4] is opts[5]
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], tiny.load(torch.device("cpu"), torch.float32)
                                                      .unet.parameters()))
