"""The benchbase-mini world's models: architectures, weight files, loading.

Every model is in the architecture family the real pipeline uses, so every plugin runs on
it unchanged: an ``AutoencoderKL`` (x4 down-sampling: 64-px images, 16×16×4 latents), a
``CLIPTextModel`` with the real 49,408-token CLIP BPE, a text-conditioned
``UNet2DConditionModel`` (ε-prediction, SD's scaled-linear schedule), an x4 upscaler
``UNet2DConditionModel`` (the SD x4 upscaler's structure: 7 input channels, noise-level class
embedding, v-prediction) for ``realign``/``noisy-upscaling``, an open_clip ``CLIP``
(the world's CLIP), a face embedder (the world's ArcFace) and a face detector (the world's
RetinaFace).

Weights ship as package data (``plugins/worlds/mini/weights/*.safetensors``, float16) and are
written by ``benchbase train-mini``. Token-embedding tables are stored sparsely: rows that
training never touched are left at their seeded initialisation (``init_embedding``) and are
regenerated bit-exactly at load time, so the 49,408-row tables cost only the rows of words
the world uses.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from benchbase.models.offline import VOCAB_SIZE, build_clip_tokenizer, build_folder_once, cache_root

MINI_FORMAT = 1  # bump when the folder layout built from the weights changes
TEXT_HIDDEN = 64
LATENT_SCALE = 4  # VAE down-sampling factor
RESOLUTION = 64
CLIP_NAME = "benchbase-mini-clip"
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": VOCAB_SIZE, "width": 64, "heads": 4, "layers": 3},
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OpenAI normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBED_INIT_STD = 0.02
UPSCALER_SCALING = 0.08333  # the SD x4 upscaler's latent scaling, which diffusers' pipeline enforces


#: world versions: v2 (weights/, protocol 1's world) and v3 (weights/v3/: v2 + a face restorer,
#: a pixel diffusion model, noise in its vocabulary, a CLIP that knows the class prompt)
VERSIONS = ("v2", "v3")
WEIGHT_FILES = {
    "v2": ("vae", "text_encoder", "unet", "upscaler", "clip", "face"),
    "v3": ("vae", "text_encoder", "unet", "upscaler", "upscaler_text_encoder", "clip", "face", "restorer", "pixel"),
}
WEIGHTS_ENV = {"v2": "BENCHBASE_MINI_WEIGHTS", "v3": "BENCHBASE_MINI_V3_WEIGHTS"}


def weights_dir(version: str = "v2") -> Path:
    """The shipped weights of ``version``, or ``$BENCHBASE_MINI_WEIGHTS`` (v2) /
    ``$BENCHBASE_MINI_V3_WEIGHTS`` (v3): weights you trained elsewhere."""
    override = os.environ.get(WEIGHTS_ENV[version])
    if override:
        return Path(override)
    root = Path(str(resources.files(__package__) / "weights"))
    return root if version == "v2" else root / version


def weights_present(folder: Path | None = None, version: str = "v2") -> str | None:
    """None when every weight file of ``version`` is there, else the sentence saying what is missing."""
    folder = folder or weights_dir(version)
    missing = [f for f in WEIGHT_FILES[version] if not (folder / f"{f}.safetensors").is_file()]
    if missing or not (folder / "world.json").is_file():
        return (f"unavailable: benchbase-mini {version} weights ({', '.join(missing) or 'world.json'}) missing in "
                f"{folder} — reinstall benchbase or run `benchbase train-mini --version {version}`")
    return None


# ---------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------


def build_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION, scaling_factor=scaling_factor,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_HIDDEN,
    ))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // LATENT_SCALE, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96),
        # attention at 8×8 and 4×4 only: a third of the cost of attention at 16×16 on a CPU
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def build_upscaler_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // LATENT_SCALE, in_channels=7, out_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32, num_class_embeds=1000,
    )


def sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def upscaler_schedulers():
    """The SD x4 upscaler's: v-prediction DDIM over scaled-linear β 1e-4 → 0.02; DDPM for the low-res noise."""
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"))


def register_clip() -> str:
    import open_clip

    if CLIP_NAME not in open_clip.list_models():
        folder = cache_root() / "mini" / "open_clip_config"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{CLIP_NAME}.json").write_text(json.dumps(CLIP_CONFIG))
        open_clip.add_model_config(folder)
    return CLIP_NAME


def build_clip():
    import logging

    import open_clip

    register_clip()
    # open_clip warns on the root logger that a model built without pretrained weights is random;
    # the world's weights are loaded right after, and to a user the line reads like a failure
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(CLIP_NAME, pretrained=None)
    finally:
        root.setLevel(level)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if cin == cout and stride == 1
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.nn.functional.silu(self.body(x) + self.skip(x))


def _trunk(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
                         _Block(width, width, 2), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2),
                         _Block(4 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class FaceEmbedderNet(nn.Module):
    """A small ResNet: 64-px portrait in [0,1] → L2-normalised 128-d identity embedding.
    Trained with a CosFace head (s = 30, m = 0.2) over the training identities."""

    def __init__(self, width: int = 16, dim: int = 128):
        super().__init__()
        self.trunk = _trunk(width)
        self.head = nn.Sequential(nn.Linear(4 * width, dim), nn.BatchNorm1d(dim))

    def forward(self, x):
        return torch.nn.functional.normalize(self.head(self.trunk(x * 2 - 1)), dim=-1)


class FaceDetectorNet(nn.Module):
    """A small ResNet: 64-px image in [0,1] → (portrait logit, box (4), 5 landmarks (10)),
    coordinates as fractions of the side."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.trunk = _trunk(width)
        self.head = nn.Linear(4 * width, 15)

    def forward(self, x):
        out = self.head(self.trunk(x * 2 - 1))
        return out[:, 0], out[:, 1:5], out[:, 5:15].reshape(-1, 5, 2)


# ---------------------------------------------------------------------------------------
# weight files (float16, sparse token embeddings)
# ---------------------------------------------------------------------------------------

EMBEDDING_KEYS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight",
                  "token_embedding.weight")


def init_embedding(module: nn.Embedding, seed: int) -> None:
    """Seeded N(0, 0.02) initialisation of a token-embedding table (regenerated at load)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=g) * EMBED_INIT_STD)


def _initial_table(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * EMBED_INIT_STD


def pack_state(state: dict[str, torch.Tensor], embed_seed: int | None = None) -> dict[str, torch.Tensor]:
    """float16 state dict; token-embedding tables keep only rows that moved from their init."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if k in EMBEDDING_KEYS and embed_seed is not None:
            init = _initial_table(tuple(v.shape), embed_seed)
            rows = torch.nonzero((v.float() != init).any(dim=1)).flatten()
            out[k + ".rows"] = rows.to(torch.int64)
            out[k + ".values"] = v[rows].to(torch.float16)
            out[k + ".shape"] = torch.tensor(v.shape, dtype=torch.int64)
        elif v.is_floating_point():
            out[k] = v.to(torch.float16)
        else:
            out[k] = v
    return out


def unpack_state(packed: dict[str, torch.Tensor], embed_seed: int | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in packed.items():
        if k.endswith((".rows", ".shape")):
            continue
        if k.endswith(".values"):
            base = k[: -len(".values")]
            table = _initial_table(tuple(int(s) for s in packed[base + ".shape"]), embed_seed or 0)
            table[packed[base + ".rows"]] = v.float()
            out[base] = table
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def save_weights(path: Path, state: dict[str, torch.Tensor], embed_seed: int | None = None,
                 metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    packed = {k: v.contiguous() for k, v in pack_state(state, embed_seed).items()}
    save_file(packed, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.chmod(tmp, 0o644)  # package data: readable by everyone
    tmp.replace(path)


def load_weights(path: Path, embed_seed: int | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return unpack_state(load_file(str(path)), embed_seed)


def world_info(folder: Path | None = None) -> dict:
    return json.loads(((folder or weights_dir()) / "world.json").read_text())


# ---------------------------------------------------------------------------------------
# diffusers folders built from the shipped weights (once, in the cache)
# ---------------------------------------------------------------------------------------


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + [folder / "world.json"]


LOAD_FIELDS = ("vae_scaling_factor", "seeds")  # what of world.json changes the loaded models


@lru_cache(maxsize=8)
def _weights_digest(folder: Path, stamp: tuple) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in _files(folder)[:-1]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    info = world_info(folder)  # losses and timings in world.json do not change the models
    h.update(json.dumps({k: info.get(k) for k in LOAD_FIELDS}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def fingerprint(folder: Path | None = None) -> str:
    """Hash of the weight files' bytes (cached while their sizes and times are unchanged)."""
    folder = folder or weights_dir()
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in _files(folder))
    return _weights_digest(folder, stamp)


def clip_tokenizer():
    """The CLIP BPE tokenizer (its vocabulary files only live while it is built)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(Path(tmp))


def load_text_encoder(folder: Path, tokenizer=None, file: str = "text_encoder"):
    """(tokenizer, text encoder) with the weights ``file`` in ``folder``."""
    tokenizer = tokenizer or clip_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    seed = world_info(folder)["seeds"]["text_embedding"]
    text_encoder.load_state_dict(load_weights(folder / f"{file}.safetensors", seed))
    return tokenizer, text_encoder


def load_vae(folder: Path):
    info = world_info(folder)
    vae = build_vae(info["vae_scaling_factor"])
    vae.load_state_dict(load_weights(folder / "vae.safetensors"))
    return vae


def build_pipeline_folder(tmp: Path, folder: Path | None = None) -> None:
    """Write the mini Stable Diffusion pipeline as a diffusers folder (read by ``load_sd``)."""
    from diffusers import StableDiffusionPipeline

    folder = folder or weights_dir()
    tokenizer, text_encoder = load_text_encoder(folder)
    unet = build_unet()
    unet.load_state_dict(load_weights(folder / "unet.safetensors"))
    pipe = StableDiffusionPipeline(vae=load_vae(folder), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)


def build_upscaler_folder(tmp: Path, folder: Path | None = None) -> None:
    """The world's x4 upscaler as a ``StableDiffusionUpscalePipeline`` folder."""
    from diffusers import StableDiffusionUpscalePipeline

    folder = folder or weights_dir()
    # v3 keeps v2's upscaler with the text encoder it was trained with (like SD's x4 upscaler,
    # which has a text encoder of its own)
    own = (folder / "upscaler_text_encoder.safetensors").is_file()
    tokenizer, text_encoder = load_text_encoder(folder, file="upscaler_text_encoder" if own else "text_encoder")
    unet = build_upscaler_unet()
    unet.load_state_dict(load_weights(folder / "upscaler.safetensors"))
    vae = load_vae(folder)
    # StableDiffusionUpscalePipeline forces the VAE's scaling factor to 0.08333 (the real
    # upscaler's). Reparametrise the latent space exactly instead: latents k times larger
    # (encoder's mean ×k, log-variance +2 ln k; decoder input ÷k) so 0.08333 · z' = s · z.
    k = vae.config.scaling_factor / UPSCALER_SCALING
    with torch.no_grad():
        qc, pqc = vae.quant_conv, vae.post_quant_conv
        c = qc.out_channels // 2
        qc.weight[:c] *= k
        qc.bias[:c] *= k
        qc.bias[c:] += 2 * math.log(k)
        pqc.weight /= k
    vae.register_to_config(scaling_factor=UPSCALER_SCALING)
    scheduler, low_res = upscaler_schedulers()
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                          unet=unet, low_res_scheduler=low_res, scheduler=scheduler,
                                          max_noise_level=350)
    pipe.save_pretrained(tmp)


def build_pixel_folder(tmp: Path, folder: Path | None = None) -> None:
    """v3's unconditional pixel model as a ``DDPMPipeline`` folder (the ``pixel-diffusion`` role)."""
    from diffusers import DDPMPipeline

    from .organs import build_pixel_unet, pixel_scheduler

    unet = build_pixel_unet()
    unet.load_state_dict(load_weights((folder or weights_dir("v3")) / "pixel.safetensors"))
    DDPMPipeline(unet=unet, scheduler=pixel_scheduler()).save_pretrained(tmp)


def require(version: str) -> Path:
    """The weights folder of ``version``; WeightsUnavailableError when a file is missing."""
    missing = weights_present(version=version)
    if missing:
        from benchbase.errors import WeightsUnavailableError

        raise WeightsUnavailableError(missing)
    return weights_dir(version)


def ensure_folder(kind: str, version: str = "v2") -> Path:
    """``kind`` = "pipeline", "upscaler" or "pixel" (v3): the diffusers folder, built once per
    weights digest."""
    folder = require(version)
    digest = fingerprint(folder)
    build = {"pipeline": build_pipeline_folder, "upscaler": build_upscaler_folder, "pixel": build_pixel_folder}[kind]
    return build_folder_once(cache_root() / "mini" / f"{kind}-{digest}-v{MINI_FORMAT}",
                             lambda tmp: build(tmp, folder),
                             {"kind": kind, "weights": digest, "format": MINI_FORMAT}, marker="benchbase_mini.json")


_CACHE: dict[str, object] = {}


def load_clip(version: str = "v2"):
    """The world's open_clip model (eval mode, CPU), its preprocess and tokenizer."""
    if ("clip", version) not in _CACHE:
        import open_clip

        folder = require(version)
        model = build_clip()
        info = world_info(folder)
        model.load_state_dict(load_weights(folder / "clip.safetensors", info["seeds"]["clip_embedding"]))
        model.eval().requires_grad_(False)
        size = CLIP_CONFIG["vision_cfg"]["image_size"]
        model.visual.preprocess_cfg = {"size": size, "mean": CLIP_MEAN, "std": CLIP_STD}  # as trained
        preprocess = open_clip.image_transform(CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False,
                                               mean=CLIP_MEAN, std=CLIP_STD)
        _CACHE[("clip", version)] = (model, preprocess, open_clip.get_tokenizer(CLIP_NAME))
    return _CACHE[("clip", version)]


def load_face_models(version: str = "v2") -> tuple[FaceEmbedderNet, FaceDetectorNet]:
    if ("face", version) not in _CACHE:
        state = load_weights(require(version) / "face.safetensors")
        emb, det = FaceEmbedderNet(), FaceDetectorNet()
        emb.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("emb.")})
        det.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("det.")})
        _CACHE[("face", version)] = (emb.eval().requires_grad_(False), det.eval().requires_grad_(False))
    return _CACHE[("face", version)]


def load_restorer(version: str = "v3"):
    """v3's face restorer (``organs.MiniCodeFormer``), eval mode, CPU."""
    if ("restorer", version) not in _CACHE:
        from .organs import MiniCodeFormer

        net = MiniCodeFormer()
        net.load_state_dict(load_weights(require(version) / "restorer.safetensors"))
        _CACHE[("restorer", version)] = net.eval().requires_grad_(False)
    return _CACHE[("restorer", version)]
