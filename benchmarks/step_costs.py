"""Per-step costs for the cost model (``benchbase estimate``): seconds of each elementary operation
the bundled stages are made of, on this machine, for one backend shape.

    python benchmarks/step_costs.py --shape sd21           # SD-2.1-base shape, random weights, 512 px (CUDA)
    python benchmarks/step_costs.py --shape mini           # the mini world's models, 64 px (CPU here)
    python benchmarks/step_costs.py --shape tiny           # the random-weight tiny backend, 64 px

It prints a ``[devices.NAME.ops]`` TOML table to paste into ``benchbase/costs.toml`` (``--name``
sets NAME) and, with ``--json PATH``, writes the raw figures. Every figure is the fastest of
``--repeats`` timed calls after two warm-up calls, synchronised on CUDA; load the machine as little as
you can while it runs.

The ``sd21`` shape needs only torch, diffusers and transformers (no weights: the modules are
built from the published configs with random weights, which cost exactly what trained ones
cost): SD-2.1-base (``stabilityai/stable-diffusion-2-1-base``: 865 M UNet, OpenCLIP-H text
tower, 84 M VAE), the SD x4 upscaler UNet and VAE (``Stability-AI/stablediffusion``
``configs/stable-diffusion/x4-upscaling.yaml``), guided-diffusion's ImageNet 256x256
unconditional UNet (the config ``plugins/purifiers/_guided_diffusion.py`` converts) and a VGG-16
feature stack for LPIPS. ``mini`` and ``tiny`` load the world's own backend through benchbase.

Units (the names ``costs.toml`` uses; "per latent" = one image's latent at the run resolution):

- ``unet_fwd.P``: UNet forward without grad, per latent (measured at batch 8 = 4 images × CFG)
- ``unet_train.P``: UNet forward+backward with weight gradients, per latent (batch 2 = 1 instance
  + 1 class image); ``unet_train.amp_bf16_ckpt``: bf16 autocast, fp32 weights, checkpointing
- ``unet_grad_x.P``: UNet forward+backward to the input only (frozen weights, PGD), per latent (batch 4)
- ``vae_enc.P`` / ``vae_enc_grad_x.P`` / ``vae_dec.P``: per image; ``vae_encdec_grad_x.P``: IMPRESS's
  encode + decode with input gradient, per image
- ``text_fwd.P`` / ``text_train.P``: text encoder per prompt (77 tokens)
- ``adamw.P``: one AdamW step over UNet + text encoder; ``adamw_unet.P`` over the UNet alone
- ``state_copy.P``: one copy of the UNet + text-encoder weights (a surrogate's save or restore)
- ``upscale_step.L``: x4-upscaler UNet forward with CFG (2 latents) per image at low-res side L
  (mini, tiny: at the purifiers' batch of 4 images; sd21: one image)
- ``upscale_dec.L``: its VAE decode (to 4L px) per image (batched the same way)
- ``pixel_fwd``: guided-diffusion 256 UNet forward per 256-px window
- ``lpips_grad_x``: VGG-16 features forward+backward per image (LPIPS)
- ``save_unet``: writing the fine-tuned UNet + text encoder (safetensors) to local disk
- ``model_load`` (mini, tiny): loading the backend's models (what each model-using stage starts with)

P is the precision the op ran in: ``fp32`` (pure fp32 weights, torch's default matmul settings),
``bf16`` / ``fp16`` (pure half weights), ``amp_bf16`` (fp32 weights, bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------


def sd21_modules(device: str, resolution: int = 512):
    """SD-2.1-base UNet, VAE, text encoder with random weights (configs of the released model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=resolution // 8, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=resolution)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, hidden_act="gelu", projection_dim=512, max_position_embeddings=77))
    return unet, vae, text, 77, 1024


def upscaler_modules(device: str):
    """The SD x4 upscaler's UNet and VAE (x4-upscaling.yaml: model_channels 256, mult 1,2,2,4,
    attention at ds 2,4,8 with self-attention only in the last, 8 heads, context 1024)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(
            in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            only_cross_attention=(True, True, True, False), cross_attention_dim=1024, attention_head_dim=8,
            num_class_embeds=1000, use_linear_projection=True, norm_num_groups=32)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    return unet, vae


def pixel_unet(device: str):
    """guided-diffusion's ImageNet 256x256 unconditional UNet as a diffusers UNet2DModel."""
    import importlib.util

    from diffusers import UNet2DModel

    path = Path(__file__).resolve().parents[1] / "plugins" / "purifiers" / "_guided_diffusion.py"
    spec = importlib.util.spec_from_file_location("_gd", path)
    gd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gd)
    with torch.device(device):
        return UNet2DModel(**gd.unet_config(**gd.IMAGENET_256_UNCOND))


def world_modules(shape: str, device: str):
    """(unet, vae, text_encoder, tokens, hidden, resolution) of a benchbase backend (mini, tiny)."""
    from benchbase.plugins import get_plugin_manager

    backend = get_plugin_manager().create("backends", shape, {})
    models = backend.load(torch.device(device), torch.float32)
    te = models.text_encoder
    tokens = models.tokenize(["a photo of sks person"]).shape[1]
    return models.unet, models.vae, te, tokens, te.config.hidden_size, backend.resolution


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


class Timer:
    """Seconds of a call. ``clock = "cpu"`` (CPU runs on one thread): the process's CPU time, which
    other jobs on a shared machine stretch far less than wall time (on the project's 2 cores at
    load 5-10 the wall time of the same call varied 2-4x; its CPU time is the compute a quiet
    machine gives). ``"wall"``: ``perf_counter``, synchronised on CUDA."""

    def __init__(self, device: str, repeats: int, clock: str = "wall"):
        self.cuda = device.startswith("cuda")
        self.repeats = repeats
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, per: float = 1.0, warmup: int = 2) -> float:
        # two warm-up calls: the first call of a shape picks its kernels (oneDNN primitives,
        # allocator pools); the minimum of the timed calls, not the median: on a shared machine
        # other jobs only ever add time, and the loops of a quiet run see the fastest calls
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            t = self.now()
            fn()
            self.sync()
            times.append(self.now() - t)
        return min(times) / per


def host_info() -> dict:
    """What decides the half-precision figures on a CPU: the model, the ISA torch dispatches to
    and whether the CPU has native bf16/fp16 arithmetic. Without ``avx512_bf16``/``amx_bf16``
    (or when oneDNN is held to an older ISA: ``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``) bf16
    convolutions fall back to slow paths: a bf16 VAE-encoder backward costs 10-30x its fp32 time,
    where with native bf16 it costs about the same (benchmarks/README.md, section 1)."""
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "isa_env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
                        if k in os.environ}}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
        info["half_isa"] = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "amx_tile"})
    except OSError:
        pass
    return info


def cast(module: torch.nn.Module, dtype: torch.dtype, grad: bool):
    module.to(dtype)
    module.requires_grad_(grad)
    return module


# ---------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------


def measure(shape: str, device: str, repeats: int, precisions: list[str], extras: bool,
            resolution: int = 512, clock: str = "wall") -> dict:
    timer = Timer(device, repeats, clock)
    if shape == "sd21":
        unet, vae, text, tokens, hidden = sd21_modules(device, resolution)
        res = resolution
    else:
        unet, vae, text, tokens, hidden, res = world_modules(shape, device)
    lat = res // 8
    ops: dict[str, float] = {}
    ids = torch.randint(0, 49407, (2, tokens), device=device)

    def latents(n, dtype, grad=False):
        return torch.randn(n, 4, lat, lat, device=device, dtype=dtype, requires_grad=grad)

    def cond(n, dtype):
        return torch.randn(n, tokens, hidden, device=device, dtype=dtype)

    t = torch.full((8,), 500, device=device)
    for p in precisions:
        dt = DT[p]
        cast(unet, dt, False)
        with torch.no_grad():
            ops[f"unet_fwd.{p}"] = timer(lambda: unet(latents(8, dt), t, cond(8, dt)), per=8)

        def grad_x():
            z = latents(4, dt, grad=True)
            out = unet(z, t[:4], cond(4, dt)).sample
            torch.autograd.grad(out.float().pow(2).mean(), z)

        ops[f"unet_grad_x.{p}"] = timer(grad_x, per=4)
        cast(unet, dt, True)

        def train():
            out = unet(latents(2, dt), t[:2], cond(2, dt)).sample
            out.float().pow(2).mean().backward()
            unet.zero_grad(set_to_none=True)

        ops[f"unet_train.{p}"] = timer(train, per=2)
        cast(vae, dt, False)
        x = torch.rand(4, 3, res, res, device=device, dtype=dt)
        with torch.no_grad():
            ops[f"vae_enc.{p}"] = timer(lambda: vae.encode(x).latent_dist.sample(), per=4)
            ops[f"vae_dec.{p}"] = timer(lambda: vae.decode(latents(4, dt)).sample, per=4)

        def enc_grad():
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(vae.encode(xx).latent_dist.mean.float().sum(), xx)

        ops[f"vae_enc_grad_x.{p}"] = timer(enc_grad, per=4)

        def encdec_grad():
            xx = x[:1].clone().requires_grad_(True)
            y = vae.decode(vae.encode(xx).latent_dist.mode()).sample
            torch.autograd.grad(y.float().pow(2).mean(), xx)

        ops[f"vae_encdec_grad_x.{p}"] = timer(encdec_grad, per=1)
        cast(text, dt, False)
        with torch.no_grad():
            ops[f"text_fwd.{p}"] = timer(lambda: text(ids)[0], per=2)
        cast(text, dt, True)

        def text_train():
            text(ids)[0].float().pow(2).mean().backward()
            text.zero_grad(set_to_none=True)

        ops[f"text_train.{p}"] = timer(text_train, per=2)
        params = list(unet.parameters()) + list(text.parameters())
        for prm in params:
            prm.grad = torch.zeros_like(prm)
        from benchbase.toolkit import adamw

        for name, group in (("adamw", params), ("adamw_unet", list(unet.parameters()))):
            opt = adamw(group, lr=1e-9)  # the loops' optimizer (fused where they fuse it)
            ops[f"{name}.{p}"] = timer(opt.step)
            del opt
        for prm in params:
            prm.grad = None
        ops[f"state_copy.{p}"] = timer(lambda: [q.detach().clone() for q in params])

    # DreamBooth on a GPU: fp32 weights, bf16 autocast, gradient checkpointing (the sd21 suite)
    if device.startswith("cuda"):
        cast(unet, torch.float32, True)
        cast(text, torch.float32, True)
        for ckpt in (False, True):
            if ckpt:
                unet.enable_gradient_checkpointing()

            def amp_train():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    c = text(ids)[0]
                    out = unet(latents(2, torch.float32), t[:2], c).sample
                out.float().pow(2).mean().backward()
                unet.zero_grad(set_to_none=True)
                text.zero_grad(set_to_none=True)

            ops["unet_text_train.amp_bf16" + ("_ckpt" if ckpt else "")] = timer(amp_train, per=2)
        unet.disable_gradient_checkpointing()

    # writing a fine-tuned model (full DreamBooth stores UNet + text encoder per cell)
    from safetensors.torch import save_file

    state = {f"u.{k}": v.detach().float().contiguous().cpu() for k, v in unet.state_dict().items()}
    state.update({f"t.{k}": v.detach().float().contiguous().cpu() for k, v in text.state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp:
        once = Timer(device, min(2, repeats))  # seconds per write (wall: it waits on the disk): two are enough
        ops["save_unet"] = once(lambda s=state: save_file(s, str(Path(tmp) / "m.safetensors")), warmup=0)
    del state

    if extras and shape != "sd21":
        ops.update(world_extras(shape, device, timer, res, t))
    if extras and shape == "sd21":
        del unet, text
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        up, up_vae = upscaler_modules(device)
        cast(up, torch.float32, False)
        cast(up_vae, torch.float32, False)
        for low in (res // 4, res):  # realign/sr's 128-px bottleneck; noisy-upscale's full image
            z = torch.randn(2, 7, low, low, device=device)
            c = torch.randn(2, 77, 1024, device=device)
            lvl = torch.full((2,), 20, device=device)
            with torch.no_grad():
                ops[f"upscale_step.{low}"] = timer(lambda: up(z, t[:2], c, class_labels=lvl).sample, per=1)
                ops[f"upscale_dec.{low}"] = timer(
                    lambda: up_vae.decode(torch.randn(1, 4, low, low, device=device)).sample, per=1)
        del up, up_vae
        px = cast(pixel_unet(device), torch.float32, False)
        side = min(256, res)
        w = torch.randn(8, 3, side, side, device=device)
        with torch.no_grad():
            ops["pixel_fwd"] = timer(lambda: px(w, t[:8]).sample, per=8)
        del px
        import torchvision

        vgg = cast(torchvision.models.vgg16().features.to(device), torch.float32, False)

        def lp():
            xx = torch.rand(1, 3, res, res, device=device, requires_grad=True)
            torch.autograd.grad(vgg(xx).pow(2).mean(), xx)

        ops["lpips_grad_x"] = timer(lp)
    return ops


def world_extras(shape: str, device: str, timer: Timer, res: int, t: torch.Tensor) -> dict:
    """The upscaler, pixel model and LPIPS a world registers for its roles (``benchbase ls models``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    from benchbase.plugins import get_plugin_manager

    pm = get_plugin_manager()
    ops = {}
    backend = pm.create("backends", shape, {})
    ops["model_load"] = timer(lambda: backend.load(torch.device(device), torch.float32))
    folder = Path(pm.find_model("x4-upscaler", shape).load()(shape))
    up = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).requires_grad_(False)
    up_vae = AutoencoderKL.from_pretrained(folder / "vae").to(device).requires_grad_(False)
    hidden = up.config.cross_attention_dim
    for low in (res // 4, res):  # the purifiers' bottleneck (128 px at 512, scaled), and the full image
        # the purifiers' batch: 4 images, 8 latents with CFG (upscale.py batch_size); one image at a
        # time cost 2.7x more per image at 16 px than the loops paid (benchmarks/calibrate.py)
        z = torch.randn(8, up.config.in_channels, low, low, device=device)
        c = torch.randn(8, 77, hidden, device=device)
        lvl = torch.full((8,), 20, device=device)
        with torch.no_grad():
            ops[f"upscale_step.{low}"] = timer(lambda: up(z, t[:8], c, class_labels=lvl).sample, per=4)
            ops[f"upscale_dec.{low}"] = timer(
                lambda: up_vae.decode(torch.randn(4, 4, low, low, device=device)).sample, per=4)
    try:
        px_folder = Path(pm.find_model("pixel-diffusion", shape).load()(shape))
        px = UNet2DModel.from_pretrained(px_folder / "unet").to(device).requires_grad_(False)
        size = px.config.sample_size
        side = int(size[0] if isinstance(size, (list, tuple)) else size)
        w = torch.randn(8, 3, side, side, device=device)
        with torch.no_grad():
            ops["pixel_fwd"] = timer(lambda: px(w, t[:8]).sample, per=8)
    except Exception as exc:  # a world without a pixel model (mini)
        print(f"# no pixel-diffusion model for {shape}: {type(exc).__name__}", file=sys.stderr)
    try:
        lpips = pm.find_model("lpips", shape).load()(shape, torch.device(device))

        def lp():
            a = torch.rand(1, 3, res, res, device=device, requires_grad=True)
            torch.autograd.grad(lpips(a * 2 - 1, torch.zeros_like(a)).sum(), a)

        ops["lpips_grad_x"] = timer(lp)
    except Exception as exc:
        print(f"# no lpips model for {shape}: {type(exc).__name__}", file=sys.stderr)
    return ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["sd21", "mini", "tiny"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", help="device table name for costs.toml (default: SHAPE-DEVICE)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per op (after 2 warm-ups); the fastest is kept")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default on CPU: 1, what benchmarks/calibrate.py and the cpu tables use)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="cpu: process CPU time (default on CPU with one thread); wall: elapsed time")
    ap.add_argument("--precisions", default=None, help="comma list (default: fp32,bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--no-extras", action="store_true", help="skip the upscaler, pixel model and LPIPS (sd21)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--resolution", type=int, default=512, help="sd21 only: image side (512; less to try the script)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    precisions = (args.precisions or ("fp32,bf16,fp16" if cuda else "fp32")).split(",")
    start = time.time()
    clock = args.clock or ("cpu" if not cuda and torch.get_num_threads() == 1 else "wall")
    ops = measure(args.shape, args.device, args.repeats, precisions, not args.no_extras, args.resolution, clock)
    host = host_info()
    what = torch.cuda.get_device_name(0) if cuda else (
        f"{host.get('cpu', 'CPU')} ({host['cpu_capability']}, native half: {','.join(host.get('half_isa', [])) or 'none'}"
        + (f", {host['isa_env']}" if host["isa_env"] else "") + f"), {torch.get_num_threads()} torch threads")
    name = args.name or f"{args.shape}-{'gpu' if cuda else 'cpu'}"
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {"shape": args.shape, "device": what, "host": host, "torch": torch.__version__, "repeats": args.repeats, "clock": clock,
            "seconds": round(time.time() - start, 1), "load": [load_before, load_after],
            "command": "python benchmarks/step_costs.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"[devices.{name}]")
    print(f"# measured: {meta['device']}, torch {meta['torch']}, {clock} clock, load {meta['load']}, {meta['seconds']} s")
    print(f"# command: {meta['command']}")
    print(f"[devices.{name}.ops]")
    for k, v in ops.items():
        print(f'"{k}" = {v:.4g}')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "ops": ops}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
