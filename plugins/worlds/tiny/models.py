"""Offline tiny Stable Diffusion: random weights built from configs, deterministically.

No download: UNet, VAE (x8 downsampling like SD), CLIP text encoder and schedulers are
built from configs with a seeded generator; the tokenizer is the real 49,408-token CLIP
BPE, converted from the vocabulary open_clip ships, so token ids match real CLIP. The
pipeline is saved as a diffusers folder (once per configuration, in the benchbase cache)
and loaded back through ``load_sd``, the code path real weights take. The tokenizer and the
build-once folders come from ``benchbase.models.offline``.

Random weights: numbers produced with it test the machinery, not the science.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from benchbase.models.offline import VOCAB_SIZE, build_clip_tokenizer, build_folder_once, cache_root

PRESETS = {
    # ~1 M UNet parameters: unit tests
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), text_hidden=32),
    # ~24 M UNet parameters: closer to SD's depth, still CPU-friendly
    "small": dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=64,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), text_hidden=64),
}
TINY_FORMAT = 1  # bump when the construction below changes (invalidates cached folders)


def tiny_config(preset: str, seed: int, resolution: int, prediction_type: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; presets: {', '.join(PRESETS)}")
    return {"format": TINY_FORMAT, "preset": preset, "seed": seed, "resolution": resolution,
            "prediction_type": prediction_type}


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def build_tiny_pipeline(preset: str = "tiny", seed: int = 0, resolution: int = 64,
                        prediction_type: str = "epsilon"):
    """Build the random-weight pipeline in memory (deterministic for the seed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchbase.models.sd import quiet_libraries

    quiet_libraries()
    p = PRESETS[preset]
    torch.manual_seed(seed)  # module constructors draw from the global generator
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4,
        block_out_channels=p["block_out_channels"], layers_per_block=p["layers_per_block"],
        down_block_types=p["down_block_types"], up_block_types=p["up_block_types"],
        cross_attention_dim=p["cross_attention_dim"], attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=resolution,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=p["text_hidden"], intermediate_size=2 * p["text_hidden"],
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=p["text_hidden"],
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def ensure_tiny_folder(preset: str = "tiny", seed: int = 0, resolution: int = 64,
                       prediction_type: str = "epsilon", root: Path | None = None) -> Path:
    """The diffusers folder of this tiny configuration, built and saved once (atomically)."""
    config = tiny_config(preset, seed, resolution, prediction_type)
    folder = (root or cache_root()) / "tiny" / f"{preset}-{fingerprint(config)}"

    def build(tmp: Path) -> None:
        build_tiny_pipeline(preset, seed, resolution, prediction_type).save_pretrained(tmp)

    return build_folder_once(folder, build, config)
