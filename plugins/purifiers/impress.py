"""IMPRESS (Cao et al., NeurIPS'23; AAAAAAsuka/Impress): purification by VAE consistency."""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from benchbase.components import Context, Params, Purifier
from benchbase.errors import WeightsUnavailableError

from ._common import load_pretrained, quiet_diffusers, randn


def _backbone_cached_or_unavailable(kind: str) -> None:
    """Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set), say at once that torchvision's
    ImageNet backbone is not cached instead of letting torchvision try to download it."""
    import os
    from pathlib import Path

    if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")):
        return
    try:
        from torchvision import models
    except ImportError:
        return  # the loaders below say what is missing
    weights = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}.get(kind)
    if weights is None:
        return
    url = getattr(models, weights).IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise WeightsUnavailableError(
            f"unavailable: LPIPS-{kind.upper()} needs torchvision's ImageNet {weights.split('_')[0]} weights at {path} "
            f"(offline: not downloaded; fetch {url} there, or use an offline stand-in: `benchbase ls models`)")


def load_lpips(kind: str, device: torch.device):
    """The ``lpips`` role's ``vgg`` / ``alex``: LPIPS-VGG (-AlexNet) v0.1 distance on [-1,1] inputs
    (the ``lpips`` package if installed, else pyiqa's implementation)."""
    _backbone_cached_or_unavailable(kind)
    try:
        import lpips  # type: ignore

        net = lpips.LPIPS(net=kind, verbose=False)
        fn = lambda a, b: net(a, b).flatten()
    except ImportError:
        try:
            from pyiqa.archs.lpips_arch import LPIPS

            net = LPIPS(net=kind, version="0.1", pretrained=True)
            fn = lambda a, b: net(a, b, normalize=False).flatten()
        except ImportError:
            raise WeightsUnavailableError(
                f"LPIPS-{kind.upper()} needs the `lpips` or `pyiqa` package; install one of them "
                '(or an offline stand-in: `benchbase ls models`).') from None
        except Exception as exc:  # noqa: BLE001  (offline weight downloads fail)
            raise WeightsUnavailableError(
                f"LPIPS-{kind.upper()} weights are not available ({type(exc).__name__}): run once with internet "
                "access so torchvision's VGG16 and the LPIPS linear layers are cached under ~/.cache "
                '(or an offline stand-in: `benchbase ls models`).') from None
    except Exception as exc:  # noqa: BLE001  (third-party loaders raise anything)
        raise WeightsUnavailableError(
            f"LPIPS-{kind.upper()} weights are not available ({type(exc).__name__}): run once with internet access "
            'so torchvision\'s VGG16 weights are cached (or an offline stand-in: `benchbase ls models`).') from None
    net = net.to(device).eval().requires_grad_(False)

    class _Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, a, b):
            return fn(a, b)

    return _Wrap()


class IMPRESS(Purifier):
    """IMPRESS (Cao et al., NeurIPS'23) as released: AAAAAAsuka/Impress ``impress.py``, called as
    DiffShortcut's ``defenses/impress.py`` (and IMPRESS's ``glaze_pur.py``) call it.

    Starting from x_p = x_adv + N(0, 0.1²) in [-1,1] (not clamped before the first step, as
    released), minimise, for each image,
    ``MSE(D(E(x_p).mode()), x_p) + α·max(LPIPS_vgg(x_p, x_adv) − Δ, 0)`` with Adam (lr 0.01,
    eps 1e-5), cosine annealing to 1e-5 over the iterations, clamping x_p to [-1,1] after each
    step. Defaults: 3000 iterations, Δ = 0.1, α = 0.1, noise 0.1 (DiffShortcut's call).

    One image at a time, as the reference: the loss of a batch is the **sum** of the
    per-image losses, so every image follows its own single-image trajectory and the result
    does not depend on ``batch_size`` (a mean over the batch would divide each image's
    gradient by the batch size, and with gradients far below Adam's eps the step shrinks with
    it). ``precision = "float16"`` (default) runs the VAE, x_p and Adam's state in half
    precision as the release does (``.half()`` inputs, the VAE loaded in float16); LPIPS runs in
    float32 on the promoted inputs, as the ``lpips`` package does with float16 inputs. Many
    per-pixel Adam updates then fall below half a float16 ulp and round away (see
    docs/purifiers.md). ``"float32"`` is the same algorithm without that rounding. Half
    precision runs on CPU too, but several times slower than float32.

    ``vae``: ``"backend"`` (default) uses the backend's VAE (SD-2.1-base in the protocol, the
    VAE the reference uses), or a diffusers folder / hub id holding a ``vae/`` subfolder.
    The reference truncates to uint8 on save; the core rounds.
    ``lpips``: a registered ``lpips`` model (``vgg``, the reference's; ``alex``; stand-ins:
    ``benchbase ls models``; ``"auto"``: the backend's default).
    """

    model_roles: ClassVar[dict[str, str]] = {"lpips": "lpips"}

    class Params(Params):
        iterations: int = Field(3000, ge=1)
        lr: float = Field(0.01, gt=0)
        lr_min: float = Field(1e-5, ge=0)
        bound: float = Field(0.1, ge=0, description="Δ (pur_eps): LPIPS budget to the input")
        weight: float = Field(0.1, ge=0, description="α (pur_alpha): weight of the LPIPS hinge")
        init_noise: float = Field(0.1, ge=0)
        vae: str = "backend"
        lpips: str = "vgg"
        precision: Literal["float16", "float32"] = "float16"
        batch_size: int = Field(1, ge=1, description="images optimised together (the reference: one)")

    def _vae(self, ctx: Context, dtype: torch.dtype):
        if self.params.vae == "backend":
            vae = ctx.models().vae
            # a private copy in the working precision: the backend's VAE is shared with other stages
            return copy.deepcopy(vae).to(ctx.device, dtype) if vae.dtype != dtype else vae
        from diffusers import AutoencoderKL

        def load(path: str, local_only: bool):
            with quiet_diffusers():
                return AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=local_only)

        return load_pretrained("VAE", self.params.vae, load).to(ctx.device, dtype).requires_grad_(False).eval()

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        dtype = torch.float16 if p.precision == "float16" else torch.float32
        vae = self._vae(ctx, dtype)
        model = ctx.find_model("lpips", p.lpips)
        lpips = model.load()(model.name, ctx.device)
        # all the noise is drawn up front, so each image gets the same noise whatever the batching
        noise = randn(images.shape, ctx) * p.init_noise
        outs, losses = [], []
        for start in range(0, len(images), p.batch_size):
            x_adv = (images[start:start + p.batch_size].to(ctx.device, torch.float32) * 2 - 1).to(dtype)
            # the release adds float32 noise cast to half and does not clamp before the first step
            x_p = (x_adv + noise[start:start + p.batch_size].to(dtype)).requires_grad_(True)
            opt = torch.optim.Adam([x_p], lr=p.lr, eps=1e-5)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.iterations, eta_min=p.lr_min)
            for _ in ctx.progress(range(p.iterations), desc="impress", leave=False):
                with torch.enable_grad():
                    recon = vae.decode(vae.encode(x_p).latent_dist.mode()).sample
                    # LPIPS in float32: the lpips package promotes float16 inputs the same way
                    dist = lpips(x_p.float(), x_adv.float()).flatten()
                    per_image = [F.mse_loss(recon[i], x_p[i]) + p.weight * (dist[i] - p.bound).clamp(min=0)
                                 for i in range(len(x_p))]
                    loss = torch.stack(per_image).sum()  # a sum: each image keeps its own gradient
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x_p.clamp_(-1, 1)
            losses += [round(float(v.detach()), 6) for v in per_image]
            outs.append(((x_p.detach().float() + 1) / 2).clamp(0, 1))
        ctx.info.setdefault("impress", {}).update({"final_loss": losses, "precision": p.precision})
        return torch.cat(outs).to(images.device, images.dtype)
