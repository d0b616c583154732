"""DreamBooth with prior preservation (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion
Models for Subject-Driven Generation", CVPR 2023; diffusers ``examples/dreambooth/train_dreambooth.py``):
the victim of every protection. The step loop is ``benchbase.toolkit.dreambooth_steps``.

Defaults follow the DiffShortcut/MetaCloak victim recipe on SD-2.1-base: UNet + text
encoder trained, lr 5e-7 constant, 1000 steps, 1 instance + 1 class image per step,
prior weight 1.0, 200 class images, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8; AdamW8bit on
CUDA when bitsandbytes is present), grad clip 1.0; generation of 16 images for each of
"a photo of sks person" and "a dslr portrait of sks person", 100 steps, guidance 7.5,
each image seeded from the generate stage's stream (the identity and seed: ``benchbase.seeds``)
and its index (the released code is unseeded; seeding makes cells comparable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from benchbase.components import Context, Defense, Params, Personalizer
from benchbase.models.sd import SDModels
from benchbase.toolkit import (
    ClassPrior,
    TrainingTrace,
    class_images,
    dreambooth_steps,
    fused_kwargs,
    generate_images,
)


class DreamBooth(Personalizer):
    class Params(Params):
        max_train_steps: int = Field(1000, ge=0)
        learning_rate: float = Field(5e-7, gt=0)
        #: instance images per step (and as many class images); 1 = the official recipe
        train_batch_size: int = Field(1, ge=1)
        train_text_encoder: bool = True
        with_prior_preservation: bool = True
        prior_loss_weight: float = Field(1.0, ge=0)
        num_class_images: int = Field(200, ge=1)
        class_inference_steps: int = Field(50, ge=1)
        class_guidance_scale: float = Field(7.5, ge=0)
        max_grad_norm: float = Field(1.0, gt=0)
        adam_beta1: float = Field(0.9, ge=0, lt=1)
        adam_beta2: float = Field(0.999, ge=0, lt=1)
        adam_weight_decay: float = Field(1e-2, ge=0)
        adam_epsilon: float = Field(1e-8, gt=0)
        optimizer: Literal["auto", "adamw", "adamw8bit"] = "auto"
        mixed_precision: Literal["no", "bf16", "fp16"] = "no"
        gradient_checkpointing: bool = False
        # generation (changing these does not retrain)
        num_images_per_prompt: int = Field(16, ge=1)
        num_inference_steps: int = Field(100, ge=1)
        guidance_scale: float = Field(7.5, ge=0)
        generation_batch_size: int = Field(4, ge=1)

    generation_fields = frozenset({"num_images_per_prompt", "num_inference_steps", "guidance_scale",
                                   "generation_batch_size"})

    def _optimizer(self, params: list, device: torch.device):
        p = self.params
        kwargs = {"lr": p.learning_rate, "betas": (p.adam_beta1, p.adam_beta2),
                  "weight_decay": p.adam_weight_decay, "eps": p.adam_epsilon}
        use_8bit = p.optimizer == "adamw8bit" or (p.optimizer == "auto" and device.type == "cuda")
        if use_8bit:
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, **kwargs), "adamw8bit"
            except Exception:
                if p.optimizer == "adamw8bit":
                    raise
        return torch.optim.AdamW(params, **fused_kwargs(params), **kwargs), "adamw"

    # -- what trains and how it is stored: the hooks LoRA overrides ---------------------------
    def setup_trainable(self, models: SDModels, ctx: Context) -> list[torch.nn.Parameter]:
        """Full fine-tuning: every UNet weight (and the text encoder's when trained)."""
        p = self.params
        models.unet.requires_grad_(True)
        trainable = list(models.unet.parameters())
        if p.train_text_encoder:
            models.text_encoder.requires_grad_(True)
            trainable += list(models.text_encoder.parameters())
        return trainable

    def save_trained(self, models: SDModels, out_dir: Path) -> dict:
        models.unet.save_pretrained(out_dir / "unet")
        if self.params.train_text_encoder:
            models.text_encoder.save_pretrained(out_dir / "text_encoder")
        return {}

    def load_victim(self, model_dir: Path, ctx: Context) -> SDModels:
        """The base models with the fine-tuned weights from ``model_dir`` (fresh modules)."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        models = ctx.models()
        models.unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", dtype=models.dtype).to(models.device)
        if (model_dir / "text_encoder").is_dir():
            models.text_encoder = CLIPTextModel.from_pretrained(
                model_dir / "text_encoder", dtype=models.dtype).to(models.device)
        return models.freeze()

    # -- the DreamBooth loop (benchbase.toolkit.dreambooth_steps, shared with the attacks' surrogates)
    def train(self, images: torch.Tensor, ctx: Context, defense: Defense, out_dir: Path) -> None:
        p = self.params
        prompts = defense.training_prompts(ctx.prompts)
        models = ctx.models()
        trainable = self.setup_trainable(models, ctx)
        if p.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            if p.train_text_encoder:
                models.text_encoder.gradient_checkpointing_enable()
        optimizer, opt_name = self._optimizer(trainable, models.device)
        prior = None
        if p.with_prior_preservation:
            # the prior images are the base model's samples of the *undefended* class prompt
            # (DiffShortcut generates them before adding its suffix); training uses the defended one
            prior = ClassPrior(class_images(ctx, ctx.prompts.class_, p.num_class_images, p.class_inference_steps,
                                            p.class_guidance_scale).to(models.device))  # PNGs load on the CPU
        trace = TrainingTrace()  # the loss on the instance images: did the victim fit them?
        losses = dreambooth_steps(
            models, trainable, optimizer, images, p.max_train_steps, prompts, ctx.generator,
            train_text_encoder=p.train_text_encoder, prior=prior, prior_loss_weight=p.prior_loss_weight,
            batch_size=p.train_batch_size, max_grad_norm=p.max_grad_norm,
            autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.mixed_precision),
            defense=defense, ctx=ctx, progress=ctx.progress, desc=self.name or "dreambooth", trace=trace)
        info = self.save_trained(models, out_dir)
        (out_dir / "losses.json").write_text(json.dumps(losses))
        ctx.info.update(optimizer=opt_name, steps=p.max_train_steps, **info,
                        loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                        training_prompts={"instance": prompts.instance, "class": prompts.class_})
        trace.record(ctx.info)  # final_instance_loss, instance_loss_trajectory

    def generate(self, model_dir: Path, ctx: Context, defense: Defense) -> dict[str, torch.Tensor]:
        p = self.params
        models = self.load_victim(Path(model_dir), ctx)
        pipe = models.pipeline()
        negative = defense.negative_prompt(ctx.prompts.negative)
        out, used = {}, {}
        for prompt in ctx.prompts.eval:
            used[prompt] = defense.generation_prompt(prompt)
            # image j of an eval prompt starts from the sub-stream ("generation", prompt, j) of the
            # generate stage, whose stream names the identity and seed only: every victim of one
            # identity (clean, noise, attacked, defended) draws the same starting noise, so cells
            # compare draw by draw; the undefended prompt names it, as it names the outputs
            seeds = [ctx.seed_of("generation", prompt, j) for j in range(p.num_images_per_prompt)]
            out[prompt] = generate_images(models, used[prompt], p.num_images_per_prompt, p.num_inference_steps,
                                          p.guidance_scale, seed=seeds,
                                          negative_prompt=negative, batch_size=p.generation_batch_size,
                                          pipe=pipe, progress=ctx.progress)
        ctx.info.update(generation_prompts=used, negative_prompt=negative)
        return out
