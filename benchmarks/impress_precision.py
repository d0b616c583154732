"""What IMPRESS's half precision does to its updates: the fraction of pixels one Adam step
changes, float16 (the release) against float32, and how far the output ends from the input
and from the input plus the initial noise alone.

    python benchmarks/impress_precision.py                         # mini world VAE, 64 px, CPU (minutes)
    python benchmarks/impress_precision.py --backend sd --model stabilityai/stable-diffusion-2-1-base \
        --sides 512 --iterations 200 --device cuda                 # the protocol's VAE (needs its weights)

It runs the ``impress`` purifier itself (nothing re-implemented) and watches every optimiser
step through ``torch.optim``'s global step hooks. The per-pixel gradient of a mean over
3·H·W values shrinks with the image area, so the share of updates that float16 rounds away
depends on the resolution: measure at the protocol's 512 px.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def measure(backend, side: int, precision: str, iterations: int, device: str, lpips: str) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from benchbase.images import quantize
    from benchbase.plugins import get_plugin_manager
    from benchbase.testing import make_context, sample_identity

    identity = sample_identity("astronaut", side, images_per_set=2)
    x = identity.set_B
    changed, before = [], {}

    def pre(opt, args, kwargs):
        before["x"] = opt.param_groups[0]["params"][0].detach().clone()

    def post(opt, args, kwargs):
        now = opt.param_groups[0]["params"][0].detach()
        changed.append(float((now != before["x"]).float().mean()))

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        purifier = get_plugin_manager().create("purifiers", "impress", {
            "iterations": iterations, "precision": precision, "lpips": lpips})
        ctx = make_context(backend=backend, identity=identity, seed=0, device=device)
        start = time.perf_counter()
        out = purifier.purify(x, ctx).cpu()
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    # the same noise the purifier drew first (randn from a fresh generator of the same seed)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * purifier.params.init_noise
    noisy = quantize(((x * 2 - 1 + noise).clamp(-1, 1) + 1) / 2)
    return {
        "side": side, "precision": precision, "iterations": iterations,
        "pixels changed per step (mean)": round(sum(changed) / len(changed), 4),
        "pixels changed at the last step": round(changed[-1], 4),
        "output − input (levels, mean abs)": round(float((out - x).abs().mean() * 255), 2),
        "output − (input + initial noise) (levels, mean abs)": round(float((out - noisy).abs().mean() * 255), 2),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="mini", help="mini (default), tiny, or sd")
    parser.add_argument("--model", default=None, help="the sd backend's model folder or hub id")
    parser.add_argument("--sides", type=int, nargs="+", default=[64])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lpips", default="tiny", help="tiny (offline stand-in, default) or vgg")
    args = parser.parse_args()

    from benchbase.plugins import get_plugin_manager

    params = {"model": args.model} if args.model else {}
    backend = get_plugin_manager().create("backends", args.backend, params)
    for side in args.sides:
        for precision in ("float32", "float16"):
            print(json.dumps(measure(backend, side, precision, args.iterations, args.device, args.lpips), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
