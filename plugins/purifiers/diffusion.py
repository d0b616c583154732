"""Diffusion purification: latent DiffPure on SD (DiffShortcut's SD-1.4, or the backend's), pixel DiffPure and GrIDPure on
an unconditional pixel model (guided-diffusion's ImageNet model by default), and DiffShortcut's
re-implementations of the last two.

All three forward-noise the input and run an ancestral DDPM pass back to t = 0. Their
``differentiable_view`` is BPDA by default; ``gradient = "truncated"`` returns the real
output and back-propagates exactly through the encoder/decoder (or resizes) and the last
``truncated_steps`` denoising steps, straight-through (identity) across the earlier ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from benchbase.components import Context, Params, Purifier
from benchbase.errors import WeightsUnavailableError
from benchbase.images import quantize

from ._common import load_pretrained, quiet_diffusers, randn, resize, straight_through


def _ancestral(scheduler, start, x_t: torch.Tensor, predict, ctx: Context, tracked: int,
               desc: str | None = None, run: int | None = None) -> torch.Tensor:
    """DDPM ancestral steps from ``x_t``: ``start, start-1, ..., 0`` when ``start`` is an int,
    else along the given descending timesteps (a respaced schedule), of which the first
    ``run`` are taken (default all). With ``tracked`` > 0 and grad enabled, the last
    ``tracked`` steps keep their graph and the earlier ones are bridged straight-through, so
    the output has the exact value and a truncated gradient."""
    timesteps = list(range(start, -1, -1)) if isinstance(start, int) else list(start)
    scheduler.set_timesteps(timesteps=timesteps, device=x_t.device)
    steps = list(scheduler.timesteps)[:run]
    grad = torch.is_grad_enabled() and tracked > 0
    entry = x_t
    x = x_t.detach() if grad else x_t
    iterator = enumerate(steps)
    if desc:
        iterator = ctx.progress(iterator, desc=desc, total=len(steps), leave=False)
    first = max(0, len(steps) - tracked)
    for i, t in iterator:
        track = grad and i >= first
        if grad and i == first:
            x = straight_through(x, entry)
        with torch.set_grad_enabled(track):
            x = scheduler.step(predict(x, t), t, x, generator=ctx.generator).prev_sample
    return x


# ---------------------------------------------------------------------------------------
# Latent DiffPure
# ---------------------------------------------------------------------------------------


#: the SD checkpoint DiffShortcut's ``ldiffp``/``eldiffp`` load (``defenses/diffpure_main.py``)
LDIFFP_MODEL = "CompVis/stable-diffusion-v1-4"


class LatentDiffPure(Purifier):
    """``diffpure``: latent DiffPure as DiffShortcut ``ldiffp`` (``defenses/diffpure_main.py``):
    z = 0.18215·E(x).sample(), DDPM-noised to t = 300, ancestral DDPM 300 → 0 with
    classifier-free guidance 7.5 (unconditional "") on "a photo of a person, clear, high
    resolution, high quality, noise-free", decoded. ``prompt = ""`` gives ``eldiffp``.

    ``model``: the SD checkpoint that purifies. The release hard-codes
    ``CompVis/stable-diffusion-v1-4`` (``diffpure_main.py`` line 37) whatever the victim is, so
    that is the default; ``model = "backend"`` purifies with the run's own backend
    (``ctx.models()``), any other value is a hub id or a local diffusers folder loaded through
    the ``sd`` backend at the input resolution. Seeded from ``ctx.generator``.
    """

    class Params(Params):
        #: DiffShortcut's ldiffp model; "backend" = the run's backend
        model: str = LDIFFP_MODEL
        t: int = Field(300, ge=0, le=999)
        prompt: str = "a photo of a person, clear, high resolution, high quality, noise-free"
        negative_prompt: str = ""
        guidance_scale: float = Field(7.5, ge=0)
        batch_size: int = Field(4, ge=1)
        gradient: Literal["bpda", "truncated"] = "bpda"
        truncated_steps: int = Field(1, ge=1)

    def _run(self, images: torch.Tensor, ctx: Context, tracked: int) -> torch.Tensor:
        from diffusers import DDPMScheduler

        p = self.params
        models = self.models(ctx, images.shape[-1])
        outs = []
        for start in range(0, len(images), p.batch_size):
            x = images[start:start + p.batch_size]
            n = len(x)
            with torch.no_grad():
                cond = models.encode_prompt([p.prompt] * n)
                uncond = models.encode_prompt([p.negative_prompt] * n)
            emb = torch.cat([uncond, cond])
            # the model's own betas; latents are never clipped
            scheduler = DDPMScheduler.from_config(models.noise_scheduler.config, clip_sample=False)
            with torch.set_grad_enabled(tracked > 0 and torch.is_grad_enabled()):
                z = models.encode_images(x, sample=True, generator=ctx.generator)
            noise = randn(z.shape, ctx, z.dtype)
            z_t = scheduler.add_noise(z, noise, torch.tensor([p.t], device=z.device))

            def predict(z_in, t, emb=emb):
                pred = models.unet(torch.cat([z_in] * 2).to(models.unet.dtype), t, emb.to(models.unet.dtype)).sample
                u, c = pred.float().chunk(2)
                return u + p.guidance_scale * (c - u)

            z0 = _ancestral(scheduler, p.t, z_t, predict, ctx, tracked, desc="diffpure denoising")
            with torch.set_grad_enabled(tracked > 0 and torch.is_grad_enabled()):
                outs.append(models.decode(z0))
        return torch.cat(outs).to(images.device, images.dtype)

    def models(self, ctx: Context, side: int):
        """The purifying SD models: the backend's, or ``model`` loaded as an ``sd`` backend (a
        fresh bundle per call, as ``ctx.models()`` is)."""
        model = self.params.model
        if model == "backend":
            used = ctx.backend.describe() if ctx.backend is not None else "backend"
            models = ctx.models()
        else:
            backend = ctx.create("backends", "sd", {"model": model, "resolution": side})
            used, models = model, backend.load(ctx.device, ctx.dtype)
        ctx.info[self.name or type(self).__name__] = {"model": used}
        return models

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        with torch.no_grad():
            return self._run(images, ctx, 0)

    def differentiable_view(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.params.gradient == "bpda":
            return super().differentiable_view(images, ctx)
        with torch.enable_grad():
            return self._run(images, ctx, self.params.truncated_steps)


# ---------------------------------------------------------------------------------------
# Pixel-space models
# ---------------------------------------------------------------------------------------

#: guided-diffusion's unconditional ImageNet 256x256 model, the one GrIDPure (README, after
#: DiffPure) and DiffShortcut (README, ``defenses/gridpure.py``) load
PIXEL_MODEL = "imagenet-256-uncond"
#: a diffusers-native 256-px unconditional face model (an option: CelebA-HQ is one of the
#: protocol's datasets, so its faces may be the evaluated identities)
CELEBAHQ_MODEL = "google/ddpm-ema-celebahq-256"


def imagenet_checkpoint(name: str) -> str:
    """The ``pixel-diffusion`` role's ``imagenet-256-uncond``: where guided-diffusion's checkpoint is."""
    from . import _guided_diffusion as gd

    return str(gd.default_checkpoint())


def load_pixel_model(model: str, device: torch.device, dtype: torch.dtype, clip_denoised: bool = True,
                     ctx: Context | None = None):
    """An unconditional pixel model: (UNet2DModel, DDPMScheduler, description).

    ``model`` is a ``pixel-diffusion`` model (``benchbase ls models``; ``"auto"``: the backend's
    default). ``"imagenet-256-uncond"`` (default) or a path to a ``.pt`` file: guided-diffusion's
    ImageNet checkpoint (``$TORCH_HOME/hub/guided-diffusion/256x256_diffusion_uncond.pt`` by
    default), converted to diffusers (``_guided_diffusion.py``), learned-range variance.
    Otherwise a DDPMPipeline-style folder/hub id (model_index.json, unet/, scheduler/) or a bare
    UNet2DModel folder with its scheduler config, or what a plugin registers (the tiny world's
    random stand-ins ``tiny`` and ``tiny-adm``, the latter with guided-diffusion's architecture
    and learned variance)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from benchbase.plugins import find_model

    from . import _guided_diffusion as gd

    entry = find_model("pixel-diffusion", model, ctx)
    model = entry.load()(entry.name)  # a local folder or file, or a hub id
    if model.endswith(".pt"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"unavailable: guided-diffusion's ImageNet 256x256 unconditional model — put {gd.IMAGENET_FILE} "
                f"(openai/guided-diffusion release) at {path}, or pass its path as `model` "
                f"(`model = \"{CELEBAHQ_MODEL}\"` for the CelebA-HQ face model)")
        unet = gd.load(path)
        scheduler = gd.scheduler(clip_denoised)
        description = f"guided-diffusion 256x256_diffusion_uncond (ImageNet) from {path.name}"
    else:
        description = entry.name

        def load(path: str, local_only: bool):
            with quiet_diffusers():
                try:
                    pipe = DDPMPipeline.from_pretrained(path, local_files_only=local_only)
                    return pipe.unet, pipe.scheduler
                except (OSError, ValueError):
                    unet = UNet2DModel.from_pretrained(path, local_files_only=local_only)
                    return unet, DDPMScheduler.from_pretrained(path, local_files_only=local_only)

        unet, scheduler = load_pretrained(
            "unconditional pixel diffusion model", model, load,
            hint=" (`benchbase ls models` lists the registered ones)")
        # ancestral sampling as guided-diffusion's p_sample; clip_denoised clips the x0 estimate
        scheduler = DDPMScheduler.from_config(scheduler.config, clip_sample=clip_denoised)
    unet = unet.to(device, dtype).requires_grad_(False).eval()
    return unet, scheduler, description


def to_8bit(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """The 8-bit image a reference saves: ``truncate`` as torchvision's ``ToPILImage`` of a float
    tensor (``mul(255).byte()``), ``round`` as a PNG save of rounded values."""
    if rounding == "round":
        return quantize(x)
    return torch.floor(x.clamp(0, 1) * 255) / 255


def pixel_purify(unet, scheduler, x01: torch.Tensor, t: int, ctx: Context, tracked: int = 0,
                 ds_quirk: bool = False, respacing: int | None = None, skip_last: bool = False,
                 desc: str | None = None) -> torch.Tensor:
    """DiffPure on model-sized [0,1] images with ``t`` ancestral steps.

    GrIDPure's loop (``runners/diffpure_guided.py`` ``image_editing_sample``, default): noise to
    step index t − 1 and run the steps t − 1 … 0, the last one returning the mean.
    DiffShortcut's (``defenses/gridpure.py`` ``denoise``, ``skip_last``): noise to index t and run
    t … 1, stopping before the final step (the loop ``break``s at 0), so the output keeps the
    last step's noise. ``respacing`` (e.g. 250) runs on guided-diffusion's respaced schedule
    (``respace.py``): index i is the i-th kept timestep (250 of 1000: 10 → 40, 100 → 401).
    ``ds_quirk`` feeds [0,1] values to the [-1,1] model as DiffShortcut's code does."""
    if t <= 0:
        return x01
    from ._guided_diffusion import respaced_timesteps

    kept = respaced_timesteps(scheduler.config.num_train_timesteps, respacing) if respacing else None
    top = t if skip_last else t - 1
    timesteps = [kept[i] for i in range(top, -1, -1)] if kept else list(range(top, -1, -1))
    x = x01 if ds_quirk else x01 * 2 - 1
    noise = randn(x.shape, ctx, x.dtype)
    x_t = scheduler.add_noise(x, noise, torch.tensor([timesteps[0]], device=x.device))

    def predict(x_in, step):
        return unet(x_in.to(unet.dtype), step).sample.float()

    x0 = _ancestral(scheduler, timesteps, x_t, predict, ctx, tracked, desc=desc, run=t)
    return (x0 if ds_quirk else (x0 + 1) / 2).clamp(0, 1)


class _PixelPurifier(Purifier):
    model_roles: ClassVar[dict[str, str]] = {"model": "pixel-diffusion"}

    class Params(Params):
        model: str = PIXEL_MODEL
        t: int = Field(100, ge=0, le=1000)
        clip_denoised: bool = True
        ds_quirk: bool = False
        respacing: int | None = Field(None, ge=2, le=1000)
        batch_size: int = Field(8, ge=1)
        gradient: Literal["bpda", "truncated"] = "bpda"
        truncated_steps: int = Field(1, ge=1)

    #: DiffShortcut's loop (noise at t, steps t … 1); GrIDPure's otherwise
    skip_last = False
    _model = None
    _model_key = None

    def release(self) -> None:
        self._model = self._model_key = None

    def model(self, ctx: Context):
        key = (self.params.model, str(ctx.device), ctx.dtype, self.params.clip_denoised)
        if self._model_key != key:
            self._model = load_pixel_model(self.params.model, ctx.device, ctx.dtype, self.params.clip_denoised, ctx)
            self._model_key = key
        return self._model

    def model_side(self, ctx: Context) -> int:
        size = self.model(ctx)[0].config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def purify_patches(self, patches: torch.Tensor, ctx: Context, tracked: int) -> torch.Tensor:
        unet, scheduler, _ = self.model(ctx)
        p = self.params
        outs = []
        for start in range(0, len(patches), p.batch_size):
            outs.append(pixel_purify(unet, scheduler, patches[start:start + p.batch_size], p.t, ctx, tracked,
                                     p.ds_quirk, p.respacing, self.skip_last,
                                     desc=f"{self.name or 'diffpure'} denoising"))
        return torch.cat(outs)

    def _run(self, images: torch.Tensor, ctx: Context, tracked: int) -> torch.Tensor:
        raise NotImplementedError

    def _record(self, ctx: Context) -> None:
        ctx.info[self.name or type(self).__name__] = {"model": self.model(ctx)[2]}

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        with torch.no_grad():
            out = self._run(images.to(ctx.device), ctx, 0).to(images.device, images.dtype)
        self._record(ctx)
        return out

    def differentiable_view(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.params.gradient == "bpda":
            return super().differentiable_view(images, ctx)
        with torch.enable_grad():
            return self._run(images, ctx, self.params.truncated_steps)


class PixelDiffPure(_PixelPurifier):
    """``pixel-diffpure``: DiffPure (Nie et al., ICML'22) as GrIDPure's ``diffpure.py`` applies
    it to SD protections: resize to the model size (512 → 256, bilinear), forward-noise to
    t = 100 of 1000 (t* = 0.1), one ancestral pass with clipped x0, 8-bit (truncated, as
    ``ToPILImage``), PIL-bicubic back to the input size. Model: guided-diffusion's ImageNet
    256x256 unconditional checkpoint (``model``; the CelebA-HQ face DDPM is an option).
    """

    class Params(_PixelPurifier.Params):
        rounding: Literal["truncate", "round"] = "truncate"

    def _run(self, images: torch.Tensor, ctx: Context, tracked: int) -> torch.Tensor:
        h, w = images.shape[-2:]
        side = self.model_side(ctx)
        x = resize(images, side, mode="bilinear")
        y = self.purify_patches(x, ctx, tracked)
        q = to_8bit(y.detach(), self.params.rounding).to(y)
        y = straight_through(q, y) if tracked else q
        return resize(y, (h, w), mode="bicubic").clamp(0, 1)


def _positions(side: int, window: int) -> list[int]:
    pos = list(range(0, side - window + 1, max(1, window // 2)))
    if pos[-1] + window < side:
        pos.append(side - window)
    return pos


class GrIDPure(_PixelPurifier):
    """``gridpure``: GrIDPure (Zhao et al., CVPR'24), official README setting
    (ZhengyueZhao/GrIDPure ``gridpure.py``). Each iteration cuts model-sized windows at
    half-window stride (256 px at stride 128 on 512 px: 9 windows) plus one mosaic of the four
    half-window image corners, DiffPure-s each at t = 10 of 1000, averages overlaps (corners
    get the mosaic's extra vote), blends x ← (1-γ)·x_pure + γ·x_in with γ = 0.1 and saves 8
    bits (truncated: ``ToPILImage``); 20 iterations. Model: guided-diffusion's ImageNet 256x256
    unconditional checkpoint. Images smaller than the window are resized up to it and back.
    """

    class Params(_PixelPurifier.Params):
        t: int = Field(10, ge=0, le=1000)
        iterations: int = Field(20, ge=1)
        gamma: float = Field(0.1, ge=0, le=1)
        corner_mosaic: bool = True
        quantize_between: bool = True
        rounding: Literal["truncate", "round"] = "truncate"

    def _iteration(self, x: torch.Tensor, ctx: Context, tracked: int, window: int) -> torch.Tensor:
        n, c, side, _ = x.shape
        pos = _positions(side, window)
        boxes = [(i, j) for i in pos for j in pos]
        patches = [x[:, :, i:i + window, j:j + window] for i, j in boxes]
        half = window // 2
        mosaic = self.params.corner_mosaic and len(pos) > 1
        if mosaic:
            top = torch.cat([x[:, :, :half, :half], x[:, :, :half, side - half:]], dim=3)
            bottom = torch.cat([x[:, :, side - half:, :half], x[:, :, side - half:, side - half:]], dim=3)
            patches.append(torch.cat([top, bottom], dim=2))
        purified = self.purify_patches(torch.cat(patches), ctx, tracked).view(len(patches), n, c, window, window)
        total = torch.zeros_like(x)
        count = torch.zeros_like(x[:, :1])
        for k, (i, j) in enumerate(boxes):
            total = total + torch.nn.functional.pad(purified[k], (j, side - j - window, i, side - i - window))
            count[:, :, i:i + window, j:j + window] += 1
        if mosaic:
            m = purified[-1]
            corners = [((0, 0), m[..., :half, :half]), ((0, side - half), m[..., :half, half:]),
                       ((side - half, 0), m[..., half:, :half]), ((side - half, side - half), m[..., half:, half:])]
            for (i, j), piece in corners:
                total = total + torch.nn.functional.pad(piece, (j, side - j - half, i, side - i - half))
                count[:, :, i:i + half, j:j + half] += 1
        return total / count

    def _window_input(self, x: torch.Tensor, tracked: int) -> torch.Tensor:
        return x

    def _run(self, images: torch.Tensor, ctx: Context, tracked: int) -> torch.Tensor:
        p = self.params
        h, w = images.shape[-2:]
        window = self.model_side(ctx)
        side = max(h, window)
        x = resize(images, side, mode="bilinear")
        for _ in ctx.progress(range(p.iterations), desc=f"{self.name or 'gridpure'} iterations", leave=False):
            x_in = x
            x = (1 - p.gamma) * self._iteration(self._window_input(x, tracked), ctx, tracked, window) + p.gamma * x_in
            if p.quantize_between:  # the reference round-trips through an 8-bit PIL image
                q = to_8bit(x.detach(), p.rounding).to(x)
                x = straight_through(q, x) if tracked else q
        if not p.quantize_between:  # the 8-bit image saved at the end
            q = to_8bit(x.detach(), p.rounding).to(x)
            x = straight_through(q, x) if tracked else q
        return resize(x, (h, w), mode="bilinear").clamp(0, 1)


class GrIDPureDS(GrIDPure):
    """``gridpure-ds``: GrIDPure as DiffShortcut re-implemented it (liuyixin-louis/DiffShortcut
    ``diffshortcut/defenses/gridpure.py``, ``scripts/sub/defense/gridpure.sh``): the same
    ImageNet model on guided-diffusion's 250-step respaced schedule; 9 windows of 256 at
    stride 128, no corner mosaic; each window is cut from the running float image, saved to
    8 bits (``ToPILImage``, truncated) and fed to the model in [0, 1] (not [-1, 1]); noised
    to respaced step 10 (timestep 40 of 1000) and denoised by 10 steps 40 … 4 (the loop
    stops before the last step); windows averaged, x ← 0.9·x_pure + 0.1·x in float; 10
    iterations; 8 bits only at the end. ``pixel-diffpure-ds`` is the same at t = 100
    (timestep 401), γ = 0, one iteration (DiffShortcut ``defenses/pdiffp.py``: a grid too, not
    a 512 → 256 resize).
    """

    class Params(GrIDPure.Params):
        t: int = Field(10, ge=0, le=1000, description="index on the respaced schedule")
        iterations: int = Field(10, ge=1)
        corner_mosaic: bool = False
        quantize_between: bool = False
        ds_quirk: bool = True
        respacing: int | None = Field(250, ge=2, le=1000)

    skip_last = True

    def _window_input(self, x: torch.Tensor, tracked: int) -> torch.Tensor:
        q = to_8bit(x.detach(), "truncate").to(x)
        return straight_through(q, x) if tracked else q


class PixelDiffPureDS(GrIDPureDS):
    __doc__ = GrIDPureDS.__doc__

    class Params(GrIDPureDS.Params):
        t: int = Field(100, ge=0, le=1000, description="index on the respaced schedule")
        iterations: int = Field(1, ge=1)
        gamma: float = Field(0.0, ge=0, le=1)
