"""MetaCloak (Liu et al., CVPR 2024): a model pool of DreamBooth training states, a meta loop
that alternates PGD and short surrogate training on each state, and expectation over
transformations (Gaussian blur k = 7 + horizontal flip). Released code: liuyixin-louis/MetaCloak
``robust_facecloak/attacks/algs/metacloak.py``, ``robust_facecloak/attacks/worker/robust_pgd_worker.py``,
``robust_facecloak/model/db_train.py``, ``script/sub/gen/metacloak.sh``, ``script/methods_config.sh``."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from benchbase.components import Attack, Context
from benchbase.toolkit import ObjectiveTrace, PosteriorCache, denoise, pgd, random_start, threat_view

from ._precision import DTYPES, cast_for, weights_precision
from ._surrogate import (
    Surrogate,
    SurrogateParams,
    class_latents,
    load_models,
)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision ``GaussianBlur`` semantics)."""
    half = (kernel_size - 1) * 0.5
    r = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class BlurFlip:
    """MetaCloak's ``gau`` EOT transform: GaussianBlur(7, σ ~ U[0.1, 2.0]) then RandomHorizontalFlip(0.5),
    one draw per call for the whole batch (as torchvision transforms on a batch tensor)."""

    def __init__(self, generator: torch.Generator, kernel_size: int = 7, sigma: tuple[float, float] = (0.1, 2.0),
                 flip_p: float = 0.5):
        self.generator, self.kernel_size, self.sigma, self.flip_p = generator, kernel_size, sigma, flip_p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * float(torch.rand((), generator=self.generator))
        y = gaussian_blur(x, self.kernel_size, sigma)
        if float(torch.rand((), generator=self.generator)) < self.flip_p:
            y = y.flip(-1)
        return y


class MetaCloak(Attack):
    """MetaCloak (Liu et al., CVPR'24), release configuration on SD-2.1-base.

    1. Model pool: DreamBooth on the clean set_B for ``pool_train_steps`` = 1000 steps (1 + 1
       images, lr 5e-7, prior weight 1.0, text encoder trained, one AdamW); the trainable state
       is saved at the *start* of steps {0, 199, 399, 599, 799, 999} (``train_few_step``:
       ``step == 0 or (step + 1) % interval == 0``, before that step's update) → 6 states, the
       first being the base model itself, the others after 199, 399, … updates (on the CPU).
    2. Meta loop, ``total_trial_num`` = 4 times over the pool: load each state, then
       ``pool_interval / advance_steps`` = 100 times: 6 sign-ascent steps of 1.1 levels on
       ``L_DM(T(x))`` (T = blur k 7 + flip, one draw per step), projected to x0 ± 11 levels,
       then ``advance_steps`` = 2 DreamBooth steps on the perturbed images (fresh AdamW).
    Budget 11 levels (r = 11 on [0,255]). The inner REM attacker of the code is disabled in the
    release scripts (``--attack_pgd_radius=0``) and is not implemented. The official saves by
    truncation; the suite default is rounding (``quantization = "truncate"`` for the
    code-faithful file).

    As released, by default:

    - **data order**: ``DreamBoothDatasetFromTensor`` (``model/db_train.py``, ``shuffle=True``)
      permutes the instance images when it is built, i.e. once for the pool's 1000-step run and
      afresh in every 2-step meta-training call, so every set_B image is trained on; the
      permutations come from ``ctx.generator``. Class images are taken in order from index 0 in
      every call (the dataset indexes them by step), as released.
    - **precision** (``precision = "release"``): training in pure bf16 weights
      (``train_few_step``: ``weight_dtype = torch.bfloat16``), PGD with the modules cast to fp16
      (``robust_pgd_worker.py`` ``perturb`` with the script's ``--mixed_precision=fp16``) and
      back, every round — fp16 runs on CPU too (slowly). The release also keeps the PGD iterate
      itself in fp16 on the [0, 255] scale; that is not reproduced (x stays fp32).
    - **unscaled instance images** (``paper_quirks = true``): the pool and meta training steps
      feed the *instance* images to the VAE in [0, 255] (``load_data`` returns 0..255 floats and
      the dataset does not normalise tensors), the class images in [−1, 1]. The PGD itself sees
      [−1, 1] (its transform ends with ``Normalize(127.5, 127.5)``). On by default because the
      README calls this code the official implementation, ``script/gen_and_eval.sh`` is the one
      generation path it documents, and nothing on that path scales the instance images: the
      published numbers were, as far as the release shows, made with the quirk.
      ``paper_quirks = false`` trains on [−1, 1] instance images, as the paper describes DreamBooth.
    """

    class Params(SurrogateParams):
        eps: float = Field(11.0, ge=0)
        pgd_alpha: float = Field(1.1, ge=0)  # r / 10
        defense_pgd_step_num: int = Field(6, ge=0)
        total_trial_num: int = Field(4, ge=1)
        pool_train_steps: int = Field(1000, ge=1)
        pool_interval: int = Field(200, ge=1)
        advance_steps: int = Field(2, ge=1)
        eot_samples: int = Field(1, ge=1)  # defense_sample_num
        blur_kernel_size: int = Field(7, ge=1)
        #: metacloak.sh does not pass --defense_pgd_random_start
        random_start: bool = False
        #: the release's quirks: instance images in [0, 255] into the VAE in the training steps
        paper_quirks: bool = True

        @field_validator("blur_kernel_size")
        @classmethod
        def _odd(cls, v: int) -> int:
            if v % 2 == 0:
                raise ValueError("must be odd (torchvision's gaussian_blur needs a centre pixel)")
            return v

    supports_adaptive = True
    #: training weights of the release (its PGD casts them to fp16: see ``_dtypes``)
    release_precision: ClassVar[str] = "bf16"

    def _save_points(self) -> list[int]:
        """Steps at whose start ``train_few_step(step_wise_save=True)`` saves the state:
        ``step == 0 or (step + 1) % interval == 0`` (the state then has ``step`` updates)."""
        p = self.params
        return [s for s in range(p.pool_train_steps) if s == 0 or (s + 1) % p.pool_interval == 0]

    def _dtypes(self) -> tuple[str, torch.dtype | None]:
        """(training precision for ``load_models``, PGD dtype or None = the training dtype)."""
        p = self.params
        train = weights_precision(p.precision, self.release_precision)
        return train, (DTYPES["fp16"] if p.precision == "release" else None)

    def _instance_view(self, x: torch.Tensor) -> torch.Tensor:
        """What the training steps encode: with ``paper_quirks`` a [0,1] batch whose VAE input
        (``encode_images`` computes 2x − 1) is the release's 0..255 pixel values."""
        return (x * 255 + 1) / 2 if self.params.paper_quirks else x

    def _train(self, s: Surrogate, images: torch.Tensor, steps: int, prompts, ctx: Context, cl, *,
               optimizer=None, offset: int = 0, order: torch.Tensor | None = None,
               posteriors: PosteriorCache | bool = True) -> torch.Tensor:
        """DreamBooth steps on ``images`` in the release's order: a fresh permutation of the
        instance images per dataset (pass ``order`` to continue one dataset across chunks).
        Returns the permutation used."""
        p = self.params
        if order is None:
            order = torch.randperm(len(images), generator=ctx.generator)
        s.train_steps(self._instance_view(images[order.to(images.device)]), steps, prompts, ctx.generator,
                      optimizer=optimizer, p=p, class_latents=cl, max_grad_norm=p.max_grad_norm,
                      prior_loss_weight=p.prior_loss_weight, offset=offset, posteriors=posteriors)
        return order

    def model_pool(self, s: Surrogate, x0: torch.Tensor, prompts, ctx: Context, cl) -> list[dict]:
        """One long DreamBooth run on the clean set_B (one optimizer, one data order), the state
        kept at the start of every save point (``metacloak.py`` ``train_few_step``)."""
        pool, done, order = [], 0, None
        optimizer = s.optimizer(self.params)
        # the clean images' posteriors, kept across the run's chunks (before any fp16 cast of the VAE)
        posteriors = PosteriorCache()
        for point in self._save_points():
            if point > done:
                order = self._train(s, x0, point - done, prompts, ctx, cl, optimizer=optimizer,
                                    offset=done, order=order, posteriors=posteriors)
                done = point
            pool.append(s.state("cpu"))
        return pool

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        purify, prompts = threat_view(ctx)
        x0 = images.to(ctx.device, torch.float32)
        train_precision, pgd_dtype = self._dtypes()
        models = load_models(ctx, train_precision)
        s = Surrogate(models, "lora" if p.lora_rank else "full", p.train_text_encoder, p.lora_rank or 4,
                      p.gradient_checkpointing, generator=ctx.generator)
        cl = class_latents(ctx, models, p, prompts)

        # 1. model pool
        pool = self.model_pool(s, x0, prompts, ctx, cl)

        # 2. meta loop
        eot = BlurFlip(ctx.generator, p.blur_kernel_size)
        transform = eot if purify is None else (lambda v: eot(purify(v)))
        x = x0.clone()
        if p.random_start:
            x = random_start(x0, p.eps / 255, ctx.generator)
        rounds = max(1, p.pool_interval // p.advance_steps)
        first = last = None
        trace = ObjectiveTrace(
            "surrogate denoising loss L_DM of the protected set_B under blur + flip (EOT)", maximize=True,
            per=f"round (a PGD phase on a pool state, then training): the mean loss of its "
                f"{p.defense_pgd_step_num} PGD steps")
        outer = ctx.progress(range(p.total_trial_num * len(pool)), desc="metacloak", leave=False)
        for k in outer:
            s.load_state({n: v.to(ctx.device) for n, v in pool[k % len(pool)].items()})
            for _ in range(rounds):
                with cast_for(models, pgd_dtype), s.frozen():
                    cond = s.encode_prompts([prompts.instance] * len(x0))
                    x, losses = pgd(x0, lambda v, c=cond: self._loss(s, v, c, ctx), p.eps, p.pgd_alpha,
                                    p.defense_pgd_step_num, start=x, transform=transform, eot_samples=p.eot_samples)
                if losses:
                    first = losses[0] if first is None else first
                    last = losses[-1]
                    trace.add(sum(losses) / len(losses))
                train_on = x if purify is None else purify(x).detach()
                self._train(s, train_on, p.advance_steps, prompts, ctx, cl)
        trace.record(ctx.info)
        ctx.info.update(metacloak_pool_states=len(pool), metacloak_pgd_loss_first=first,
                        metacloak_pgd_loss_last=last, adaptive=ctx.threat is not None,
                        surrogate_dtype=str(models.dtype).removeprefix("torch."),
                        pgd_dtype=str(pgd_dtype or models.dtype).removeprefix("torch."))
        return x.detach().cpu()

    @staticmethod
    def _loss(s: Surrogate, x: torch.Tensor, cond: torch.Tensor, ctx: Context) -> torch.Tensor:
        models = s.models
        z = models.encode_images(x, sample=True, generator=ctx.generator)
        out = denoise(models, s.unet, z, cond, ctx.generator)
        return (out["pred"] - out["target"]).pow(2).mean()
