"""Attack cost benchmark: seconds per outer iteration and per PGD step, peak memory, and the
overhead of a PGD step over the unavoidable compute.

    python benchmarks/attacks.py                 # tiny backend, CPU, 64 px
    python benchmarks/attacks.py --full          # random-init SD-2.1-base shape, CUDA, 512 px,
                                                 # memory options on (bf16, checkpointing, offload)
    python benchmarks/attacks.py --only aspl caat

Each attack runs in its own subprocess so that peak memory is its own. A "PGD step" is one
gradient evaluation of the attack's loss w.r.t. the pixels (``benchbase.toolkit.pgd.eot_grad``;
for CAAT, one joint iteration). Two reference costs on the same batch are measured with the frozen base model:
``unet`` = one UNet forward+backward on latents, and ``enc+unet`` = VAE-encoder + UNet
forward+backward from pixels (what every pixel-space PGD step must compute). Step counts are
shrunk; per-step and per-iteration figures do not depend on them.

To add an attack, add a row to ``ATTACKS``: (class path, benchmark params, desc of its outer progress loop).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CLASS = {"num_class_images": 2, "class_inference_steps": 2}
MEMORY = {"precision": "bf16", "gradient_checkpointing": True, "offload_state": True}

# name -> (class, params for the benchmark run, desc of its outer loop in ctx.progress)
# (an outer iteration is timed between consecutive iterations of that loop, so model loading
# and other setup are excluded; FSMG's outer loop is its PGD loop, CAAT's its joint steps)
ATTACKS: dict[str, tuple[str, dict, str]] = {
    "aspl": ("benchbase_plugins.attacks.aspl:ASPL", {"max_train_steps": 3, **CLASS}, "aspl"),
    "fsmg": ("benchbase_plugins.attacks.fsmg:FSMG",
             {"surrogate_train_steps": 2, "surrogate_batch_size": 1, "max_adv_train_steps": 6, **CLASS}, "pgd"),
    "simac": ("benchbase_plugins.attacks.simac:SimAC", {"max_train_steps": 3, "select_keep": 960, **CLASS}, "simac"),
    "metacloak": ("benchbase_plugins.attacks.metacloak:MetaCloak",
                  {"total_trial_num": 1, "pool_train_steps": 4, "pool_interval": 2, "advance_steps": 2, **CLASS},
                  "metacloak"),
    "caat": ("benchbase_plugins.attacks.caat:CAAT", {"max_train_steps": 6}, "caat"),
    # frozen-model attacks: the outer loop is the PGD loop itself
    "advdm": ("benchbase_plugins.attacks.advdm:AdvDM", {"steps": 6}, "pgd"),
    "mist": ("benchbase_plugins.attacks.mist:Mist", {"steps": 6}, "pgd"),
    "photoguard": ("benchbase_plugins.attacks.photoguard:PhotoGuard", {"steps": 6}, "pgd"),
    "sds": ("benchbase_plugins.attacks.sds:SDS", {"steps": 6}, "sds"),
}
MEMORY_AWARE = {"aspl", "fsmg", "simac", "metacloak", "caat"}  # attacks whose Params take MEMORY


# ---------------------------------------------------------------------------------------
# A random-init SD-2.1-base-shaped backend (configs only, no weights)
# ---------------------------------------------------------------------------------------


def random_sd21_backend(resolution: int = 512, seed: int = 0):
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchbase.components import Backend
    from benchbase.components import Params as BaseParams
    from benchbase.models.sd import SDModels
    from benchbase.testing import tiny_backend

    tokenizer_folder = tiny_backend().folder() / "tokenizer"

    class RandomSD21(Backend):
        """SD-2.1-base architecture (865 M UNet, 84 M VAE, 340 M OpenCLIP-H text tower), random weights."""

        class Params(BaseParams):
            resolution: int = 512
            seed: int = 0

        def fingerprint(self) -> str:
            return f"random-sd21-base-{self.params.seed}-{self.params.resolution}"

        def load(self, device, dtype):
            from transformers import CLIPTokenizer

            torch.manual_seed(self.params.seed)
            with torch.device(device):
                unet = UNet2DConditionModel(
                    sample_size=self.params.resolution // 8, cross_attention_dim=1024,
                    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                ).to(dtype)
                vae = AutoencoderKL(
                    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    sample_size=self.params.resolution,
                ).to(dtype)
                text_encoder = CLIPTextModel(CLIPTextConfig(
                    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, hidden_act="gelu", projection_dim=512,
                    max_position_embeddings=77)).to(dtype)
            sched_cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
            models = SDModels(
                path="random-sd21-base", unet=unet, vae=vae, text_encoder=text_encoder,
                tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder),
                scheduler=PNDMScheduler(skip_prk_steps=True, **sched_cfg),
                noise_scheduler=DDPMScheduler(clip_sample=False, **sched_cfg),
                device=torch.device(device), dtype=dtype, resolution=self.params.resolution)
            return models.freeze()

    backend = RandomSD21(resolution=resolution, seed=seed)
    backend.name, backend.version = "random-sd21", "bench"
    return backend


# ---------------------------------------------------------------------------------------
# One attack, in a subprocess
# ---------------------------------------------------------------------------------------


def _reference_costs(ctx, images, precision: str = "context", checkpointing: bool = False,
                     repeats: int = 3) -> dict:
    """Seconds of one bare UNet fwd+bwd (latents) and one VAE-encoder+UNet fwd+bwd (pixels), in the
    precision and checkpointing the attack ran with."""
    import torch

    from benchbase_plugins.attacks._surrogate import load_models

    models = load_models(ctx, precision)
    if checkpointing:
        models.unet.enable_gradient_checkpointing()
    cond = models.encode_prompt([ctx.prompts.instance] * len(images))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = models.encode_images(images.to(ctx.device), sample=True, generator=g)

    def unet_only():
        z = z0.detach().requires_grad_(True)
        loss = models.diffusion_loss(z, cond, generator=g)
        torch.autograd.grad(loss, z)

    def enc_unet():
        x = images.to(ctx.device).requires_grad_(True)
        z = models.encode_images(x, sample=True, generator=g)
        torch.autograd.grad(models.diffusion_loss(z, cond, generator=g), x)

    out = {}
    for name, fn in (("unet", unet_only), ("enc+unet", enc_unet)):
        fn()  # warm-up
        _sync(ctx)
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(ctx)
        out[name] = (time.perf_counter() - t) / repeats
    return out


def _sync(ctx):
    import torch

    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def run_one(name: str, full: bool, memory_options: bool, n_images: int) -> dict:
    import importlib
    import resource

    import torch

    import benchbase.toolkit.pgd as pgd_mod
    from benchbase.testing import make_context, sample_identity, tiny_backend

    if full:
        if not torch.cuda.is_available():
            raise SystemExit("--full needs a CUDA device")
        backend, device, dtype, res = random_sd21_backend(512), "cuda", torch.float32, 512
    else:
        backend, device, dtype, res = tiny_backend(), "cpu", torch.float32, 64
        backend.name, backend.version = "tiny", "bench"
    identity = sample_identity("astronaut", res, images_per_set=n_images)
    ctx = make_context(backend=backend, identity=identity, seed=0, device=device, dtype=dtype)
    target, params, outer_desc = ATTACKS[name]
    params = dict(params)
    if memory_options and name in MEMORY_AWARE:
        params.update({k: v for k, v in MEMORY.items() if not (name == "caat" and k == "offload_state")})
    module, cls = target.split(":")
    attack = getattr(importlib.import_module(module), cls)(**params)

    # count and time every pixel-gradient evaluation made through the shared PGD helper
    steps = {"n": 0, "s": 0.0}
    original = pgd_mod.eot_grad

    def timed(*a, **k):
        _sync(ctx)
        t = time.perf_counter()
        r = original(*a, **k)
        _sync(ctx)
        steps["n"] += 1
        steps["s"] += time.perf_counter() - t
        return r

    pgd_mod.eot_grad = timed

    ticks: list[float] = []

    def progress(iterable, desc="", **_):
        for item in iterable:
            if desc == outer_desc:
                _sync(ctx)
                ticks.append(time.perf_counter())
            yield item
        if desc == outer_desc:
            _sync(ctx)
            ticks.append(time.perf_counter())

    ctx.progress = progress
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # shared stages (class images, FSMG surrogate) are computed outside the timed run
    if params.get("num_class_images"):
        from benchbase.toolkit import class_images

        class_images(ctx, ctx.prompts.class_, params["num_class_images"], params["class_inference_steps"], 7.5)
    if name == "fsmg":
        attack.surrogate_folder(ctx, ctx.prompts)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    attack.protect(identity.set_B.clone(), ctx)
    _sync(ctx)
    total = time.perf_counter() - t
    pgd_mod.eot_grad = original
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    outer = max(1, len(ticks) - 1)
    per_outer = (ticks[-1] - ticks[0]) / outer if len(ticks) > 1 else total
    if name == "caat":  # joint iterations: each is one pixel-gradient step (no eot_grad call)
        steps = {"n": outer, "s": per_outer * outer}
    precision = params.get("precision", getattr(attack.params, "precision", "context"))
    if precision == "release":  # the method's released weight dtype (plugins/attacks/_precision.py)
        precision = getattr(attack, "release_precision", "context")
    ref = _reference_costs(ctx, identity.set_B, precision, params.get("gradient_checkpointing", False))
    step = steps["s"] / max(1, steps["n"])
    return {"attack": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "resolution": res, "batch": n_images, "total_s": total, "outer_iterations": outer,
            "s_per_outer": per_outer, "pgd_steps": steps["n"], "s_per_pgd_step": step,
            "peak_gib": peak, "peak_kind": "cuda max_allocated" if device == "cuda" else "process max RSS",
            "ratio_unet": step / ref["unet"], "ratio_enc_unet": step / ref["enc+unet"],
            "unet_fwd_bwd_s": ref["unet"], "enc_unet_fwd_bwd_s": ref["enc+unet"], "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="random-init SD-2.1-base shape on CUDA at 512 px")
    ap.add_argument("--no-memory-options", action="store_true", help="fp32, no checkpointing (with --full)")
    ap.add_argument("--only", nargs="*", default=None, help="attack names")
    ap.add_argument("--images", type=int, default=4, help="set_B batch size (the protocol uses 4)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    memory = args.full and not args.no_memory_options
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.full, memory, args.images)), flush=True)
        return
    rows = []
    for name in args.only or list(ATTACKS):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--images", str(args.images)]
        if args.full:
            cmd.append("--full")
        if args.no_memory_options:
            cmd.append("--no-memory-options")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1][7:]))
    header = f"{'attack':<10} {'s/outer':>9} {'s/PGD step':>11} {'PGD steps':>9} {'peak GiB':>9} " \
             f"{'unet f+b s':>10} {'step/unet':>10} {'step/enc+unet':>14}"
    if rows:
        r0 = rows[0]
        print(f"device {r0['device']}, {r0['resolution']} px, batch {r0['batch']}, memory options "
              f"{'on' if memory else 'off'}; peak = {r0['peak_kind']}")
    print(header)
    for r in rows:
        if r["pgd_steps"]:
            step = f"{r['s_per_pgd_step']:>11.4f} {r['pgd_steps']:>9d}"
            ratios = f"{r['ratio_unet']:>10.2f} {r['ratio_enc_unet']:>14.2f}"
        else:  # its step does not go through eot_grad (SDS): s/outer is its step
            step, ratios = f"{'—':>11} {0:>9d}", f"{'—':>10} {'—':>14}"
        print(f"{r['attack']:<10} {r['s_per_outer']:>9.3f} {step} {r['peak_gib']:>9.2f} "
              f"{r['unet_fwd_bwd_s']:>10.4f} {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
