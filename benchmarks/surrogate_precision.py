"""What the released pure-bf16 surrogate does, measured: the numbers of docs/attacks-surrogate.md.

    python benchmarks/surrogate_precision.py            # all three parts (about 2 min on one core)
    python benchmarks/surrogate_precision.py --json out.json

1. **Synthetic weights.** 2^20 weights ~ N(0, 0.02²) take 3 AdamW steps (lr 5e-7, β 0.9/0.999,
   weight decay 1e-2, eps 1e-8 — Anti-DreamBooth ``train_one_epoch``) on fresh N(0, 1e-3²)
   gradients, once as pure bf16 tensors (the release) and once in fp32: the fraction of weights
   whose value changed.
2. **The mini world's surrogate.** The 3 DreamBooth steps of one ASPL surrogate call
   (``Surrogate.train_steps``, prior preservation, text encoder trained, lr 5e-7) on a held-out
   mini identity, ``precision = "release"`` (bf16) vs ``"fp32"``: the fraction of UNet and
   text-encoder weights changed.
3. **The attack.** ASPL on the same identity with the official inner loop (3 train / 6 PGD /
   3 train) for a few outer iterations in both precisions: the PGD loss of every step, how far
   each surrogate moved from the base model, how far apart the two protected batches are, and
   the denoising loss each batch reaches on the base model (fixed timesteps × noise draws,
   common random numbers) against clean images and uniform noise of the same budget.

Everything is seeded; on another machine the numbers can differ in the last digits (bf16
rounding on CPU kernels), not in kind.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

ADAMW = {"lr": 5e-7, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}


def synthetic(n: int = 2**20, steps: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=g) * 0.02
    grads = [torch.randn(n, generator=g) * 1e-3 for _ in range(steps)]
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        w = torch.nn.Parameter(w0.to(dtype).clone())
        start = w.detach().clone()
        opt = torch.optim.AdamW([w], **ADAMW)
        for grad in grads:
            w.grad = grad.to(dtype)
            opt.step()
        changed = (w.detach() != start)
        out[name] = {"fraction_changed": float(changed.float().mean()),
                     "largest_changed_abs_weight": float(start[changed].abs().max()) if changed.any() else 0.0}
    return out


def _mini_context(store: str, seed: int = 0):
    from benchbase.plugins import get_plugin_manager
    from benchbase.testing import make_context

    pm = get_plugin_manager()
    backend = pm.create("backends", "mini", {})
    dataset = pm.create("datasets", "mini", {"identities": 1})
    name = dataset.identities()[0]
    identity = dataset.load(name, backend.resolution)
    return make_context(backend=backend, identity=identity, seed=seed, store_dir=store,
                        prompts=dataset.prompts())


def _changed(after: dict, before: dict, prefix: str) -> tuple[int, int]:
    n = c = 0
    for k, v in after.items():
        if k.startswith(prefix):
            n += v.numel()
            c += int((v != before[k]).sum())
    return c, n


CLASS = {"num_class_images": 3, "class_inference_steps": 10}


def surrogate_steps(store: str) -> dict:
    from benchbase_plugins.attacks._precision import weights_precision
    from benchbase_plugins.attacks._surrogate import (
        Surrogate,
        class_latents,
        load_models,
    )
    from benchbase_plugins.attacks.aspl import ASPL

    out = {}
    for precision in ("release", "fp32"):
        ctx = _mini_context(store)
        attack = ASPL(precision=precision, **CLASS)
        p = attack.params
        models = load_models(ctx, weights_precision(precision, attack.release_precision))
        s = Surrogate(models, "full", p.train_text_encoder)
        cl = class_latents(ctx, models, p, ctx.prompts, needed=p.max_f_train_steps)
        before = s.state()
        s.train_steps(ctx.identity.set_A, p.max_f_train_steps, ctx.prompts, ctx.generator, p=p, class_latents=cl,
                      max_grad_norm=p.max_grad_norm, prior_loss_weight=p.prior_loss_weight)
        after = s.state()
        row = {"dtype": str(models.dtype).removeprefix("torch.")}
        for part in ("unet.", "text_encoder."):
            c, n = _changed(after, before, part)
            row[part.rstrip(".")] = {"changed": c, "total": n, "fraction_changed": c / n}
        out[precision] = row
    return out


def attack_effect(store: str, outer: int) -> dict:
    from benchbase.images import linf_levels, quantize_to_budget
    from benchbase.testing import fixed_timestep_loss
    from benchbase_plugins.attacks.aspl import ASPL
    from benchbase_plugins.attacks.baseline import UniformNoise

    class Recorded(ASPL):
        def _iteration(self, member, *args, **kwargs):
            x_new, losses = super()._iteration(member, *args, **kwargs)
            self.trace.append([round(v, 5) for v in losses])
            self.member = member
            return x_new, losses

    out, protected = {}, {}
    for precision in ("release", "fp32"):
        ctx = _mini_context(store)
        attack = Recorded(precision=precision, max_train_steps=outer, **CLASS)
        attack.trace = []
        t = time.perf_counter()
        adv = attack.protect(ctx.identity.set_B.clone(), ctx)
        seconds = time.perf_counter() - t
        protected[precision] = quantize_to_budget(adv, ctx.identity.set_B, attack.eps)
        # how far the surrogate θ moved from the base model (same precision) over the whole run
        s = attack.member.surrogate
        base = {n: p.detach().to(s.models.dtype) for n, p in _base_named(ctx, s)}
        after = s.state()
        drift = {}
        for part in ("unet.", "text_encoder."):
            c, n = _changed(after, base, part)
            num = sum(float((after[k].float() - base[k].float()).pow(2).sum()) for k in after if k.startswith(part))
            den = sum(float(base[k].float().pow(2).sum()) for k in after if k.startswith(part))
            drift[part.rstrip(".")] = {"fraction_changed": c / n, "relative_l2": (num / den) ** 0.5}
        out[precision] = {"dtype": ctx.info["surrogate_dtype"], "seconds": round(seconds, 1),
                          "pgd_losses_per_outer_iteration": attack.trace, "surrogate_drift": drift}
    ctx = _mini_context(store)
    clean = ctx.identity.set_B
    noise = UniformNoise(eps=6.375)
    noisy = quantize_to_budget(noise.protect(clean.clone(), ctx), clean, 6.375)
    models = ctx.models()
    cond = models.encode_prompt([ctx.prompts.instance] * len(clean))
    base_loss = fixed_timestep_loss(models, cond[: len(clean)], clean)
    out["base_model_denoising_loss"] = {
        "clean": base_loss,
        "uniform_noise": fixed_timestep_loss(models, cond[: len(noisy)], noisy),
        **{f"aspl_{k}": fixed_timestep_loss(models, cond[: len(v)], v) for k, v in protected.items()},
    }
    diff = (protected["release"] - protected["fp32"]).abs() * 255
    out["release_vs_fp32_protected"] = {"linf_levels": linf_levels(protected["release"], protected["fp32"]),
                                        "mean_abs_levels": float(diff.mean()),
                                        "fraction_pixels_equal": float((diff < 0.5).float().mean())}
    return out


def _base_named(ctx, s):
    """The trainable tensors of a fresh base bundle, named like ``Surrogate.state``."""
    fresh = ctx.models()
    named = {f"unet.{n}": p for n, p in fresh.unet.named_parameters()}
    named.update((f"text_encoder.{n}", p) for n, p in fresh.text_encoder.named_parameters())
    return [(n, named[n]) for n, _ in s.named]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outer", type=int, default=5, help="ASPL outer iterations in part 3")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {"synthetic_N(0,0.02^2)_3_adamw_steps": synthetic()}
    with tempfile.TemporaryDirectory(prefix="bb-precision-") as store:
        results["mini_surrogate_3_steps"] = surrogate_steps(store)
        results[f"mini_aspl_{args.outer}_outer_iterations"] = attack_effect(store, args.outer)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
