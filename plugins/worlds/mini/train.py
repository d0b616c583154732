"""Train the benchbase-mini world's models (``benchbase train-mini``).

Stages, in order (each resumable: a finished stage's weight file is kept, an unfinished
one resumes from its last checkpoint in the work folder):

1. ``data``: render the training portraits (``train-<k>`` identities × images, random
   nuisances) with captions, and background-only images (the detector's negatives, CLIP's
   non-person images). Held-out identities are never rendered here.
2. ``face``: face embedder (CosFace over the training identities, noise/blur/brightness
   augmentation) and face detector (portrait vs background / patch-shuffled portrait /
   random blobs; box and landmark regression on portraits). First, because they need only
   the data and they are what judges the generative models.
3. ``clip``: open_clip CLIP, symmetric InfoNCE on (image, full identity caption) pairs, 10 %
   of them backgrounds with "a photo of a <colour> <texture> wall".
4. ``vae``: AutoencoderKL, L2 + L1 reconstruction + KL with Stable Diffusion's weight (1e-6
   against a pixel-summed reconstruction loss, so the encoder is as unregularised, and as
   easy to push around, as SD's); then the latent scaling factor is set to 1/std of the
   training latents (as SD's 0.18215 was chosen).
5. ``unet``: text encoder and UNet trained jointly on latents with ε-prediction over SD's
   scaled-linear 1000-step schedule; captions are the photo's full caption (every attribute,
   expression, shirt and wall colour; 70 %), a random subset of the person's attributes
   (10 %), the class prompt "a photo of person" (10 %) or empty (10 %, for classifier-free
   guidance). The shipped weights are the exponential moving average of the trained ones.
6. ``upscaler``: x4 upscaler UNet (16-px low-res image + 16×16 latents, noise-level class
   embedding, v-prediction), text encoder frozen.

Everything is seeded; the losses of every stage go to ``world.json`` (the model card reads
them). On 2 CPU cores the whole run takes about two hours.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchbase.images import from_uint8
from benchbase_plugins.worlds.mini import models as M
from benchbase_plugins.worlds.mini import portraits as P

DEFAULTS = {
    "seed": 0,
    "train_identities": 1000,
    "images_per_identity": 16,
    "backgrounds": 2000,
    "vae_steps": 2500, "vae_batch": 16, "vae_lr": 1e-3,
    # the UNet's learning-rate schedule is laid out over 5000 steps and training stops at 2000:
    # chosen on clean data only (model card, "Clean check"): the EMA weights at step 2000 are
    # personalised by the mini DreamBooth recipe (ISM 0.69, 3 held-out people) and those at 5000
    # are not (0.28) -- longer training made the world harder to personalise
    "unet_steps": 2000, "unet_schedule_steps": 5000, "unet_batch": 32, "unet_lr": 5e-4, "unet_ema": 0.999,
    "upscaler_steps": 800, "upscaler_batch": 32, "upscaler_lr": 5e-4,
    "clip_steps": 800, "clip_batch": 128, "clip_lr": 1e-3,
    "face_steps": 1000, "face_batch": 64, "face_lr": 2e-3,
    "detector_steps": 400, "detector_batch": 64, "detector_lr": 2e-3,
    "heldout_eval_identities": 64,
}
SEEDS = {"text_embedding": 1001, "clip_embedding": 1002}
CLASS_PROMPT = "a photo of person"
# face and clip first: they need only the data, and the face models judge the generative ones
STAGES = ("data", "face", "clip", "vae", "unet", "upscaler")
KL_WEIGHT = 1e-6  # Stable Diffusion's autoencoder (relative to a pixel-summed reconstruction loss)


def log(msg: str) -> None:
    print(msg, flush=True)


def _render_chunk(args):
    names, k = args
    imgs, boxes, lms, caps, subsets = [], [], [], [], []
    for name in names:
        ident = P.identity(name)
        for s in range(k):
            pt = P.render(ident, s)
            imgs.append(np.asarray(pt.image))
            boxes.append(pt.box)
            lms.append(pt.landmarks)
            caps.append(P.scene_caption(ident, pt.nuisance))
            subsets.append(P.caption(ident, np.random.default_rng([int(name.split("-")[1]), s])))
    return np.stack(imgs), np.stack(boxes), np.stack(lms), caps, subsets


def render_set(names: list[str], k: int, workers: int = 2) -> dict:
    from multiprocessing import get_context

    chunks = [(names[i:i + 25], k) for i in range(0, len(names), 25)]
    from tqdm.auto import tqdm

    with get_context("spawn").Pool(workers) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, chunks), total=len(chunks), desc="render portraits"))
    return {"images": np.concatenate([p[0] for p in parts]), "boxes": np.concatenate([p[1] for p in parts]),
            "landmarks": np.concatenate([p[2] for p in parts]), "captions": sum((p[3] for p in parts), []),
            "subset_captions": sum((p[4] for p in parts), []),
            "identity": np.repeat(np.arange(len(names)), k)}


FRAGILITY_EPS = 6.375  # levels: Anti-DreamBooth's budget, 0.05 in [-1, 1]


def vae_fragility(vae, images: torch.Tensor, eps_levels: float = FRAGILITY_EPS, steps: int = 100,
                  step_levels: float = 0.5, seed: int = 0) -> dict:
    """How far an L∞ perturbation of ``eps_levels`` moves the encoder's posterior mean, relative
    to the clean one (‖μ(x+δ) − μ(x)‖ / ‖μ(x)‖, mean over ``images`` in [0, 1]): PGD (sign steps
    of ``step_levels`` maximising ‖μ(x+δ) − μ(x)‖₂ from a uniform random start) against uniform
    noise of the same budget, both rounded to 8 bits within the budget like a protected PNG.
    Latent-space protections rely on this amplification; Stable Diffusion's encoder is known to
    be the weak point (Xue et al., ICLR'24)."""
    from benchbase.images import quantize_to_budget

    eps, gen = eps_levels / 255, torch.Generator().manual_seed(seed)
    mean = lambda x: vae.encode(x * 2 - 1).latent_dist.mean  # noqa: E731
    with torch.no_grad():
        mu0 = mean(images)

    def shift(x):
        with torch.no_grad():
            return ((mean(x) - mu0).flatten(1).norm(dim=1) / mu0.flatten(1).norm(dim=1))

    noise = quantize_to_budget(images + (torch.rand(images.shape, generator=gen) * 2 - 1) * eps, images, eps_levels)
    start = (torch.rand(images.shape, generator=gen) * 2 - 1) * eps
    delta = ((images + start).clamp(0, 1) - images).requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad((mean(images + delta) - mu0).flatten(1).norm(dim=1).sum(), delta)
        with torch.no_grad():
            delta += step_levels / 255 * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((images + delta).clamp(0, 1) - images)
    pgd = quantize_to_budget(images + delta.detach(), images, eps_levels)
    a, b = shift(pgd), shift(noise)
    return {"vae_latent_shift_pgd": round(a.mean().item(), 4), "vae_latent_shift_pgd_sd": round(a.std().item(), 4),
            "vae_latent_shift_noise": round(b.mean().item(), 4),
            "vae_latent_shift_noise_sd": round(b.std().item(), 4),
            "vae_latent_shift_images": len(images), "vae_latent_shift_eps_levels": eps_levels}


class Trainer:
    stages = STAGES  # a world version's stages, in order (the model card is written when all are done)

    def write_card(self) -> None:
        write_model_card(self.out, self.info)

    def __init__(self, out: Path, work: Path, cfg: dict):
        self.out, self.work, self.cfg = out, work, cfg
        self.work.mkdir(parents=True, exist_ok=True)
        self.info_path = out / "world.json"
        self.info = json.loads(self.info_path.read_text()) if self.info_path.is_file() else {}
        self.info["config"] = cfg
        self.info.setdefault("seeds", SEEDS)
        self.info.setdefault("losses", {})
        self.info.setdefault("eval", {})
        self._data = None
        self.tokenizer = M.clip_tokenizer()

    # ------------------------------------------------------------------ bookkeeping
    def save_info(self) -> None:
        self.info_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info, indent=1))
        tmp.replace(self.info_path)

    def done(self, stage: str) -> bool:
        return stage in self.info.get("stages_done", [])

    def mark(self, stage: str, seconds: float) -> None:
        self.info.setdefault("stages_done", []).append(stage)
        self.info.setdefault("seconds", {})[stage] = round(seconds, 1)
        self.save_info()

    def generator(self, stage: str) -> torch.Generator:
        order = ("data", "vae", "unet", "upscaler", "clip", "face", "detector")
        return torch.Generator().manual_seed(self.cfg["seed"] * 1000 + order.index(stage))

    def loop(self, stage: str, steps: int, modules: dict, opt, step_fn, every: int = 100):
        """Run ``step_fn(step, gen) -> dict of losses`` ``steps`` times with checkpoints to resume."""
        from tqdm.auto import tqdm

        ckpt = self.work / f"{stage}.ckpt"
        start, history, spent = 0, [], 0.0
        t0 = time.time()
        gen = self.generator(stage)
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain values only
            for k, m in modules.items():
                m.load_state_dict(state["modules"][k])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start, history, spent = state["step"], state["history"], state.get("seconds", 0.0)
            log(f"[{stage}] resuming at step {start}")
        window: dict[str, list[float]] = {}
        bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps)
        for step in bar:
            losses = step_fn(step, gen)
            for k, v in losses.items():
                window.setdefault(k, []).append(v)
            if (step + 1) % 25 == 0:
                bar.set_postfix({k: f"{np.mean(v[-25:]):.4f}" for k, v in window.items()})
            if (step + 1) % every == 0 or step + 1 == steps:
                row = {"step": step + 1, **{k: round(float(np.mean(v)), 5) for k, v in window.items()}}
                history.append(row)
                log(f"[{stage}] " + " ".join(f"{k}={v}" for k, v in row.items()))
                window = {}
                torch.save({"modules": {k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(),
                            "gen": gen.get_state(), "step": step + 1, "history": history,
                            "seconds": spent + time.time() - t0}, ckpt)
        self.info["losses"][stage] = history
        # time of the training loop summed over resumed runs
        self.info.setdefault("loop_seconds", {})[stage] = round(spent + time.time() - t0, 1)
        return history

    # ------------------------------------------------------------------ data
    def data(self) -> dict:
        if self._data is None:
            path = self.work / "data.npz"
            if not path.is_file():
                # a resumed run on a new machine: the weights folder says "data" is done but the
                # work folder is gone; rendering is seeded, so render the same data again
                log("[data] the work folder has no data.npz: rendering it again (seeded, identical)")
                self.stage_data()
            z = np.load(path, allow_pickle=False)
            self._data = {k: z[k] for k in z.files}
        return self._data

    def stage_data(self) -> None:
        cfg = self.cfg
        names = P.train_names(cfg["train_identities"])
        d = render_set(names, cfg["images_per_identity"])
        n_bg = min(cfg["backgrounds"], 2 * cfg["train_identities"])
        bgs = np.stack([np.asarray(P.background(s)) for s in range(n_bg)])
        bg_caps = [P.background_caption(s) for s in range(n_bg)]
        ids, subset_ids = (self.tokenizer(d[k], padding="max_length", max_length=77, truncation=True,
                                          return_tensors="np").input_ids for k in ("captions", "subset_captions"))
        import open_clip

        full = [P.caption(P.identity(n)) for n in names]
        clip_ids = open_clip.tokenize(full).numpy()
        clip_bg = open_clip.tokenize(bg_caps).numpy()
        heldout = self.eval_names()
        h = render_set(heldout, 4)
        tmp = self.work / "data.tmp.npz"
        np.savez(tmp, images=d["images"], boxes=d["boxes"].astype(np.float32),
                 landmarks=d["landmarks"].astype(np.float32), identity=d["identity"], caption_ids=ids,
                 subset_ids=subset_ids,
                 clip_ids=clip_ids, backgrounds=bgs, clip_bg=clip_bg, heldout_images=h["images"],
                 heldout_identity=h["identity"],
                 heldout_clip_ids=open_clip.tokenize([P.caption(P.identity(n)) for n in heldout]).numpy())
        tmp.replace(self.work / "data.npz")
        self.info["data"] = {"train_images": int(len(d["images"])), "backgrounds": int(len(bgs)),
                             "example_captions": d["captions"][:2] + d["subset_captions"][:1],
                             "generator_version": P.GENERATOR_VERSION}

    def eval_names(self) -> list[str]:
        """The held-out identities the trainer's own figures are measured on."""
        return P.heldout_names(self.cfg["heldout_eval_identities"])

    @staticmethod
    def to_float(u8: np.ndarray) -> torch.Tensor:
        # contiguous: channels-last views crash some CPU conv backward kernels
        return from_uint8(u8).contiguous()

    def batch_idx(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, n, (size,), generator=gen)

    # ------------------------------------------------------------------ VAE
    def stage_vae(self) -> None:
        cfg, d = self.cfg, self.data()
        torch.manual_seed(cfg["seed"])
        vae = M.build_vae()
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg["vae_lr"], weight_decay=0.0)
        images = d["images"]

        def step(i, gen):
            # constant for the first third, then cosine to 0 (sharper reconstructions at the end)
            third = cfg["vae_steps"] / 3
            frac = max(0.0, (i - third) / (cfg["vae_steps"] - third))
            for g in opt.param_groups:
                g["lr"] = cfg["vae_lr"] * 0.5 * (1 + math.cos(math.pi * frac))
            x = self.to_float(images[self.batch_idx(len(images), cfg["vae_batch"], gen).numpy()]) * 2 - 1
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
            l2, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
            kl_sum = post.kl().mean()  # summed over the latent, mean over the batch
            kl = kl_sum / post.mean[0].numel()  # logged per latent dimension
            # SD's autoencoder: reconstruction summed over pixels + 1e-6 · KL summed over the latent.
            # Our reconstruction terms are pixel means, so the KL is divided by the pixel count too.
            loss = l2 + l1 + KL_WEIGHT * kl_sum / x[0].numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"l2": l2.item(), "l1": l1.item(), "kl": kl.item()}

        self.loop("vae", cfg["vae_steps"], {"vae": vae}, opt, step)
        vae.eval()
        with torch.no_grad():
            sample = self.to_float(images[:: max(1, len(images) // 1024)]) * 2 - 1
            lat = torch.cat([vae.encode(sample[i:i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
            scale = float(1.0 / lat.std())
            held = self.to_float(d["heldout_images"]) * 2 - 1
            rec = torch.cat([vae.decode(vae.encode(held[i:i + 64]).latent_dist.mean).sample
                             for i in range(0, len(held), 64)])
            mse = F.mse_loss((rec.clamp(-1, 1) + 1) / 2, (held + 1) / 2).item()
        self.info["vae_scaling_factor"] = scale
        self.info["eval"]["vae_heldout_psnr_db"] = round(10 * math.log10(1 / mse), 2)
        log(f"[vae] scaling factor {scale:.4f}, held-out reconstruction PSNR {10 * math.log10(1 / mse):.2f} dB")
        # one image of each of 16 held-out people
        frag = vae_fragility(vae.requires_grad_(False), self.to_float(d["heldout_images"][::4][:16]))
        self.info["eval"].update(frag)
        log(f"[vae] relative latent shift at {FRAGILITY_EPS} levels: PGD {frag['vae_latent_shift_pgd']}, "
            f"uniform noise {frag['vae_latent_shift_noise']}")
        M.save_weights(self.out / "vae.safetensors", vae.state_dict())

    def load_vae(self):
        return M.load_vae(self.out).eval().requires_grad_(False)

    def latents(self) -> torch.Tensor:
        path = self.work / "latents.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        vae, images = self.load_vae(), self.data()["images"]
        with torch.no_grad():
            lat = torch.cat([vae.encode(self.to_float(images[i:i + 128]) * 2 - 1).latent_dist.mean
                             for i in range(0, len(images), 128)]) * vae.config.scaling_factor
        torch.save(lat, path)
        return lat

    # ------------------------------------------------------------------ UNet + text encoder
    def class_and_empty_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer([CLASS_PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return ids[0], ids[1]

    def caption_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """70 % the photo's full caption, 10 % a random subset of the person's attributes,
        10 % the class prompt, 10 % empty (classifier-free guidance)."""
        d = self.data()
        ids = torch.from_numpy(d["caption_ids"][idx.numpy()]).long()
        cls, empty = self.class_and_empty_ids()
        u = torch.rand(len(idx), generator=gen)
        subset = u < 0.3
        ids[subset] = torch.from_numpy(d["subset_ids"][idx[subset].numpy()]).long()
        ids[u < 0.2] = cls
        ids[u < 0.1] = empty
        return ids

    def unet_batch(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(clean latents, caption ids or None) of a UNet step, drawn before the step's noise.
        v2 draws its captions after the noise (None here: ``caption_batch`` then); v3 swaps in
        noisy portraits with their captions first."""
        return self._latents[idx], None

    def unet_step_done(self, step: int, ema_te, ema_unet) -> None:
        """After each UNet step (v3 saves EMA snapshots here)."""

    def unet_finish(self, ema_te, ema_unet) -> None:
        M.save_weights(self.out / "text_encoder.safetensors", ema_te.state_dict(), SEEDS["text_embedding"])
        M.save_weights(self.out / "unet.safetensors", ema_unet.state_dict())

    def stage_unet(self) -> None:
        from diffusers import DDPMScheduler

        cfg = self.cfg
        lat = self._latents = self.latents()
        torch.manual_seed(cfg["seed"] + 1)
        te = M.build_text_encoder(self.tokenizer)
        M.init_embedding(te.get_input_embeddings(), SEEDS["text_embedding"])
        unet = M.build_unet()
        sched = DDPMScheduler.from_config(M.sd_scheduler().config)
        emb_params = list(te.get_input_embeddings().parameters())
        others = [p for p in list(te.parameters()) + list(unet.parameters()) if all(p is not e for e in emb_params)]
        # no weight decay anywhere: untouched embedding rows must stay at their seeded init
        opt = torch.optim.AdamW([{"params": others}, {"params": emb_params}], lr=cfg["unet_lr"], weight_decay=0.0)
        # the shipped weights are an exponential moving average of the trained ones (as diffusion
        # models are released): much cleaner samples than the last iterate after a short training
        ema_te, ema_unet = copy.deepcopy(te).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
        pairs = [(e, p) for ema, live in ((ema_te, te), (ema_unet, unet))
                 for e, p in zip(ema.parameters(), live.parameters())]
        warm = 200

        def step(i, gen):
            # warm-up, then cosine from unet_lr down to a tenth of it
            frac = max(0.0, (i - warm) / max(1, cfg.get("unet_schedule_steps", cfg["unet_steps"]) - warm))
            for g in opt.param_groups:
                g["lr"] = cfg["unet_lr"] * min(1.0, (i + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            idx = self.batch_idx(len(lat), cfg["unet_batch"], gen)
            z0, ids = self.unet_batch(idx, gen)
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=gen)
            zt = sched.add_noise(z0, noise, t)
            h = te(ids if ids is not None else self.caption_batch(idx, gen))[0]
            loss = F.mse_loss(unet(zt, t, h).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(others, 1.0)
            opt.step()
            decay = min(cfg["unet_ema"], (1 + i) / (10 + i))
            with torch.no_grad():
                for e, p in pairs:  # lerp leaves untouched embedding rows bit-exact (sparse storage)
                    e.lerp_(p, 1 - decay)
            self.unet_step_done(i, ema_te, ema_unet)
            return {"mse": loss.item()}

        self.loop("unet", cfg["unet_steps"], {"te": te, "unet": unet, "ema_te": ema_te, "ema_unet": ema_unet},
                  opt, step)
        self.unet_finish(ema_te, ema_unet)

    def load_text_encoder(self):
        return M.load_text_encoder(self.out, self.tokenizer)[1].eval().requires_grad_(False)

    # ------------------------------------------------------------------ x4 upscaler
    def stage_upscaler(self) -> None:
        cfg, d = self.cfg, self.data()
        lat = self.latents()
        te = self.load_text_encoder()
        torch.manual_seed(cfg["seed"] + 2)
        unet = M.build_upscaler_unet()
        sched, low_sched = M.upscaler_schedulers()
        from diffusers import DDPMScheduler

        train_sched = DDPMScheduler.from_config(sched.config)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg["upscaler_lr"], weight_decay=0.0)
        images = d["images"]
        low_side = M.RESOLUTION // M.LATENT_SCALE

        def step(i, gen):
            idx = self.batch_idx(len(lat), cfg["upscaler_batch"], gen)
            z0 = lat[idx]
            x = self.to_float(images[idx.numpy()]) * 2 - 1
            low = F.interpolate(x, size=(low_side, low_side), mode="bicubic", align_corners=False).clamp(-1, 1)
            level = torch.randint(0, 351, (len(idx),), generator=gen)
            low = low_sched.add_noise(low, torch.randn(low.shape, generator=gen), level)
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, train_sched.config.num_train_timesteps, (len(z0),), generator=gen)
            zt = train_sched.add_noise(z0, noise, t)
            with torch.no_grad():
                h = te(self.caption_batch(idx, gen))[0]
            pred = unet(torch.cat([zt, low], 1), t, h, class_labels=level).sample
            loss = F.mse_loss(pred, train_sched.get_velocity(z0, noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            return {"v_mse": loss.item()}

        self.loop("upscaler", cfg["upscaler_steps"], {"unet": unet}, opt, step)
        M.save_weights(self.out / "upscaler.safetensors", unet.state_dict())

    # ------------------------------------------------------------------ CLIP
    def stage_clip(self) -> None:
        cfg, d = self.cfg, self.data()
        torch.manual_seed(cfg["seed"] + 3)
        model = M.build_clip()
        M.init_embedding(model.token_embedding, SEEDS["clip_embedding"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["clip_lr"], weight_decay=0.0)
        mean = torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
        images, ident, clip_ids = d["images"], d["identity"], d["clip_ids"]
        bgs, bg_ids = d["backgrounds"], d["clip_bg"]
        warm = 50

        def step(i, gen):
            for g in opt.param_groups:
                g["lr"] = cfg["clip_lr"] * min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / cfg["clip_steps"]))
            n_bg = cfg["clip_batch"] // 10
            # distinct identities in a batch: one image each (in-batch negatives are other people)
            people = torch.randperm(int(ident.max()) + 1, generator=gen)[: cfg["clip_batch"] - n_bg].numpy()
            k = torch.randint(0, cfg["images_per_identity"], (len(people),), generator=gen).numpy()
            rows = people * cfg["images_per_identity"] + k
            b = self.batch_idx(len(bgs), n_bg, gen).numpy()
            x = torch.cat([self.to_float(images[rows]), self.to_float(bgs[b])])
            t = torch.from_numpy(np.concatenate([clip_ids[people], bg_ids[b]])).long()
            fi = F.normalize(model.encode_image((x - mean) / std), dim=-1)
            ft = F.normalize(model.encode_text(t), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * fi @ ft.T
            target = torch.arange(len(x))
            # the same wall caption can appear twice among backgrounds: soft targets over equal captions
            same = (t[:, None] == t[None, :]).all(-1).float()
            same = same / same.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-same * logits.log_softmax(1), 1).mean()
                          + torch.sum(-same * logits.log_softmax(0).T, 1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = (logits.argmax(1) == target).float().mean().item()
            return {"loss": loss.item(), "acc": acc}

        self.loop("clip", cfg["clip_steps"], {"clip": model}, opt, step)
        model.eval()
        with torch.no_grad():
            x = self.to_float(d["heldout_images"][::4])  # one image per held-out identity
            fi = F.normalize(model.encode_image((x - mean) / std), dim=-1)
            ft = F.normalize(model.encode_text(torch.from_numpy(d["heldout_clip_ids"]).long()), dim=-1)
            acc = (fi @ ft.T).argmax(1).eq(torch.arange(len(x))).float().mean().item()
        self.info["eval"]["clip_heldout_image_to_caption_top1"] = round(acc, 4)
        self.info["eval"]["clip_heldout_candidates"] = len(x)
        log(f"[clip] held-out image→caption top-1 among {len(x)}: {acc:.3f}")
        M.save_weights(self.out / "clip.safetensors", model.state_dict(), SEEDS["clip_embedding"])

    # ------------------------------------------------------------------ face embedder + detector
    @staticmethod
    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(x)
        x = x * (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen))
        blur = torch.rand(n, generator=gen) < 0.3
        if blur.any():
            k = torch.tensor([1.0, 2.0, 1.0])
            k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
            x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
        sigma = 0.05 * torch.rand(n, 1, 1, 1, generator=gen)
        return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)

    def negatives(self, n: int, gen: torch.Generator) -> torch.Tensor:
        d = self.data()
        kind = torch.randint(0, 3, (n,), generator=gen)
        bgs = self.to_float(d["backgrounds"][self.batch_idx(len(d["backgrounds"]), n, gen).numpy()])
        people = self.to_float(d["images"][self.batch_idx(len(d["images"]), n, gen).numpy()])
        out = bgs.clone()
        for i in range(n):
            if kind[i] == 1:  # a portrait cut into 16-px tiles, shuffled: colours of a face, no face
                tiles = people[i].unfold(1, 16, 16).unfold(2, 16, 16).reshape(3, 16, 16, 16)
                perm = torch.randperm(16, generator=gen)
                tiles = tiles[:, perm].reshape(3, 4, 4, 16, 16).permute(0, 1, 3, 2, 4).reshape(3, 64, 64)
                out[i] = tiles
            elif kind[i] == 2:  # random coloured blobs on a background
                yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
                for _ in range(int(torch.randint(2, 7, (1,), generator=gen))):
                    c = torch.rand(3, generator=gen)
                    cx, cy, rx, ry = (torch.rand(4, generator=gen) * torch.tensor([64, 64, 20, 20]) + torch.tensor([0, 0, 4, 4]))
                    m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) < 1
                    out[i][:, m] = c[:, None]
        return out

    def stage_face(self) -> None:
        cfg, d = self.cfg, self.data()
        torch.manual_seed(cfg["seed"] + 4)
        emb = M.FaceEmbedderNet()
        n_id = int(d["identity"].max()) + 1
        weight = torch.nn.Parameter(torch.randn(n_id, emb.head[0].out_features) * 0.01)
        opt = torch.optim.AdamW(list(emb.parameters()) + [weight], lr=cfg["face_lr"], weight_decay=5e-4)
        images, ident = d["images"], torch.from_numpy(d["identity"]).long()
        s, m = 30.0, 0.2

        def step(i, gen):
            for g in opt.param_groups:
                g["lr"] = cfg["face_lr"] * 0.5 * (1 + math.cos(math.pi * i / cfg["face_steps"]))
            idx = self.batch_idx(len(images), cfg["face_batch"], gen)
            x = self.augment(self.to_float(images[idx.numpy()]), gen)
            e = emb(x)
            cos = e @ F.normalize(weight, dim=-1).T
            y = ident[idx]
            logits = s * (cos - m * F.one_hot(y, n_id))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"cosface": loss.item(), "acc": (cos.argmax(1) == y).float().mean().item()}

        self.loop("face", cfg["face_steps"], {"emb": emb, "w": torch.nn.ParameterList([weight])}, opt, step)
        emb.eval()
        with torch.no_grad():
            e = emb(self.to_float(d["heldout_images"]))
            hid = torch.from_numpy(d["heldout_identity"])
            sim = e @ e.T
            same = (hid[:, None] == hid[None, :]) & ~torch.eye(len(hid), dtype=torch.bool)
            diff = hid[:, None] != hid[None, :]
            # verification on held-out identities: a same pair beats a different pair (AUC)
            sp, dp = sim[same], sim[diff]
            auc = (sp[:, None] > dp[None, torch.randperm(len(dp))[:4000]]).float().mean().item()
        self.info["eval"].update({"face_heldout_same_cos": round(sp.mean().item(), 4),
                                  "face_heldout_diff_cos": round(dp.mean().item(), 4),
                                  "face_heldout_verification_auc": round(auc, 4)})
        log(f"[face] held-out same-identity cos {sp.mean():.3f}, different {dp.mean():.3f}, AUC {auc:.4f}")

        det = self.train_detector(self.augment)
        state = {f"emb.{k}": v for k, v in emb.state_dict().items()}
        state.update({f"det.{k}": v for k, v in det.state_dict().items()})
        M.save_weights(self.out / "face.safetensors", state)

    def train_detector(self, augment) -> "M.FaceDetectorNet":
        """The portrait detector: ``augment(images, gen)`` on positives and negatives alike;
        held-out recall and false-positive rate go to the evaluation figures."""
        cfg, d = self.cfg, self.data()
        images = d["images"]
        torch.manual_seed(cfg["seed"] + 5)
        det = M.FaceDetectorNet()
        opt = torch.optim.AdamW(det.parameters(), lr=cfg["detector_lr"], weight_decay=1e-4)
        boxes = torch.from_numpy(d["boxes"]) / 64.0
        lms = torch.from_numpy(d["landmarks"]) / 64.0

        def det_step(i, gen):
            for g in opt.param_groups:
                g["lr"] = cfg["detector_lr"] * 0.5 * (1 + math.cos(math.pi * i / cfg["detector_steps"]))
            half = cfg["detector_batch"] // 2
            idx = self.batch_idx(len(images), half, gen)
            x = torch.cat([augment(self.to_float(images[idx.numpy()]), gen),
                           augment(self.negatives(half, gen), gen)])
            y = torch.cat([torch.ones(half), torch.zeros(half)])
            logit, box, lm = det(x)
            cls = F.binary_cross_entropy_with_logits(logit, y)
            reg = F.smooth_l1_loss(box[:half], boxes[idx], beta=0.05) + F.smooth_l1_loss(lm[:half], lms[idx], beta=0.05)
            loss = cls + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"bce": cls.item(), "reg": reg.item(), "acc": ((logit > 0).float() == y).float().mean().item()}

        self.loop("detector", cfg["detector_steps"], {"det": det}, opt, det_step)
        det.eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(12345)
            pos = det(self.to_float(d["heldout_images"]))[0] > 0
            neg = det(self.negatives(256, gen))[0] > 0
        self.info["eval"].update({"detector_heldout_recall": round(pos.float().mean().item(), 4),
                                  "detector_false_positive_rate": round(neg.float().mean().item(), 4)})
        log(f"[detector] held-out portraits detected {pos.float().mean():.3f}, negatives accepted {neg.float().mean():.3f}")
        return det

    # ------------------------------------------------------------------ driver
    def run(self, stages: list[str]) -> None:
        for stage in stages:
            if self.done(stage):
                log(f"[{stage}] done already (delete {self.info_path} entries or the work folder to redo)")
                continue
            t0 = time.time()
            log(f"[{stage}] starting")
            getattr(self, f"stage_{stage}")()
            self.mark(stage, time.time() - t0)
            log(f"[{stage}] finished in {time.time() - t0:.0f} s")
        loops = self.info.get("loop_seconds", {})
        self.info["total_seconds"] = round(self.info.get("seconds", {}).get("data", 0) + sum(loops.values()), 1)
        self.info["torch"] = torch.__version__
        self.save_info()
        if all(self.done(s) for s in self.stages):
            self.write_card()


def write_model_card(out: Path, info: dict) -> None:
    """MODEL_CARD.md beside the weights, from world.json (command, data, steps, losses, seeds)."""
    cfg = info["config"]
    lines = [
        "# benchbase-mini model card",
        "",
        "A miniature Stable-Diffusion world trained from scratch on procedural 64×64 portraits",
        "(`plugins/worlds/mini/portraits.py`). Written by `benchbase train-mini`; reproduce with",
        "",
        "```",
        "benchbase train-mini --out DIR        # about three hours on 2 CPU cores; resumable",
        "BENCHBASE_MINI_WEIGHTS=DIR benchbase run   # use them instead of the shipped ones",
        "```",
        "",
        "## Data",
        f"- {cfg['train_identities']} training identities (`train-00000`…) × {cfg['images_per_identity']} "
        f"images = {info['data']['train_images']} portraits, plus {info['data']['backgrounds']} background-only "
        f"images; generator version {info['data']['generator_version']}.",
        "- Captions (UNet): the photo's full caption 70 %, a random subset of the person's attributes 10 %, "
        "the class prompt 10 %, empty 10 %; e.g. "
        + "; ".join(f"“{c}”" for c in info["data"]["example_captions"]) + ".",
        f"- Held-out identities (`heldout-000`…, the `mini` dataset) are never rendered for training; "
        f"{cfg['heldout_eval_identities']} of them give the held-out figures below.",
        "",
        "## Models (float16 safetensors; token-embedding rows never trained are regenerated from their seed)",
        "| file | model | steps × batch | lr |",
        "|---|---|---|---|",
        f"| vae.safetensors | AutoencoderKL (16-32-64, x4), scaling factor {info['vae_scaling_factor']:.4f} "
        f"| {cfg['vae_steps']} × {cfg['vae_batch']} | {cfg['vae_lr']} |",
        f"| text_encoder + unet | CLIPTextModel (64-d, 3 layers) + UNet2DConditionModel (32-64-96), ε, "
        f"scaled-linear | {cfg['unet_steps']} (of a {cfg.get('unet_schedule_steps', cfg['unet_steps'])}-step "
        f"cosine schedule) × {cfg['unet_batch']} | {cfg['unet_lr']} |",
        f"| upscaler.safetensors | x4 upscaler UNet (7 in-channels, noise-level embedding), v-prediction "
        f"| {cfg['upscaler_steps']} × {cfg['upscaler_batch']} | {cfg['upscaler_lr']} |",
        f"| clip.safetensors | open_clip CLIP (ViT 64 px / patch 8, 64-d text), InfoNCE "
        f"| {cfg['clip_steps']} × {cfg['clip_batch']} | {cfg['clip_lr']} |",
        f"| face.safetensors (emb.) | ResNet face embedder, CosFace s=30 m=0.2 "
        f"| {cfg['face_steps']} × {cfg['face_batch']} | {cfg['face_lr']} |",
        f"| face.safetensors (det.) | ResNet portrait detector + box/landmarks "
        f"| {cfg['detector_steps']} × {cfg['detector_batch']} | {cfg['detector_lr']} |",
        "",
        f"Seeds: training seed {cfg['seed']}, embedding-init seeds {info['seeds']}. torch {info.get('torch')}.",
        "",
        "## Losses (mean over each logging window; the last row is what a rerun should match within noise)",
    ]
    for stage, rows in info["losses"].items():
        if not rows:
            continue
        keys = [k for k in rows[0] if k != "step"]
        picks = [rows[0], rows[len(rows) // 2], rows[-1]]
        secs = info.get("loop_seconds", {}).get(stage)
        when = f"{secs} s of training loop" if secs is not None else "time included in face"
        lines.append(f"- **{stage}** ({when}): "
                     + "; ".join(f"step {r['step']}: " + ", ".join(f"{k} {r[k]:.4f}" for k in keys) for r in picks))
    lines += ["", "## Held-out evaluation", ""]
    lines += [f"- {k}: {v}" for k, v in info["eval"].items()]
    if info.get("clean_check"):  # measured with the harness after training (docs/mini-protocol.md)
        lines += ["", "## Clean check of the victim (no protection)", "", info["clean_check"]]
    lines += ["", f"Total training time: {info.get('total_seconds')} s (summed over resumed runs).", ""]
    if info.get("history_note"):
        lines += [info["history_note"], ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchbase train-mini", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="where the weights go (default: the package's folder of the version)")
    ap.add_argument("--work", type=Path, default=None,
                    help="data and checkpoints (resume from here; default: the cache's mini-train[-v3])")
    ap.add_argument("--stages", default=None, help="comma-separated subset of the version's stages (v2: " + ",".join(STAGES) + ")")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.01: a quick check)")
    ap.add_argument("--identities", type=int, default=None, help="training identities (default 1000)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--version", choices=("v2", "v3"), default="v2",
                    help="v2: the original world; v3: v2 plus restorer, pixel model, noise vocabulary (train_v3.py)")
    ap.add_argument("--v2", type=Path, default=None, help="v3 only: the v2 weights it builds on (default: shipped)")
    args = ap.parse_args(argv)
    args.out = args.out or M.weights_dir(args.version)
    args.work = args.work or M.cache_root() / ("mini-train" if args.version == "v2" else f"mini-train-{args.version}")
    if args.version == "v3":
        from benchbase_plugins.worlds.mini import train_v3

        return train_v3.main(args)
    cfg = dict(DEFAULTS)
    for k in list(cfg):
        if k.endswith("_steps"):
            cfg[k] = max(1, round(cfg[k] * args.scale))
    if args.identities:
        cfg["train_identities"] = args.identities
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [s.strip() for s in (args.stages or ",".join(STAGES)).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchbase.models.sd import quiet_libraries

    quiet_libraries()
    Trainer(args.out, args.work, cfg).run(stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
