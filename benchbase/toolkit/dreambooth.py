"""DreamBooth with prior preservation (Ruiz et al., CVPR 2023), as one step loop that the
DreamBooth and LoRA personalizers and every surrogate-training attack (ASPL, FSMG, SimAC,
MetaCloak) run; the class images it needs, as a stage shared through the store; and sampling.

A step (``dreambooth_steps``): take instance images ``(s·k + j) mod N`` and class images
``(s·k + j) mod M`` (k = ``batch_size``), encode them to a VAE posterior sample, noise them
(one :func:`benchbase.toolkit.diffusion.denoise`), and descend
``L = mean MSE_instance + prior_loss_weight · mean MSE_class`` (+ a defense's extra term),
optionally clipping the gradient norm. The data index is deterministic, as Anti-DreamBooth's
``train_one_epoch`` and DiffShortcut's victim index their data, so equal seeds give equal weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchbase.components import Context, Prompts
from benchbase.images import load_pngs, save_pngs
from benchbase.seeds import SCHEME, generator, shared_seed
from benchbase.toolkit.diffusion import diffusion_loss

if TYPE_CHECKING:
    from benchbase.components import Defense
    from benchbase.models.sd import SDModels
    from benchbase.toolkit.trace import TrainingTrace


# ---------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------


def fused_kwargs(params: list) -> dict:
    """``fused=True`` for float32 CPU tensors: the same AdamW update in one kernel (on small
    models the per-tensor loop dominated a step: 33 → 8 ms for the mini world's 6 M parameters)."""
    tensors = [p for p in params if isinstance(p, torch.Tensor)]
    if tensors and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tensors):
        return {"fused": True}
    return {}


def adamw(params: list, lr: float, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2,
          eps: float = 1e-8) -> torch.optim.AdamW:
    """torch AdamW (the DreamBooth scripts' defaults), fused where that gives the same update faster."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **fused_kwargs(params))


# ---------------------------------------------------------------------------------------
# Class images (prior preservation)
# ---------------------------------------------------------------------------------------


def generate_images(
    models: "SDModels", prompt: str, n: int, steps: int, guidance: float, seed: "int | Sequence[int]",
    negative_prompt: str = "", batch_size: int = 4, pipe=None, progress=None,
) -> torch.Tensor:
    """``n`` images of ``prompt`` from the models' sampler, (n, 3, H, W) in [0, 1] on the CPU;
    image ``i`` is drawn with its own generator, seeded ``seed[i]`` (a list of ``n`` seeds: the
    stage's named sub-streams, ``ctx.seed_of(...)``) or ``seed + i`` (an int), so a result does
    not depend on the batch size."""
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"generate_images: {len(seeds)} seeds for {n} images")
    pipe = pipe or models.pipeline()
    out = []
    starts = range(0, n, batch_size)
    for start in (progress(starts, desc=f"generate {prompt[:30]!r}", leave=False) if progress else starts):
        count = min(batch_size, n - start)
        gens = [generator(s) for s in seeds[start:start + count]]
        with torch.no_grad():
            result = pipe(
                [prompt] * count, negative_prompt=[negative_prompt] * count if negative_prompt else None,
                num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                height=models.resolution, width=models.resolution, output_type="pt",
            )
        out.append(result.images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def class_images(ctx: Context, prompt: str, n: int, steps: int, guidance: float) -> torch.Tensor:
    """The base model's prior-preservation images of ``prompt``, generated once per (backend,
    prompt, count, sampler steps, guidance, resolution) and shared by every cell and component
    through the store (stage ``class_images``); (n, 3, H, W) in [0, 1] on the CPU.

    Shared on purpose by every identity and seed: they are the base model's sample of the class,
    not a property of a victim (the DreamBooth scripts generate the class-data folder once and
    reuse it for every subject). Image j is drawn on the shared stream ``("class_images", prompt,
    j)`` of ``benchbase.seeds.shared_seed``, never on a cell's stream: a cache hit equals a miss."""
    key = {"backend": ctx.backend.fingerprint(), "prompt": prompt, "n": n, "steps": steps,
           "guidance": guidance, "seeds": SCHEME, "resolution": ctx.backend.resolution}

    def compute(folder: Path) -> None:
        models = ctx.models()
        seeds = [shared_seed("class_images", prompt, j) for j in range(n)]
        images = generate_images(models, prompt, n, steps, guidance, seed=seeds, progress=ctx.progress)
        save_pngs(images, folder)

    return load_pngs(ctx.shared.get_or_compute("class_images", key, compute))


class ClassPrior:
    """The class images of the prior term, as the step loop consumes them.

    ``cache_latents=False``: the selected class images are encoded with the instance images in
    one VAE pass every step (the DreamBooth scripts). ``True``: their VAE posterior (mean, std) is
    encoded once and every step draws a fresh sample from it — the same distribution, one VAE
    forward less per step (the surrogate-training attacks' default).
    """

    def __init__(self, images: torch.Tensor, models: "SDModels | None" = None, cache_latents: bool = False):
        self.images = images
        self.models = models
        self.mean = self.std = None
        if cache_latents:
            if models is None:
                raise ValueError("ClassPrior(cache_latents=True) needs the models to encode with")
            with torch.no_grad():
                parts = [models.vae.encode(images[i:i + 8].to(models.device, models.vae.dtype) * 2 - 1).latent_dist
                         for i in range(0, len(images), 8)]
            self.mean = torch.cat([d.mean for d in parts])
            self.std = torch.cat([d.std for d in parts])

    @property
    def cached(self) -> bool:
        return self.mean is not None

    def __len__(self) -> int:
        return len(self.images)

    def select(self, idx: list[int]) -> torch.Tensor:
        """The class images at data indices ``idx`` (modulo the count)."""
        return self.images[[i % len(self) for i in idx]]

    def sample(self, idx: list[int], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of the class images at ``idx``: a fresh posterior sample (cached mode)."""
        if not self.cached:
            return self.models.encode_images(self.select(idx), sample=True, generator=generator)
        sel = [i % len(self) for i in idx]
        return self.models.sample_posterior(self.mean[sel], self.std[sel], generator)


class PosteriorCache:
    """VAE posteriors of the batches a step loop encodes more than once, keyed by the batch's data
    indices, for one constant image tensor (``images``) and one VAE.

    The loop encodes the same pixels with the same batch shape whenever its data index comes
    round again (DreamBooth: every ``lcm(N, M)`` images; ASPL's 3-step calls on the clean set_A:
    every call), so the posterior (mean, std) it gets is the same tensor; only the sample
    ``(mean + std·ε)·s`` is drawn afresh, from the same generator in the same order as
    :meth:`SDModels.encode_images` draws it. The latents, hence the run, are bit-identical to
    encoding every step, one VAE forward less per repeat. A cache belongs to the first image
    tensor it is used with; the loop uses it only for equal images (the same values, e.g. one
    data order re-indexed per call), and only when no defense transforms the batch. The VAE
    weights must not change while it is kept (MetaCloak casts them between its phases: its
    cache lives for the pool run only).
    """

    def __init__(self, images: torch.Tensor | None = None):
        self.images = images
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def bind(self, images: torch.Tensor) -> bool:
        """Whether this cache holds posteriors of ``images`` (binding it on first use)."""
        if self.images is None:
            self.images = images
        return self.images is images or (self.images.shape == images.shape and self.images.device == images.device
                                         and self.images.dtype == images.dtype and torch.equal(self.images, images))

    def sample(self, models: "SDModels", key: tuple, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        hit = self.entries.get(key)
        if hit is None:
            hit = self.entries[key] = models.posterior(pixels)
        return models.sample_posterior(*hit, generator)


def _period(k: int, n: int, m: int | None) -> int:
    """Steps after which the loop's batches repeat (instance index mod n, class index mod m)."""
    p = n // math.gcd(n, k)
    if m is not None:
        q = m // math.gcd(m, k)
        p = p * q // math.gcd(p, q)
    return p


# ---------------------------------------------------------------------------------------
# The step loop
# ---------------------------------------------------------------------------------------


def dreambooth_steps(
    models: "SDModels",
    trainable: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    steps: int,
    prompts: Prompts,
    generator: torch.Generator,
    *,
    unet: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    train_text_encoder: bool = False,
    prior: ClassPrior | None = None,
    prior_loss_weight: float = 1.0,
    batch_size: int = 1,
    max_grad_norm: float | None = None,
    offset: int = 0,
    autocast: torch.dtype | None = None,
    defense: "Defense | None" = None,
    ctx: Context | None = None,
    progress: Callable | None = None,
    desc: str = "dreambooth",
    trace: TrainingTrace | None = None,
    posteriors: PosteriorCache | bool = True,
) -> list[float]:
    """``steps`` DreamBooth steps on ``images`` ((N, 3, H, W) in [0, 1]) with the instance prompt,
    plus the prior term on ``prior``'s class images with the class prompt; returns each step's loss.

    ``trainable`` are the tensors ``optimizer`` updates (clipped to ``max_grad_norm`` when set);
    ``unet``/``text_encoder`` default to the models' own. With ``train_text_encoder`` the prompts
    are encoded with grad every step, else once. Step ``s`` uses data indices
    ``(offset + s)·batch_size + j``: a later call with ``offset`` continues an earlier one's data
    order (one long run split into chunks), a call with ``offset = 0`` restarts it (Anti-DreamBooth's
    ``train_one_epoch`` restarts at every call). ``autocast``: mixed precision on CUDA (bf16/fp16).
    ``defense``: its ``transform_batch`` sees each batch before encoding (keys ``instance_images``,
    ``instance_prompt``, ``step``, and ``class_images``, ``class_prompt`` with a prior) and its
    ``extra_loss`` is added to the loss. ``trace``: a :class:`~benchbase.toolkit.trace.TrainingTrace`
    that gets each step's instance loss (the mean MSE of the instance half, without the prior and
    defense terms; then ``trace.record(ctx.info)``). Random draws from ``generator``, per step: the
    VAE samples (instance, then class), the noise, the timesteps.

    ``posteriors``: ``True`` keeps, within this call, the VAE posterior of each batch that comes
    round again (a :class:`PosteriorCache`; the same latents as encoding it every step); a
    ``PosteriorCache`` of ``images`` is used and filled (it outlives the call: ASPL's calls on the
    constant set_A); ``False`` encodes every step. Either way only while no defense transforms
    the batch (``Defense.transform_batch`` not overridden).
    """
    unet = unet if unet is not None else models.unet
    text_encoder = text_encoder if text_encoder is not None else models.text_encoder
    k = batch_size
    # each prompt is encoded once and repeated per image: [instance × k, class × k]
    ids = models.tokenize([prompts.instance] + ([prompts.class_] if prior is not None else []))
    fixed_cond = None
    if not train_text_encoder:  # a frozen text encoder gives the same embedding every step
        with torch.no_grad():
            fixed_cond = text_encoder(ids)[0].repeat_interleave(k, dim=0)
    use_autocast = autocast is not None and models.device.type == "cuda"
    unet.train()
    text_encoder.train(train_text_encoder)
    n = len(images)
    from benchbase.components import Defense

    cache: PosteriorCache | None = None
    if defense is None or type(defense).transform_batch is Defense.transform_batch:
        if isinstance(posteriors, PosteriorCache):
            cache = posteriors if posteriors.bind(images) else None
        elif posteriors and _period(k, n, len(prior) if prior is not None and not prior.cached else None) < steps:
            cache = PosteriorCache(images)
    losses: list[float] = []

    def encode(pixels: torch.Tensor, key: tuple) -> torch.Tensor:
        if cache is None:
            return models.encode_images(pixels, sample=True, generator=generator)
        return cache.sample(models, key, pixels, generator)

    it: Iterable[int] = range(steps)
    if progress is not None:
        it = progress(it, desc=desc, leave=False)
    for step in it:
        idx = [(offset + step) * k + j for j in range(k)]
        batch = {"instance_images": images[[i % n for i in idx]].to(models.device),
                 "instance_prompt": prompts.instance, "step": offset + step}
        if prior is not None:
            batch["class_images"] = picked = prior.select(idx)
            batch["class_prompt"] = prompts.class_
        if defense is not None:
            batch = defense.transform_batch(batch, ctx)
        with torch.no_grad():
            inst = tuple(i % n for i in idx)  # the cache key: which images make the batch
            if prior is None:
                latents = encode(batch["instance_images"], (inst,))
            elif prior.cached and batch["class_images"] is picked:
                latents = torch.cat([encode(batch["instance_images"], (inst,)), prior.sample(idx, generator)])
            else:  # one VAE pass over instance and class images (a defense may have changed them)
                pixels = torch.cat([batch["instance_images"], batch["class_images"].to(models.device)])
                latents = encode(pixels, (inst, tuple(i % len(prior) for i in idx)))
        with torch.enable_grad():  # also when the caller runs under no_grad
            with torch.autocast(models.device.type, dtype=autocast or torch.bfloat16, enabled=use_autocast):
                cond = fixed_cond if fixed_cond is not None else text_encoder(ids)[0].repeat_interleave(k, dim=0)
                per_image = diffusion_loss(models, latents, cond, generator, unet=unet, reduction="none")
            loss = per_image[:k].mean()
            if prior is not None:
                loss = loss + prior_loss_weight * per_image[k:].mean()
            if defense is not None:
                extra = defense.extra_loss(batch, {"loss": loss, "per_image": per_image}, ctx)
                if extra is not None:
                    loss = loss + extra
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if trace is not None:
            trace.add(float(per_image[:k].detach().mean()))
    unet.eval()
    text_encoder.eval()
    return losses
