"""The surrogate-training helper shared by the attacks that fine-tune a model while they
perturb (ASPL, FSMG, SimAC, MetaCloak, CAAT): a trainable view of the models (full, LoRA or
cross-attention K/V), optimizer reset-or-keep, and save/restore of the trainable state (a state
dict of the trainable tensors, never a deep copy of the modules). The DreamBooth steps, LoRA,
class images and noising come from ``benchbase.toolkit``, the same code the victims run.

All images are [0, 1] at the boundary; every random draw uses the generator handed in (the
stage's ``ctx.generator``, or for a shared stage a generator on its ``benchbase.seeds.shared_seed``
stream, so that a cache hit and a cache miss leave the cell's random stream identical).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field

from benchbase.components import Attack, Context, Prompts
from benchbase.images import load_image, to_uint8
from benchbase.models.sd import SDModels
from benchbase.toolkit import (
    ClassPrior,
    PosteriorCache,
    adamw,
    add_lora,
    class_images,
    dreambooth_steps,
    lora_parameters,
)

from ._precision import Precision

# ---------------------------------------------------------------------------------------
# Parameters every surrogate-training attack shares (official Anti-DreamBooth values)
# ---------------------------------------------------------------------------------------


class SurrogateParams(Attack.Params):
    """DreamBooth surrogate recipe of Anti-DreamBooth's ``train_one_epoch`` (``attacks/aspl.py``)
    plus the memory options of this suite."""

    learning_rate: float = Field(5e-7, gt=0)
    train_text_encoder: bool = True
    with_prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(200, ge=1)
    class_inference_steps: int = Field(50, ge=1)  # the base model's default sampler call
    class_guidance_scale: float = Field(7.5, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    #: the released ASPL loop writes clip_grad_norm_(…, 1.0) on a consumed iterator, i.e. no clipping
    max_grad_norm: float | None = Field(None, gt=0)
    #: weights of the surrogate (see ``_precision``): "release" = what the method's release does
    #: (pure bf16 for ASPL/SimAC/MetaCloak, whose lr-5e-7 updates then round away; fp32 for FSMG),
    #: "fp32" = a real fp32 fine-tune (a different attack), "bf16", "context" = the run's dtype
    precision: Precision = "release"
    # --- memory / speed options (none changes the algorithm) ---
    gradient_checkpointing: bool = False
    #: encode the class images' VAE posterior once and draw a fresh sample each step (same
    #: distribution as encoding every step, one VAE forward less per step)
    cache_class_latents: bool = True
    #: keep the saved surrogate state (θ while θ' trains) on the CPU instead of the device
    offload_state: bool = False
    #: 0 = full fine-tuning (official); r > 0 = LoRA of rank r on the UNet attention projections
    #: (Anti-DB ``aspl_lora.py`` uses 4), for cards below 40 GB
    lora_rank: int = Field(0, ge=0)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def load_models(ctx: Context, precision: str = "context", backend=None) -> SDModels:
    """A fresh model bundle in the requested precision (frozen; the Surrogate unfreezes)."""
    models = (backend.load(ctx.device, ctx.dtype) if backend is not None else ctx.models())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    if dtype is not None and dtype != models.dtype:
        for module in (models.unet, models.vae, models.text_encoder):
            module.to(dtype)
        models.dtype = dtype
    return models


class Surrogate:
    """A trainable view of an ``SDModels`` bundle.

    ``trainable``: ``"full"`` (UNet, + text encoder when ``train_text_encoder``), ``"lora"``
    (LoRA adapters on the UNet attention, + text encoder when asked), or ``"crossattn_kv"``
    (only the cross-attention key/value projections, CAAT / Custom Diffusion).
    """

    def __init__(self, models: SDModels, trainable: Literal["full", "lora", "crossattn_kv"] = "full",
                 train_text_encoder: bool = True, lora_rank: int = 4, gradient_checkpointing: bool = False,
                 generator: torch.Generator | None = None):
        self.models = models
        self.unet, self.text_encoder = models.unet, models.text_encoder
        self.train_text_encoder = train_text_encoder and trainable != "crossattn_kv"
        if trainable == "lora":  # peft's default init (Kaiming A, B = 0), seeded from the generator
            add_lora(self.unet, lora_rank, init="kaiming", generator=generator)
        self.named = self._select(trainable)
        self.params = [p for _, p in self.named]
        self._reset: tuple[dict, torch.optim.Optimizer] | None = None  # see fresh_optimizer
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.set_trainable(True)

    def _select(self, trainable: str) -> list[tuple[str, torch.nn.Parameter]]:
        named = []
        lora_names = {n for n, _ in lora_parameters(self.unet)}
        for name, p in self.unet.named_parameters():
            if trainable == "full":
                keep = True
            elif trainable == "lora":
                keep = name in lora_names
            else:  # crossattn_kv: attn2 is the cross-attention of every diffusers transformer block
                keep = ".attn2.to_k." in name or ".attn2.to_v." in name
            if keep:
                named.append((f"unet.{name}", p))
        if self.train_text_encoder:
            named += [(f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters()]
        if not named:
            raise ValueError(f"surrogate: no trainable parameters for trainable={trainable!r}")
        return named

    # -- state ---------------------------------------------------------------------------

    def state(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """A copy of the trainable tensors only (θ), for a later ``load_state``."""
        return {n: p.detach().to(device or p.device, copy=True) for n, p in self.named}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(state[n])

    def set_trainable(self, flag: bool) -> None:
        """Freeze the surrogate for PGD (no weight-gradient buffers) or unfreeze it for training."""
        for p in self.params:
            p.requires_grad_(flag)

    @contextmanager
    def frozen(self):
        self.set_trainable(False)
        try:
            yield self
        finally:
            self.set_trainable(True)

    @staticmethod
    def _adam_kwargs(p: SurrogateParams | None, lr: float | None) -> dict:
        kw = dict(lr=5e-7, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        if p is not None:
            kw = dict(lr=p.learning_rate, betas=(p.adam_beta1, p.adam_beta2),
                      weight_decay=p.adam_weight_decay, eps=p.adam_epsilon)
        if lr is not None:
            kw["lr"] = lr
        return kw

    def optimizer(self, p: SurrogateParams | None = None, lr: float | None = None) -> torch.optim.Optimizer:
        """A new AdamW over the trainable tensors (Anti-DB defaults), its own state."""
        return adamw(self.params, **self._adam_kwargs(p, lr))

    def fresh_optimizer(self, p: SurrogateParams | None = None, lr: float | None = None) -> torch.optim.Optimizer:
        """The AdamW of a call that starts afresh (Anti-DB's ``train_one_epoch`` makes a new one per
        call): one optimizer per surrogate whose state is zeroed in place (moments and step
        counts), which is what a new AdamW starts from — the same update, bit for bit, without
        allocating and filling the moment buffers twice per ASPL iteration. Tensors that got no
        gradient keep no state in either (AdamW creates it on a tensor's first gradient)."""
        kw = self._adam_kwargs(p, lr)
        if self._reset is None or self._reset[0] != kw:
            self._reset = (kw, adamw(self.params, **kw))
            return self._reset[1]
        opt = self._reset[1]
        state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        if state:
            with torch.no_grad():
                torch._foreach_zero_(state)
        return opt

    # -- conditioning ----------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad and self.train_text_encoder):
            return self.models.encode_prompt(prompts, self.text_encoder)

    # -- DreamBooth training ------------------------------------------------------------------

    def train_steps(
        self,
        images: torch.Tensor,
        steps: int,
        prompts: Prompts,
        generator: torch.Generator,
        optimizer: torch.optim.Optimizer | None = None,
        p: SurrogateParams | None = None,
        class_latents: ClassPrior | None = None,
        batch_size: int = 1,
        max_grad_norm: float | None = None,
        prior_loss_weight: float = 1.0,
        progress: Callable | None = None,
        offset: int = 0,
        posteriors: PosteriorCache | bool = True,
    ) -> list[float]:
        """``steps`` DreamBooth steps on ``images`` (instance prompt) plus, when ``class_latents``
        is given, the prior term on class images (class prompt): loss = MSE_inst + w·MSE_prior
        (``benchbase.toolkit.dreambooth_steps``, the loop the DreamBooth victim runs).

        Step ``s`` takes instance images ``(s·b + j) mod N`` and class images ``(s·b + j) mod M``
        with ``s`` restarting at 0 in every call, exactly as Anti-DB's ``train_one_epoch`` indexes
        its dataset (so a 3-step call sees instance images 0, 1, 2 only). A fresh AdamW
        (``fresh_optimizer``) when ``optimizer`` is None (ASPL/SimAC/MetaCloak reset it every
        call); pass one to keep its state across calls. ``offset`` continues the data index of an earlier call (one long
        run split into chunks, e.g. MetaCloak's model pool). ``posteriors``: see
        ``dreambooth_steps`` (a ``PosteriorCache`` kept across calls on the same clean images).
        """
        return dreambooth_steps(
            self.models, self.params, optimizer or self.fresh_optimizer(p), images, steps, prompts, generator,
            unet=self.unet, text_encoder=self.text_encoder, train_text_encoder=self.train_text_encoder,
            prior=class_latents, prior_loss_weight=prior_loss_weight, batch_size=batch_size,
            max_grad_norm=max_grad_norm, offset=offset, progress=progress, desc="surrogate",
            posteriors=posteriors)


# ---------------------------------------------------------------------------------------
# Class images (prior preservation)
# ---------------------------------------------------------------------------------------


def class_latents(ctx: Context, models: SDModels, p: SurrogateParams, prompts: Prompts,
                  needed: int | None = None) -> ClassPrior | None:
    """The prior-preservation class images of the base model (the same shared stage the
    DreamBooth victim uses, so they are generated once per model), as a ``ClassPrior``.
    ``needed`` trims to the images the loop can ever index (ASPL's 3-step calls use 3)."""
    if not p.with_prior_preservation:
        return None
    images = class_images(ctx, prompts.class_, p.num_class_images, p.class_inference_steps, p.class_guidance_scale)
    if needed is not None:
        images = images[: max(1, min(len(images), needed))]
    return ClassPrior(images, models, cache_latents=p.cache_class_latents)


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def ddpm_prev_sample(models: SDModels, out: dict, generator: torch.Generator) -> torch.Tensor:
    """x_{t-1} of a DDPM step per image (what ``DDPMScheduler.step`` does, vectorised over t,
    with gradient): posterior mean from the predicted x_0 plus σ_t·z for t > 0."""
    sched = models.noise_scheduler
    t = out["t"]
    ac = sched.alphas_cumprod.to(out["noisy"].device, torch.float32)
    a_t = ac[t].view(-1, 1, 1, 1)
    a_prev = torch.where(t > 0, ac[(t - 1).clamp(min=0)], torch.ones_like(ac[t])).view(-1, 1, 1, 1)
    beta_t = 1 - a_t / a_prev
    z_t = out["noisy"].float()
    if models.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * z_t - (1 - a_t).sqrt() * out["pred"]
    else:
        x0 = (z_t - (1 - a_t).sqrt() * out["pred"]) / a_t.sqrt()
    mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + ((1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)) * z_t
    var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
    z = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean + (t > 0).view(-1, 1, 1, 1).float() * var.sqrt() * z


def target_latents(models: SDModels, path: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """T-ASPL / T-FSMG target: the image resized to the run resolution, VAE posterior sample ×s."""
    img = load_image(path, models.resolution)[None]
    with torch.no_grad():
        z = models.encode_images(img, sample=True, generator=generator)
    return z.expand(n, -1, -1, -1).contiguous()


def targeted_term(models: SDModels, out: dict, z_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MSE(DDPM step of the prediction, q(z_target, ε, t−1)): what T-ASPL subtracts from L_DM.
    (t = 0 uses t−1 := 0; the released code indexes ᾱ[−1] there.)"""
    prev = ddpm_prev_sample(models, out, generator)
    t_prev = (out["t"] - 1).clamp(min=0)
    goal = models.noise_scheduler.add_noise(z_target.float(), out["noise"].float(), t_prev)
    return (prev - goal).pow(2).mean()


# ---------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------


def images_digest(images: torch.Tensor) -> str:
    """A hash of a batch's 8-bit bytes (part of shared-stage keys)."""
    return hashlib.sha256(to_uint8(images).tobytes()).hexdigest()[:16]


