"""FSMG (Fully-trained Surrogate Model Guidance, Anti-DreamBooth, Le et al., ICCV 2023):
VinAIResearch/Anti-DreamBooth ``train_dreambooth.py`` + ``attacks/fsmg.py``, ``scripts/attack_with_fsmg.sh``."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from benchbase.components import Attack, Context
from benchbase.seeds import SCHEME, generator, shared_seed
from benchbase.toolkit import ObjectiveTrace, denoise, pgd, threat_view

from ._precision import weights_precision
from ._surrogate import (
    Surrogate,
    SurrogateParams,
    class_latents,
    images_digest,
    load_models,
    target_latents,
    targeted_term,
)

STATE_FILE = "surrogate.safetensors"


class FSMG(Attack):
    """Anti-DreamBooth FSMG: PGD against a DreamBooth model fully trained on clean set_A.

    Stage 1 (a shared cached stage, computed once per backend × set_A × recipe): DreamBooth on
    clean set_A with Anti-DB's ``train_dreambooth.py`` recipe — 1000 steps, 2 instance + 2 class
    images per step, lr 5e-7, AdamW kept for the whole run, prior weight 1.0, text encoder
    trained, grad clip 1.0. Stage 2: 100 PGD ascent steps of ``L_DM(x_B; θ*, "a photo of sks
    person")`` on set_B, α 0.6375 levels, ε 6.375 levels (0.005 / 0.05 in [−1,1]); the surrogate
    is never updated. ``target_image`` gives T-FSMG (same targeted term as T-ASPL).

    ``precision = "release"`` (default) is fp32 weights: ``train_dreambooth.py`` refuses
    non-fp32 trainable weights and trains them under ``--mixed_precision=bf16`` autocast (fp32
    master weights, so lr 5e-7 updates do apply), and ``attacks/fsmg.py`` is launched without
    ``--mixed_precision``. The bf16 autocast of the release's compute is not reproduced.
    """

    class Params(SurrogateParams):
        eps: float = Field(6.375, ge=0)
        max_adv_train_steps: int = Field(100, ge=0)
        pgd_alpha: float = Field(0.6375, ge=0)
        surrogate_train_steps: int = Field(1000, ge=0)
        surrogate_batch_size: int = Field(2, ge=1)
        max_grad_norm: float | None = Field(1.0, gt=0)  # train_dreambooth.py clips (unlike ASPL's inner loop)
        surrogate_seed: int = Field(0, ge=0)
        target_image: str | None = None

    supports_adaptive = True
    release_precision: ClassVar[str] = "fp32"

    def _precision(self) -> str:
        return weights_precision(self.params.precision, self.release_precision)

    def _recipe(self) -> dict:
        p = self.params
        keys = ("learning_rate", "train_text_encoder", "with_prior_preservation", "prior_loss_weight",
                "num_class_images", "class_inference_steps", "class_guidance_scale", "adam_beta1",
                "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "precision",
                "lora_rank", "surrogate_train_steps", "surrogate_batch_size", "surrogate_seed")
        recipe = {k: getattr(p, k) for k in keys}
        recipe["precision"] = self._precision()  # "release" and "fp32" train the same θ*
        return recipe

    def surrogate_folder(self, ctx: Context, prompts) -> Path:  # noqa: F821
        """The shared stage holding θ* (trained once; later cells load it)."""
        p = self.params
        set_A = ctx.identity.set_A
        key = {"backend": ctx.backend.fingerprint(), "set_A": images_digest(set_A), "recipe": self._recipe(),
               "instance": prompts.instance, "class": prompts.class_, "seeds": SCHEME}
        if p.lora_rank:  # peft names the adapter tensors differently from the earlier hand-written LoRA
            key["lora"] = "peft"

        def compute(folder):
            from safetensors.torch import save_file

            # shared on purpose by every seed of the identity (FSMG trains θ* once on set_A and
            # perturbs set_B with it), so it draws on a shared stream named by what it is (the
            # identity's set_A, the surrogate seed), never the cell's: a cache hit and a miss must
            # leave ctx.generator's stream equal
            gen = generator(shared_seed("fsmg-surrogate", key["set_A"], p.surrogate_seed))
            models = load_models(ctx, self._precision())
            s = Surrogate(models, "lora" if p.lora_rank else "full", p.train_text_encoder, p.lora_rank or 4,
                          p.gradient_checkpointing, generator=gen)
            cl = class_latents(ctx, models, p, prompts)
            losses = s.train_steps(set_A.to(ctx.device), p.surrogate_train_steps, prompts, gen, p=p,
                                   class_latents=cl, batch_size=p.surrogate_batch_size,
                                   max_grad_norm=p.max_grad_norm, prior_loss_weight=p.prior_loss_weight,
                                   progress=ctx.progress)
            save_file({k: v.contiguous().cpu() for k, v in s.state().items()}, str(folder / STATE_FILE))
            (folder / "losses.txt").write_text("\n".join(f"{v:.6f}" for v in losses))

        return ctx.shared.get_or_compute("fsmg_surrogate", key, compute)

    def load_surrogate(self, ctx: Context, prompts) -> Surrogate:
        from safetensors.torch import load_file

        p = self.params
        folder = self.surrogate_folder(ctx, prompts)
        models = load_models(ctx, self._precision())
        # the LoRA init is overwritten by the load; a shared stream keeps ctx.generator's untouched
        gen = generator(shared_seed("fsmg-lora-init", p.surrogate_seed))
        s = Surrogate(models, "lora" if p.lora_rank else "full", p.train_text_encoder, p.lora_rank or 4,
                      p.gradient_checkpointing, generator=gen)
        s.load_state({k: v.to(ctx.device) for k, v in load_file(str(folder / STATE_FILE)).items()})
        return s

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        purify, prompts = threat_view(ctx)
        s = self.load_surrogate(ctx, prompts)
        models = s.models
        x0 = images.to(ctx.device, torch.float32)
        target = target_latents(models, p.target_image, len(x0), ctx.generator) if p.target_image else None
        s.set_trainable(False)
        cond = s.encode_prompts([prompts.instance] * len(x0))
        view = purify or (lambda v: v)

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            z = models.encode_images(view(x), sample=True, generator=ctx.generator)
            out = denoise(models, s.unet, z, cond, ctx.generator)
            loss = (out["pred"] - out["target"]).pow(2).mean()
            if target is not None:
                loss = loss - targeted_term(models, out, target, ctx.generator)
            return loss

        trace = ObjectiveTrace("denoising loss L_DM of the clean-trained surrogate θ* on the protected set_B"
                               + (" minus the targeted term" if target is not None else ""), maximize=True)
        x, losses = pgd(x0, loss_fn, p.eps, p.pgd_alpha, p.max_adv_train_steps, progress=ctx.progress, trace=trace)
        trace.record(ctx.info)
        ctx.info.update(fsmg_pgd_loss_first=losses[0] if losses else None,
                        fsmg_pgd_loss_last=losses[-1] if losses else None,
                        targeted=target is not None, adaptive=ctx.threat is not None)
        return x.cpu()
