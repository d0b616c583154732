"""guided-diffusion's unconditional ImageNet model (Dhariwal & Nichol, NeurIPS'21;
openai/guided-diffusion ``256x256_diffusion_uncond.pt``), the model GrIDPure's and
DiffShortcut's purifiers load, as a diffusers ``UNet2DModel`` + ``DDPMScheduler``.

No maintained package on PyPI ships guided-diffusion's code, and diffusers can express its
ADM UNet (residual blocks with scale-shift norm that also down/upsample, multi-head attention
at 32, 16 and 8 px) and its learned-range variance, so the checkpoint's tensors are renamed
into a ``UNet2DModel`` here. The only non-trivial step is the attention: guided-diffusion's
default ``QKVAttentionLegacy`` stores q, k, v interleaved per head in one 1x1 conv. The
conversion was checked once against guided-diffusion's own ``unet.py`` on random weights
(outputs of a 6-level, 4-head random model agree to 7e-8 in float32).

The checkpoint is a plain state dict, loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: ``model_and_diffusion_defaults()`` as GrIDPure's ``imagenet.yml`` and DiffShortcut's
#: ``defenses/gridpure.py`` set them for the 256x256 unconditional model
IMAGENET_256_UNCOND = {"model_channels": 256, "channel_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2,
                       "attention_ds": (8, 16, 32), "num_head_channels": 64, "learn_sigma": True,
                       "image_size": 256}
IMAGENET_FILE = "256x256_diffusion_uncond.pt"


def default_checkpoint() -> Path:
    return Path(torch.hub.get_dir()) / "guided-diffusion" / IMAGENET_FILE


def unet_config(model_channels, channel_mult, num_res_blocks, attention_ds, num_head_channels, learn_sigma,
                image_size) -> dict:
    """The diffusers ``UNet2DModel`` config of an ADM UNet (``resblock_updown``, scale-shift norm)."""
    levels = len(channel_mult)
    attn = [2 ** level in attention_ds for level in range(levels)]
    return {
        "sample_size": image_size, "in_channels": 3, "out_channels": 6 if learn_sigma else 3,
        "layers_per_block": num_res_blocks,
        "block_out_channels": tuple(model_channels * m for m in channel_mult),
        "down_block_types": tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)),
        "downsample_type": "resnet", "upsample_type": "resnet", "resnet_time_scale_shift": "scale_shift",
        "attention_head_dim": num_head_channels, "norm_num_groups": 32, "attn_norm_num_groups": 32, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "time_embedding_type": "positional", "act_fn": "silu",
    }


def _resblock(src: str, dst: str, state: dict, out: dict) -> None:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    for a, b in names.items():
        for p in ("weight", "bias"):
            if f"{src}.{a}.{p}" in state:
                out[f"{dst}.{b}.{p}"] = state[f"{src}.{a}.{p}"]


def _attention(src: str, dst: str, state: dict, out: dict, head_channels: int) -> None:
    for p in ("weight", "bias"):
        out[f"{dst}.group_norm.{p}"] = state[f"{src}.norm.{p}"]
    w, b = state[f"{src}.qkv.weight"][..., 0], state[f"{src}.qkv.bias"]  # (3C, C), (3C,)
    channels = w.shape[1]
    heads = channels // head_channels
    # QKVAttentionLegacy: rows ordered (head, q|k|v, channel)
    w = w.reshape(heads, 3, head_channels, channels)
    b = b.reshape(heads, 3, head_channels)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{dst}.{name}.weight"] = w[:, i].reshape(channels, channels)
        out[f"{dst}.{name}.bias"] = b[:, i].reshape(channels)
    out[f"{dst}.to_out.0.weight"] = state[f"{src}.proj_out.weight"][..., 0]
    out[f"{dst}.to_out.0.bias"] = state[f"{src}.proj_out.bias"]


def convert_state_dict(state: dict, model_channels, channel_mult, num_res_blocks, attention_ds, num_head_channels,
                       **_) -> dict:
    """guided-diffusion ``UNetModel`` tensors -> diffusers ``UNet2DModel`` tensors."""
    out: dict = {}

    def copy(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = state[f"{src}.{p}"]

    copy("time_embed.0", "time_embedding.linear_1")
    copy("time_embed.2", "time_embedding.linear_2")
    copy("input_blocks.0.0", "conv_in")
    levels = len(channel_mult)
    k = 1
    for level in range(levels):
        attn = 2 ** level in attention_ds
        for i in range(num_res_blocks):
            _resblock(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{i}", state, out)
            if attn:
                _attention(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{i}", state, out, num_head_channels)
            k += 1
        if level != levels - 1:
            _resblock(f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", state, out)
            k += 1
    _resblock("middle_block.0", "mid_block.resnets.0", state, out)
    _attention("middle_block.1", "mid_block.attentions.0", state, out, num_head_channels)
    _resblock("middle_block.2", "mid_block.resnets.1", state, out)
    k = 0
    for up, level in enumerate(reversed(range(levels))):
        attn = 2 ** level in attention_ds
        for i in range(num_res_blocks + 1):
            _resblock(f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{i}", state, out)
            if attn:
                _attention(f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{i}", state, out, num_head_channels)
            if level and i == num_res_blocks:
                _resblock(f"output_blocks.{k}.{2 if attn else 1}", f"up_blocks.{up}.upsamplers.0", state, out)
            k += 1
    copy("out.0", "conv_norm_out")
    copy("out.2", "conv_out")
    return out


def scheduler(clip_sample: bool = True):
    """guided-diffusion's linear schedule (β 1e-4 → 0.02, 1000 steps) with its learned-range
    variance: ``DDPMScheduler`` interpolates the log-variance between the posterior's and β's."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         variance_type="learned_range", clip_sample=clip_sample, prediction_type="epsilon")


def load(path: Path, config: dict = IMAGENET_256_UNCOND):
    """(UNet2DModel, config) from a guided-diffusion checkpoint of the given architecture."""
    from diffusers import UNet2DModel

    state = torch.load(path, map_location="cpu", weights_only=True)
    unet = UNet2DModel(**unet_config(**config))
    unet.load_state_dict(convert_state_dict(state, **config), strict=True)
    return unet


def respaced_timesteps(num_train: int, count: int) -> list[int]:
    """The timesteps guided-diffusion's ``space_timesteps(num_train, str(count))`` keeps
    (``respace.py``): evenly strided with Python's rounding, e.g. 250 of 1000 → 0, 4, 8, …, 40, …, 401, …, 999."""
    stride = (num_train - 1) / (count - 1)
    cur, steps = 0.0, []
    for _ in range(count):
        steps.append(round(cur))
        cur += stride
    return sorted(set(steps))
