"""Stable Diffusion models as every stage uses them: one loader, one bundle of modules.

Both the real ``sd`` backend and the offline ``tiny`` backend end here: tiny saves a
diffusers folder and loads it back through ``load_sd``, so tests exercise the code path
real weights take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from benchbase.errors import ConfigError, DataError, WeightsUnavailableError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def quiet_libraries() -> None:
    """Silence per-file loading/saving bars and banners of diffusers, transformers and the hub:
    benchbase shows one progress bar per stage instead."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    for lib in (dlogging, tlogging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def parse_device(name: str) -> torch.device:
    """The device ``name`` means, without checking that it exists here (a Ray driver names
    the device its workers have)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means on this machine; a clear ConfigError when it is not a device
    name or this machine does not have it (``cuda`` without CUDA, ``cuda:3`` on a 1-GPU box)."""
    device = parse_device(name)
    kind = device.type
    if kind == "cpu":
        return device
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device {name!r}: {why} on this machine; use device = \"cpu\" or \"auto\"")
        count = torch.cuda.device_count()
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r}: MPS (Apple GPU) is not available on this machine")
        count = 1
    else:  # xpu, hpu...: whatever torch module of that name says
        module = getattr(torch, kind, None)
        available = getattr(module, "is_available", None)
        if available is None or not available():
            raise ConfigError(f"device {name!r}: no {kind} device is available in this torch build")
        count = getattr(module, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {name!r}: this machine has {count} {kind} device(s) "
                          f"({', '.join(f'{kind}:{i}' for i in range(count))})")
    return device


@dataclass
class SDModels:
    """The modules of a Stable Diffusion pipeline plus the few operations all stages share."""

    path: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # the model's sampling scheduler (PNDM for SD-2.1-base, DDIM for tiny)
    noise_scheduler: object  # DDPM with the same betas, for training losses
    device: torch.device
    dtype: torch.dtype
    resolution: int

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts, padding="max_length", truncation=True,
            max_length=self.tokenizer.model_max_length, return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompt(self, prompts: list[str], text_encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Text embeddings (last hidden state), as DreamBooth conditions the UNet."""
        encoder = text_encoder or self.text_encoder
        return encoder(self.tokenize(prompts))[0]

    def encode_images(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[0,1] images -> scaled latents; a posterior sample (DreamBooth, ASPL) or the mean."""
        mean, std = self.posterior(images)
        if sample:
            return self.sample_posterior(mean, std, generator)
        return mean * self.scaling_factor

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of [0,1] images, unscaled."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        return dist.mean, dist.std

    def sample_posterior(self, mean: torch.Tensor, std: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents ``(mean + std·ε)·s``, ε drawn in float32 on the CPU generator: the sample
        ``encode_images`` draws, so a cached posterior gives the same latents from the same stream."""
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device, mean.dtype)
        return (mean + std * noise) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    def diffusion_loss(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        unet: torch.nn.Module | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """L_DM: MSE between the UNet prediction and its target (ε or v, by prediction_type),
        t ~ U{0..T-1} per image and fresh noise unless given (``benchbase.toolkit.diffusion``,
        the one noising path every stage uses)."""
        from benchbase.toolkit.diffusion import diffusion_loss

        return diffusion_loss(self, latents, cond, generator, timesteps, noise, unet, reduction)

    def pipeline(self, unet: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None):
        """A StableDiffusionPipeline over these modules (optionally a fine-tuned UNet / text encoder)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=text_encoder or self.text_encoder, tokenizer=self.tokenizer,
            unet=unet or self.unet, scheduler=self.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def freeze(self) -> "SDModels":
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        return self


def weights_message(model: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    how = (
        f"download it on a machine with internet access (`huggingface-cli download {model} "
        f"--local-dir <folder>`) and set the backend's `model = \"<folder>\"` in the suite"
    )
    state = "the hub is offline (HF_HUB_OFFLINE=1) and " if offline else ""
    return f"Stable Diffusion weights {model!r} are not available: {state}they are not in the local cache; {how}."


def check_sd_folder(folder: Path) -> None:
    """Read what a diffusers folder promises before loading it, so a broken folder is one line
    naming the broken part (a missing subfolder, a config that is not JSON, a corrupt or
    truncated safetensors file) instead of a hub message or a traceback. A folder that is there but
    broken is a failure (``DataError``), not an absent model (``WeightsUnavailableError``)."""
    import json

    def fail(what: str) -> DataError:
        return DataError(f"Stable Diffusion folder {folder}: {what}")

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise fail(f"model_index.json cannot be read ({exc})") from None
    if not isinstance(index, dict):
        raise fail("model_index.json is not a JSON object")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        sub = folder / part
        if part not in index or index[part] in (None, [None, None]):
            raise fail(f"model_index.json names no `{part}`")
        if not sub.is_dir():
            raise fail(f"the `{part}` subfolder is missing")
        for config in [*sub.glob("*config.json")]:
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise fail(f"{part}/{config.name} is not valid JSON ({exc})") from None
        if part in ("unet", "vae", "text_encoder"):
            weights = sorted(sub.glob("*.safetensors"))
            if not weights and not any(sub.glob("*.bin")):
                raise fail(f"`{part}` has no weights file (*.safetensors)")
            for file in weights:  # the header names every tensor: a corrupt or cut file fails here
                try:
                    from safetensors import safe_open

                    with safe_open(str(file), framework="pt") as handle:
                        handle.keys()
                    if file.stat().st_size < 8:
                        raise ValueError("empty file")
                except Exception as exc:  # noqa: BLE001 (SafetensorError is not an OSError)
                    raise fail(f"{part}/{file.name} is not a valid safetensors file "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def load_sd(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    resolution: int,
    revision: str | None = None,
    variant: str | None = None,
    scheduler: str | None = None,
) -> SDModels:
    """Load a diffusers Stable Diffusion folder or hub id (SD 1.x / 2.x, ε or v prediction).

    Raises WeightsUnavailableError with one sentence naming the model and how to get it when it is
    absent (no such folder, a hub id not in the cache), DataError naming the broken part when a
    local folder is there but broken.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    quiet_libraries()

    local = Path(model).expanduser()
    is_local = local.is_dir()
    if not is_local and model.startswith((".", "/", "~")):
        raise WeightsUnavailableError(f"Stable Diffusion folder {model!r} does not exist.")
    if is_local and not (local / "model_index.json").is_file():
        raise DataError(
            f"{local} is not a diffusers Stable Diffusion folder (no model_index.json); save one with "
            "`StableDiffusionPipeline.save_pretrained` or download a model with `huggingface-cli download`."
        )
    if is_local:
        check_sd_folder(local)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if is_local else model,
            revision=revision, variant=variant, dtype=dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=is_local or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
        )
    except Exception as exc:  # noqa: BLE001 (diffusers/transformers raise many kinds for a bad folder)
        if is_local:  # not a download problem: say what diffusers found wrong, in one line
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise DataError(
                f"Stable Diffusion folder {local} cannot be loaded ({type(exc).__name__}: {first}); check that "
                "its subfolders' configs match their weights (save it with `save_pretrained`)") from None
        if not isinstance(exc, (OSError, ValueError, EnvironmentError)):
            raise
        raise WeightsUnavailableError(weights_message(model) + f" ({type(exc).__name__})") from None
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    return SDModels(
        path=str(local) if is_local else model, unet=pipe.unet, vae=pipe.vae,
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
        noise_scheduler=noise_scheduler, device=device, dtype=dtype, resolution=resolution,
    ).freeze()
