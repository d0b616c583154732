"""CAAT (Xu et al., CVPR 2024): joint image ascent and cross-attention K/V training
(CO2-cityao/CAAT ``CAAT.py``, ``scripts/train_CAAT.sh``)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from benchbase.components import Attack, Context
from benchbase.toolkit import ObjectiveTrace, denoise, sign_step, threat_view

from ._surrogate import Surrogate, load_models


class CAAT(Attack):
    """Cross-Attention Adversarial Training (Xu et al., CVPR'24).

    The surrogate is SD with only the cross-attention key/value projections trainable
    (Custom Diffusion ``crossattn_kv``; the rest of the UNet and the text encoder frozen). For
    ``max_train_steps`` = 250 iterations, one forward/backward of ``L_DM`` on the whole
    perturbed batch with the prompt "a photo of a person" (no identifier) gives both
    gradients: the images take a sign-ascent step (α 0.6375 levels, ε 6.375 levels = 5e-3 /
    0.05 in [−1,1], no random start) and K/V take an AdamW descent step (lr 1e-5, constant,
    gradient norm clipped to 1.0), the optimizer kept across iterations.

    The release trains K/V through diffusers' ``CustomDiffusionAttnProcessor`` (``CAAT.py``
    655–726, diffusers 0.21.0 pinned in ``requirements.txt``), whose cross-attention branch
    replaces the first text token's key and value by detached copies (``detach[:, :1, :] = 0``):
    the start token still takes part in the attention, but its key/value contribute nothing to
    the K/V weight gradient (nor, so, to the gradient norm that is clipped). ``detach_start_token``
    (default on) does the same with forward hooks on ``attn2.to_k``/``to_v``; off, the start token
    feeds the weight gradient as under diffusers' default processor. The image gradient is the
    same either way (keys and values depend only on the frozen text encoder's output).

    Deviations, on purpose: the script's ``--hflip`` is off (with it the released code may save
    mirrored images), and prior preservation is not offered (the released prior script puts no
    class images in the perturbed batch).
    """

    class Params(Attack.Params):
        eps: float = Field(6.375, ge=0)
        pgd_alpha: float = Field(0.6375, ge=0)
        max_train_steps: int = Field(250, ge=0)
        learning_rate: float = Field(1e-5, gt=0)
        max_grad_norm: float = Field(1.0, gt=0)
        adam_beta1: float = Field(0.9, ge=0, lt=1)
        adam_beta2: float = Field(0.999, ge=0, lt=1)
        adam_weight_decay: float = Field(1e-2, ge=0)
        adam_epsilon: float = Field(1e-8, gt=0)
        #: None = "a photo of a {class noun}" from the dataset's prompts ("a photo of a person")
        prompt: str | None = None
        precision: Literal["context", "fp32", "bf16"] = "context"
        gradient_checkpointing: bool = False
        #: Custom Diffusion's processor: no K/V weight gradient through the first text token
        detach_start_token: bool = True

    supports_adaptive = True

    def protect(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        purify, prompts = threat_view(ctx)
        x0 = images.to(ctx.device, torch.float32)
        models = load_models(ctx, p.precision)
        s = Surrogate(models, "crossattn_kv", train_text_encoder=False,
                      gradient_checkpointing=p.gradient_checkpointing)
        hooks = detach_start_token(s.unet) if p.detach_start_token else []
        try:
            return self._run(x0, ctx, models, s, purify, prompts)
        finally:
            for h in hooks:
                h.remove()

    def _run(self, x0, ctx: Context, models, s: Surrogate, purify, prompts) -> torch.Tensor:
        p = self.params
        optimizer = torch.optim.AdamW(s.params, lr=p.learning_rate, betas=(p.adam_beta1, p.adam_beta2),
                                      weight_decay=p.adam_weight_decay, eps=p.adam_epsilon)
        prompt = p.prompt or f"a photo of a {prompts.class_noun}"
        cond = s.encode_prompts([prompt] * len(x0))
        s.unet.train()
        x = x0.clone()
        losses = []
        for _ in ctx.progress(range(p.max_train_steps), desc="caat", leave=False):
            x = x.detach().requires_grad_(True)
            view = purify(x) if purify is not None else x
            z = models.encode_images(view, sample=True, generator=ctx.generator)
            out = denoise(models, s.unet, z, cond, ctx.generator)
            loss = (out["pred"] - out["target"]).pow(2).mean()
            loss.backward()  # one backward: ∇ₓ for the image, ∇θ for K/V
            torch.nn.utils.clip_grad_norm_(s.params, p.max_grad_norm)
            x = sign_step(x, x0, x.grad, p.pgd_alpha / 255, p.eps / 255, maximize=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        s.unet.eval()
        trace = ObjectiveTrace("denoising loss L_DM of the protected set_B with the cross-attention K/V trained "
                               "alongside", maximize=True, per="joint step (one image step and one K/V update)")
        trace.extend(losses)
        trace.record(ctx.info)
        ctx.info.update(caat_loss_first=losses[0] if losses else None, caat_loss_last=losses[-1] if losses else None,
                        caat_prompt=prompt, caat_detach_start_token=p.detach_start_token,
                        trainable_kv_params=sum(t.numel() for t in s.params),
                        adaptive=ctx.threat is not None)
        return x.detach().cpu()


def _detach_first_token(module, args, output: torch.Tensor) -> torch.Tensor:
    # the same value, but the first token's row is a constant for autograd: what
    # CustomDiffusionAttnProcessor's ``detach * key + (1 - detach) * key.detach()`` computes
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def detach_start_token(unet: torch.nn.Module) -> list:
    """Forward hooks on every cross-attention key/value projection (``attn2.to_k``/``to_v``, the
    tensors CAAT trains) that cut the gradient through the first text token's key and value, as
    diffusers' ``CustomDiffusionAttnProcessor`` (the processor CAAT's release trains through)
    does. Returns the hook handles (``.remove()`` them to restore the plain processor)."""
    handles = [module.register_forward_hook(_detach_first_token) for name, module in unet.named_modules()
               if name.endswith((".attn2.to_k", ".attn2.to_v"))]
    if not handles:
        raise ValueError("caat: the UNet has no cross-attention key/value projections (attn2.to_k/to_v)")
    return handles
