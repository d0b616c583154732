"""IMPRESS (Cao et al., NeurIPS'23; AAAAAAsuka/Impress): purification by VAE consistency
(algorithms.md §2.11)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from benchbase.components import Context, Params, Purifier
from benchbase.errors import WeightsUnavailableError

from ._common import load_pretrained, quiet_diffusers, randn


def load_lpips(kind: str, device: torch.device):
    """LPIPS distance on [-1,1] inputs. ``"vgg"``: LPIPS-VGG v0.1 (the ``lpips`` package if
    installed, else pyiqa's implementation); ``"tiny"``: the offline random-weight stand-in."""
    if kind == "tiny":
        from ._tiny_models import TinyLPIPS

        return TinyLPIPS().to(device)
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
                '(or set `lpips = "tiny"` for the offline stand-in).') from None
        except Exception as exc:  # noqa: BLE001  (offline weight downloads fail)
            raise WeightsUnavailableError(
                f"LPIPS-{kind.upper()} weights are not available ({type(exc).__name__}): run once with internet "
                "access so torchvision's VGG16 and the LPIPS linear layers are cached under ~/.cache "
                '(or set `lpips = "tiny"` for the offline stand-in).') from None
    except Exception as exc:  # noqa: BLE001  (third-party loaders raise anything)
        raise WeightsUnavailableError(
            f"LPIPS-{kind.upper()} weights are not available ({type(exc).__name__}): run once with internet access "
            'so torchvision\'s VGG16 weights are cached (or set `lpips = "tiny"` for the offline stand-in).') from None
    net = net.to(device).eval().requires_grad_(False)

    class _Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, a, b):
            return fn(a, b)

    return _Wrap()


class IMPRESS(Purifier):
    """IMPRESS: starting from x_p = x_adv + N(0, 0.1²) (in [-1,1]), minimise
    ``MSE(D(E(x_p).mode()), x_p) + α·max(LPIPS_vgg(x_p, x_adv) − Δ, 0)`` with Adam (lr 0.01,
    eps 1e-5), cosine annealing to 1e-5 over the iterations, clamping to [-1,1] after each
    step. Defaults: 3000 iterations, Δ = 0.1, α = 0.1 (DiffShortcut's ``impress`` stage).

    ``vae``: ``"backend"`` (default) uses the backend's VAE (SD-2.1-base in the protocol, the
    VAE the reference uses), or a diffusers folder / hub id holding a ``vae/`` subfolder.
    The reference runs fp16 and truncates to uint8 on save; this runs in ``ctx.dtype`` and
    the core rounds.
    """

    class Params(Params):
        iterations: int = Field(3000, ge=1)
        lr: float = 0.01
        lr_min: float = 1e-5
        bound: float = Field(0.1, ge=0, description="Δ (pur_eps): LPIPS budget to the input")
        weight: float = Field(0.1, ge=0, description="α (pur_alpha): weight of the LPIPS hinge")
        init_noise: float = Field(0.1, ge=0)
        vae: str = "backend"
        lpips: Literal["vgg", "alex", "tiny"] = "vgg"
        batch_size: int = Field(4, ge=1)

    def _vae(self, ctx: Context):
        if self.params.vae == "backend":
            return ctx.models().vae
        from diffusers import AutoencoderKL

        def load(path: str, local_only: bool):
            with quiet_diffusers():
                return AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=local_only)

        return load_pretrained("VAE", self.params.vae, load).to(ctx.device, ctx.dtype).requires_grad_(False).eval()

    def purify(self, images: torch.Tensor, ctx: Context) -> torch.Tensor:
        p = self.params
        vae = self._vae(ctx)
        lpips = load_lpips(p.lpips, ctx.device)
        outs, losses = [], []
        for start in range(0, len(images), p.batch_size):
            x_adv = images[start:start + p.batch_size].to(ctx.device, torch.float32) * 2 - 1
            x_p = (x_adv + randn(x_adv.shape, ctx) * p.init_noise).clamp(-1, 1).requires_grad_(True)
            opt = torch.optim.Adam([x_p], lr=p.lr, eps=1e-5)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.iterations, eta_min=p.lr_min)
            for _ in ctx.progress(range(p.iterations), desc="impress", leave=False):
                with torch.enable_grad():
                    recon = vae.decode(vae.encode(x_p.to(vae.dtype)).latent_dist.mode()).sample.float()
                    consistency = (recon - x_p).pow(2).mean()
                    hinge = (lpips(x_p, x_adv) - p.bound).clamp(min=0).mean()
                    loss = consistency + p.weight * hinge
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x_p.clamp_(-1, 1)
            losses.append(float(loss.detach()))
            outs.append(((x_p.detach() + 1) / 2).clamp(0, 1))
        ctx.info.setdefault("impress", {})["final_loss"] = losses
        return torch.cat(outs).to(images.device, images.dtype)
