"""World v3's extra organs: a face restorer (the world's CodeFormer), an unconditional pixel
diffusion model (GrIDPure's and pixel DiffPure's model) and the degradations both are trained
or judged with.

**The restorer** follows CodeFormer (Zhou et al., NeurIPS'22, sczhou/CodeFormer
``basicsr/archs/codeformer_arch.py``) at the world's scale: a VQ autoencoder learns a discrete
codebook of clean portraits (stage I); a low-quality encoder and a transformer predict the
codebook indices of the clean image from a degraded one (stage II); controllable feature
transformation blocks (CFT: a scale and a shift computed from the encoder's features, added to
the decoder's features with weight ``w``) bring the input's details back (stage III, trained at
w = 1). At inference ``w = 0`` decodes the predicted codes only (the prior's quality) and
``w = 1`` is most faithful to the input — CodeFormer's fidelity weight. The packaged CodeFormer
(``codeformer-pip``) hard-codes 512-px inputs and its channel widths, so the architecture is
written here at 64 px (8×8 codes, 512 entries) with the same three parts; the training losses
are CodeFormer's without its perceptual and adversarial terms (no LPIPS network or
discriminator exists in the world).

**The pixel model** is a diffusers ``UNet2DModel`` with ε-prediction over guided-diffusion's
linear β schedule (1e-4 → 0.02, 1000 steps; the schedule of the ImageNet model GrIDPure uses),
trained unconditionally on the world's training portraits at 32 px, half the world's side, as
GrIDPure's 256-px model is half of SD's 512-px photos: GrIDPure's windows are then 32 px at
stride 16 on a 64-px portrait (9 windows and the corner mosaic, the release's geometry), and
pixel DiffPure resizes 64 → 32 px as the release resizes 512 → 256.

**Degradations** (``degrade``) are CodeFormer's synthetic ones (``basicsr/data/ffhq_blind_dataset.py``:
Gaussian blur, down-sampling, Gaussian noise, JPEG) with the ranges of its stage II/III configs,
sizes scaled from 512 px to 64 px.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------
# CodeFormer at 64 px
# ---------------------------------------------------------------------------------------

CODEBOOK_SIZE = 512
CODE_DIM = 64
CODE_SIDE = 8  # 64 px / 8: CodeFormer's 512 px / 32 keeps 16×16 codes; 8×8 keeps its 1/64 of the pixels
CHANNELS = (16, 32, 64, 64)  # at 64, 32, 16, 8 px (CPU-sized: full-resolution convs dominate the cost)
FUSE_AT = (16, 32)  # CFT at the decoder's 16- and 32-px features (CodeFormer: 32…256 of 512)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, 1, 1),
                                  _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """64 px → 8×8×CODE_DIM; keeps its features at 32 and 16 px for the CFT blocks."""

    def __init__(self):
        super().__init__()
        c = CHANNELS
        self.stem = nn.Conv2d(3, c[0], 3, 1, 1)
        self.blocks = nn.ModuleList()
        for i in range(3):
            self.blocks.append(nn.Sequential(ResBlock(c[i], c[i]), nn.Conv2d(c[i], c[i + 1], 4, 2, 1)))
        self.out = nn.Sequential(ResBlock(c[3], c[3]), _norm(c[3]), nn.SiLU(), nn.Conv2d(c[3], CODE_DIM, 1))

    def forward(self, x):
        feats = {}
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
            feats[h.shape[-1]] = h
        return self.out(h), feats


class Decoder(nn.Module):
    """8×8×CODE_DIM → 64 px, with a hook after each up-sampling for the CFT blocks."""

    def __init__(self):
        super().__init__()
        c = CHANNELS
        self.inp = nn.Sequential(nn.Conv2d(CODE_DIM, c[3], 3, 1, 1), ResBlock(c[3], c[3]))
        self.ups = nn.ModuleList()
        for i in (3, 2, 1):
            self.ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                          nn.Conv2d(c[i], c[i - 1], 3, 1, 1), ResBlock(c[i - 1], c[i - 1])))
        self.out = nn.Sequential(_norm(c[0]), nn.SiLU(), nn.Conv2d(c[0], 3, 3, 1, 1))

    def forward(self, z, fuse=None):
        h = self.inp(z)
        for up in self.ups:
            h = up(h)
            if fuse is not None:
                h = fuse(h)
        return self.out(h)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (VQ-VAE; CodeFormer's ``VectorQuantizer``, β = 0.25)."""

    def __init__(self, n: int = CODEBOOK_SIZE, dim: int = CODE_DIM, beta: float = 0.25):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)
        self.embedding.weight.data.uniform_(-1.0 / n, 1.0 / n)
        self.beta = beta

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embedding.weight.T
             + self.embedding.weight.pow(2).sum(1)[None])
        return d.argmin(1).view(z.shape[0], -1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        b = idx.shape[0]
        return self.embedding(idx).view(b, CODE_SIDE, CODE_SIDE, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z):
        idx = self.indices(z)
        q = self.lookup(idx)
        loss = F.mse_loss(q.detach(), z) * self.beta + F.mse_loss(q, z.detach())
        return z + (q - z).detach(), loss, idx


class Fuse(nn.Module):
    """CodeFormer's ``Fuse_sft_block``: scale and shift from (encoder, decoder) features,
    ``out = dec + w · (dec · scale + shift)``."""

    def __init__(self, c: int):
        super().__init__()
        self.enc = ResBlock(2 * c, c)
        self.scale = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))
        self.shift = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, enc, dec, w: float):
        h = self.enc(torch.cat([enc, dec], 1))
        return dec + w * (dec * self.scale(h) + self.shift(h))


class MiniCodeFormer(nn.Module):
    """The world's CodeFormer: ``forward(x, w)`` restores [-1, 1] 64-px portraits.

    Parts: ``encoder``/``quantize``/``decoder`` (stage I's VQ autoencoder, frozen after it),
    ``lq_encoder`` + ``transformer`` + ``head`` (stage II: code prediction from a degraded
    image), ``fuse`` (stage III: CFT at 16 and 32 px)."""

    def __init__(self, dim: int = 128, layers: int = 3, heads: int = 4):
        super().__init__()
        self.encoder, self.quantize, self.decoder = Encoder(), VectorQuantizer(), Decoder()
        self.lq_encoder = Encoder()
        self.feat_emb = nn.Linear(CODE_DIM, dim)
        self.position_emb = nn.Parameter(torch.zeros(CODE_SIDE * CODE_SIDE, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, CODEBOOK_SIZE, bias=False))
        self.fuse = nn.ModuleDict({str(s): Fuse(CHANNELS[{32: 1, 16: 2}[s]]) for s in FUSE_AT})

    # stage I
    def autoencode(self, x):
        z, _ = self.encoder(x)
        q, loss, _ = self.quantize(z)
        return self.decoder(q), loss

    # stage II
    def code_logits(self, x):
        lq, feats = self.lq_encoder(x)
        h = self.feat_emb(lq.flatten(2).transpose(1, 2)) + self.position_emb
        return self.head(self.transformer(h)), lq, feats

    def restore(self, x, w: float = 0.5):
        """(restored image, code logits, LQ features): the code-prediction path's outputs are
        what stage III's code losses need."""
        logits, lq, feats = self.code_logits(x)
        q = self.quantize.lookup(logits.argmax(-1))
        if w <= 0:
            return self.decoder(q), logits, lq

        def fuse(h):
            key = str(h.shape[-1])
            return self.fuse[key](feats[h.shape[-1]], h, w) if key in self.fuse else h

        return self.decoder(q, fuse), logits, lq

    def forward(self, x, w: float = 0.5):
        return self.restore(x, w)[0]


# ---------------------------------------------------------------------------------------
# pixel diffusion
# ---------------------------------------------------------------------------------------


PIXEL_SIDE = 32  # the pixel model's side: half the world's 64 px, as GrIDPure's 256-px model on 512-px photos


def build_pixel_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=PIXEL_SIDE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 96, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16, attention_head_dim=32,
    )


def pixel_training_views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """32-px training images from 64-px portraits: half random 32-px crops at full resolution
    (what GrIDPure's windows show the model), half whole portraits resized to 32 px (what
    DiffPure's resize shows it) — the two views an ImageNet-256 model gets of a 512-px photo."""
    n = len(x)
    crop = torch.rand(n, generator=gen) < 0.5
    out = F.interpolate(x, size=(PIXEL_SIDE, PIXEL_SIDE), mode="bilinear", antialias=True, align_corners=False)
    ij = torch.randint(0, 64 - PIXEL_SIDE + 1, (n, 2), generator=gen)
    for k in torch.nonzero(crop).flatten().tolist():
        i, j = int(ij[k, 0]), int(ij[k, 1])
        out[k] = x[k, :, i:i + PIXEL_SIDE, j:j + PIXEL_SIDE]
    return out


def pixel_scheduler():
    """guided-diffusion's linear schedule (β 1e-4 → 0.02 over 1000 steps), ε-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=True)


# ---------------------------------------------------------------------------------------
# degradations (CodeFormer's, at 64 px) and noise overlays (the world's "noisy pattern")
# ---------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """One [0,1] CHW image through PIL's JPEG at ``quality``."""
    from PIL import Image

    a = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1).float() / 255


#: CodeFormer's degradation ranges (``options/CodeFormer_stage3.yml``: "small" for stage III,
#: the "_large" ones for stage II), sizes divided by 8: a 64-px world portrait is an FFHQ 512-px
#: face at 1/8 (blur σ and down-sampling factor scale with the image; noise levels and JPEG
#: quality do not)
DEGRADATIONS = {
    "small": {"blur_sigma": (0.1 / 8, 10 / 8), "downsample": (1.0, 12 / 8), "noise": (0, 15), "jpeg": (60, 100)},
    "large": {"blur_sigma": (1 / 8, 15 / 8), "downsample": (1.0, 30 / 8), "noise": (0, 20),
              "jpeg": (30, 80)},
}


def degrade(x: torch.Tensor, gen: torch.Generator, level: str = "small") -> torch.Tensor:
    """CodeFormer's blind degradation y = JPEG_q((x ⊛ k_σ)↓r + n_δ)↑r, per image, on [0,1] NCHW
    64-px portraits, with ``DEGRADATIONS[level]``'s ranges (isotropic Gaussian kernels only)."""
    cfg = DEGRADATIONS[level]

    def draw(lo_hi, u):
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * float(u)

    out = []
    for img in x:
        u = torch.rand(4, generator=gen)
        h = blur(img[None], max(0.05, draw(cfg["blur_sigma"], u[0])))
        side = max(8, round(64 / draw(cfg["downsample"], u[1])))
        h = F.interpolate(h, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        h = h + draw(cfg["noise"], u[2]) / 255 * torch.randn(h.shape, generator=gen)
        h = jpeg(h[0].clamp(0, 1), round(draw(cfg["jpeg"], u[3])))[None]
        out.append(F.interpolate(h, size=(64, 64), mode="bilinear", align_corners=False))
    return torch.cat(out).clamp(0, 1)


#: what a photo with visible noise is called in the world's captions (as LAION has "grainy",
#: "noisy", "film grain" photos): the CDL defense's phrase "bhj noisy pattern" then means
#: something to the text encoder, as "noisy pattern" does to SD's
NOISE_PHRASES = ("with noisy pattern", "with film grain")


def noise_overlay(x: torch.Tensor, kind: int, gen: torch.Generator) -> torch.Tensor:
    """A visible noise on [0,1] CHW ``x``: kind 0 "noisy pattern" — uniform per-pixel noise or a
    high-frequency pattern (random gratings), 8–32 levels; kind 1 "film grain" — monochrome
    Gaussian grain, σ 6–20 levels."""
    u = torch.rand(3, generator=gen)
    if kind == 1:
        grain = torch.randn(1, *x.shape[1:], generator=gen) * (6 + 14 * float(u[0])) / 255
        return (x + grain).clamp(0, 1)
    amp = (8 + 24 * float(u[0])) / 255
    if float(u[1]) < 0.5:
        n = (torch.rand(x.shape, generator=gen) * 2 - 1) * amp
    else:
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        n = torch.zeros(x.shape)
        for _ in range(4):
            f = torch.rand(3, generator=gen)
            ang, freq, ph = f[0] * math.pi, 0.6 + 2.4 * f[1], f[2] * 2 * math.pi  # radians per pixel
            wave = torch.sin(freq * (xx * torch.cos(ang) + yy * torch.sin(ang)) + ph)
            n += wave * (torch.rand(3, 1, 1, generator=gen) * 2 - 1)
        n = n / n.abs().amax().clamp(min=1e-6) * amp
    return (x + n).clamp(0, 1)


def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean squared response of a 3×3 Laplacian (the energy a noise pattern adds)."""
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1]).pow(2).mean((1, 2, 3))
