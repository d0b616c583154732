"""Train benchbase-mini **v3** (``benchbase train-mini --version v3``): world v2 plus the organs
DiffShortcut's claims need, every choice made on clean data of selection identities.

v3 keeps v2's VAE, face embedder and x4 upscaler (with the v2 text encoder the upscaler was
trained with, shipped beside it as ``upscaler_text_encoder.safetensors``: the real SD x4
upscaler also has a text encoder of its own) and trains, from v2's shipped weights and the same
rendered data:

1. ``data``: v2's training portraits and backgrounds (same seeds), and the evaluation portraits
   of the **selection identities** (``portraits.selection_names``: ``heldout-500`` onwards,
   disjoint from every protocol identity ``heldout-000`` … ``heldout-099``).
2. ``reuse``: v2's VAE, face embedder, upscaler (+ its text encoder) copied from the v2 folder.
3. ``detector``: the face detector again, with CodeFormer's degradations (blur, down-sampling,
   noise, JPEG) and colour jitter on positives *and* negatives, so that a blurry or noisy face
   is still a face (RetinaFace, trained on WIDER FACE, finds faces in such photos; v2's detector,
   trained on clean renders only, missed a third of clean generations).
4. ``noisy``: a share of the training portraits with a visible noise (``organs.noise_overlay``)
   and a caption that says so ("…, with noisy pattern" / "…, with film grain"), as LAION holds
   grainy and noisy photos described as such.
5. ``clip``: the world's CLIP again, on full captions, the class prompt "a photo of person"
   (so that it places a portrait nearer the class prompt than any wall), attribute subsets, and
   the noisy portraits with their captions.
6. ``unet``: text encoder and UNet from scratch as v2 (same recipe, 5000-step cosine schedule),
   with the noisy portraits mixed in; EMA snapshots every ``unet_snapshot_every`` steps, one of
   which ships (``unet_ship_step``, chosen on clean selection data).
7. ``restorer``: the world's CodeFormer (``organs.MiniCodeFormer``), three stages as CodeFormer.
8. ``pixel``: an unconditional pixel DDPM on the training portraits (GrIDPure / pixel DiffPure).

Resumable like v2's trainer (a stage's checkpoint in ``--work``; finished stages are kept).
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from benchbase_plugins.worlds.mini import models as M
from benchbase_plugins.worlds.mini import organs as O
from benchbase_plugins.worlds.mini import portraits as P
from benchbase_plugins.worlds.mini.train import CLASS_PROMPT, DEFAULTS, SEEDS, Trainer, log, vae_fragility

V3_DEFAULTS = {
    **DEFAULTS,
    "version": "v3",
    "selection_eval_identities": 64,
    "noisy_images": 3200,        # 20 % of the 16,000 training portraits get a noisy copy
    "noisy_share": 0.1,          # of the UNet's and CLIP's examples
    "detector_steps": 800,
    "clip_steps": 1000, "clip_class_share": 0.25,
    "unet_steps": 2500, "unet_schedule_steps": 5000, "unet_snapshot_every": 500, "unet_ship_step": 2000,
    "restorer_vq_steps": 1500, "restorer_code_steps": 1200, "restorer_cft_steps": 800,
    "restorer_batch": 32, "restorer_lr": 5e-4,
    "pixel_steps": 3000, "pixel_batch": 32, "pixel_lr": 2e-4, "pixel_ema": 0.999,
}
V3_STAGES = ("data", "reuse", "detector", "noisy", "clip", "unet", "restorer", "pixel")
#: generator streams per loop (fixed: a new loop appends, so earlier streams keep their seeds)
LOOPS = ("data", "vae", "unet", "upscaler", "clip", "face", "detector", "noisy", "restorer-vq",
         "restorer-code", "restorer-cft", "pixel")
V3_FILES = ("vae", "text_encoder", "unet", "upscaler", "upscaler_text_encoder", "clip", "face", "restorer", "pixel")


class TrainerV3(Trainer):
    stages = V3_STAGES

    def write_card(self) -> None:
        write_model_card_v3(self.out, self.info)

    def __init__(self, out: Path, work: Path, cfg: dict, v2: Path):
        super().__init__(out, work, cfg)
        self.v2 = v2
        self.info["version"] = "v3"

    def generator(self, stage: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg["seed"] * 1000 + LOOPS.index(stage))

    # ------------------------------------------------------------------ data
    def eval_names(self) -> list[str]:
        # v2's trainer measured itself on heldout-000…: v3 on selection identities only, so
        # that no protocol identity informs any choice about the world
        return P.selection_names(self.cfg["selection_eval_identities"])

    def stage_data(self) -> None:
        super().stage_data()
        names = self.eval_names()
        self.info["data"]["evaluation_identities"] = {"first": names[0], "last": names[-1], "count": len(names)}

    # ------------------------------------------------------------------ reuse
    def stage_reuse(self) -> None:
        missing = M.weights_present(self.v2)
        if missing:
            raise RuntimeError(f"v3 reuses the v2 world's VAE, face embedder and upscaler: {missing}")
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("vae", "upscaler"):
            shutil.copyfile(self.v2 / f"{name}.safetensors", self.out / f"{name}.safetensors")
        shutil.copyfile(self.v2 / "text_encoder.safetensors", self.out / "upscaler_text_encoder.safetensors")
        v2_info = M.world_info(self.v2)
        self.info["vae_scaling_factor"] = v2_info["vae_scaling_factor"]
        self.info["reused_from_v2"] = {"fingerprint": M.fingerprint(self.v2),
                                       "files": ["vae", "upscaler", "upscaler_text_encoder (v2 text_encoder)",
                                                 "face embedder"]}
        self.save_info()  # load_vae reads the scaling factor from world.json
        # the VAE fragility on selection identities (v2's figure was measured on heldout-000…015)
        d = self.data()
        frag = vae_fragility(self.load_vae(), self.to_float(d["heldout_images"][::4][:16]))
        self.info["eval"].update(frag)
        log(f"[reuse] VAE latent shift on 16 selection identities: PGD {frag['vae_latent_shift_pgd']}, "
            f"noise {frag['vae_latent_shift_noise']}")

    # ------------------------------------------------------------------ detector
    def jitter_degrade(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Half the images degraded as CodeFormer's training pairs (either level), then v2's
        augmentation (brightness, light blur, noise)."""
        x = x.clone()
        pick = torch.rand(len(x), generator=gen) < 0.5
        if pick.any():
            level = "large" if float(torch.rand(1, generator=gen)) < 0.5 else "small"
            x[pick] = O.degrade(x[pick], gen, level)
        return self.augment(x, gen)

    def stage_detector(self) -> None:
        d = self.data()
        state = M.load_weights(self.v2 / "face.safetensors")
        emb_state = {k: v for k, v in state.items() if k.startswith("emb.")}
        det = self.train_detector(self.jitter_degrade)
        with torch.no_grad():
            degraded = O.degrade(self.to_float(d["heldout_images"]), torch.Generator().manual_seed(12346), "large")
            pos_deg = (det(degraded)[0] > 0).float().mean().item()
        self.info["eval"]["detector_degraded_recall"] = round(pos_deg, 4)
        log(f"[detector] selection portraits with CodeFormer's large degradations detected {pos_deg:.3f}")
        state = dict(emb_state)
        state.update({f"det.{k}": v for k, v in det.state_dict().items()})
        M.save_weights(self.out / "face.safetensors", state)

    # ------------------------------------------------------------------ noisy portraits
    def stage_noisy(self) -> None:
        """``noisy.pt``: which portraits got a noisy copy, its kind, the copy's VAE latents, and
        its UNet and CLIP caption ids."""
        import open_clip

        cfg, d = self.cfg, self.data()
        gen = self.generator("noisy")
        n = min(cfg["noisy_images"], len(d["images"]))
        rows = torch.randperm(len(d["images"]), generator=gen)[:n]
        kinds = torch.randint(0, len(O.NOISE_PHRASES), (n,), generator=gen)
        vae = self.load_vae()
        images, lats = [], []
        for start in range(0, n, 128):
            part = self.to_float(d["images"][rows[start:start + 128].numpy()])
            noisy = torch.stack([O.noise_overlay(x, int(k), gen) for x, k in zip(part, kinds[start:start + 128])])
            noisy = torch.round(noisy * 255) / 255  # an 8-bit photo, as every image in the world
            images.append((noisy * 255).round().byte())
            with torch.no_grad():
                lats.append(vae.encode(noisy * 2 - 1).latent_dist.mean * vae.config.scaling_factor)
        names = P.train_names(cfg["train_identities"])
        ident = d["identity"][rows.numpy()]
        # UNet captions: the photo's full caption + the phrase; CLIP captions: the person's caption + the phrase
        full = self.tokenizer.batch_decode(torch.from_numpy(d["caption_ids"][rows.numpy()]), skip_special_tokens=True)
        unet_caps = [f"{c}, {O.NOISE_PHRASES[int(k)]}" for c, k in zip(full, kinds)]
        class_caps = [f"{CLASS_PROMPT}, {O.NOISE_PHRASES[int(k)]}" for k in kinds]
        clip_caps = [f"{P.caption(P.identity(names[int(i)]))}, {O.NOISE_PHRASES[int(k)]}" for i, k in zip(ident, kinds)]
        tok = lambda caps: self.tokenizer(caps, padding="max_length", max_length=77, truncation=True,  # noqa: E731
                                          return_tensors="pt").input_ids
        torch.save({"rows": rows, "kinds": kinds, "images": torch.cat(images), "latents": torch.cat(lats),
                    "caption_ids": tok(unet_caps), "class_ids": tok(class_caps),
                    "clip_ids": open_clip.tokenize(clip_caps),
                    "clip_class_ids": open_clip.tokenize(class_caps)}, self.work / "noisy.pt")
        self.info["data"]["noisy"] = {"images": n, "phrases": list(O.NOISE_PHRASES), "example": unet_caps[0]}

    def noisy(self) -> dict:
        if not hasattr(self, "_noisy"):
            if not (self.work / "noisy.pt").is_file():  # a new work folder: seeded, made again identically
                self.stage_noisy()
            self._noisy = torch.load(self.work / "noisy.pt", weights_only=True)
        return self._noisy

    # ------------------------------------------------------------------ CLIP
    def stage_clip(self) -> None:
        import open_clip

        cfg, d = self.cfg, self.data()
        nz = self.noisy()
        torch.manual_seed(cfg["seed"] + 3)
        model = M.build_clip()
        M.init_embedding(model.token_embedding, SEEDS["clip_embedding"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["clip_lr"], weight_decay=0.0)
        mean = torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
        images, ident, clip_ids = d["images"], d["identity"], torch.from_numpy(d["clip_ids"]).long()
        bgs, bg_ids = d["backgrounds"], torch.from_numpy(d["clip_bg"]).long()
        class_id = open_clip.tokenize([CLASS_PROMPT])[0]
        warm = 50

        def step(i, gen):
            for g in opt.param_groups:
                g["lr"] = cfg["clip_lr"] * min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / cfg["clip_steps"]))
            n_bg, n_noisy = cfg["clip_batch"] // 10, round(cfg["clip_batch"] * cfg["noisy_share"])
            people = torch.randperm(int(ident.max()) + 1, generator=gen)[: cfg["clip_batch"] - n_bg - n_noisy].numpy()
            k = torch.randint(0, cfg["images_per_identity"], (len(people),), generator=gen).numpy()
            rows = people * cfg["images_per_identity"] + k
            b = self.batch_idx(len(bgs), n_bg, gen).numpy()
            nrow = self.batch_idx(len(nz["rows"]), n_noisy, gen)
            x = torch.cat([self.to_float(images[rows]), self.to_float(bgs[b]),
                           nz["images"][nrow].float() / 255])
            t_people = clip_ids[torch.from_numpy(people)].clone()
            # a share of the portraits (and of the noisy ones) captioned by the bare class prompt:
            # what makes "a photo of person" mean a person, not a wall
            t_people[torch.rand(len(people), generator=gen) < cfg["clip_class_share"]] = class_id
            t_noisy = torch.where((torch.rand(n_noisy, generator=gen) < cfg["clip_class_share"])[:, None],
                                  nz["clip_class_ids"][nrow], nz["clip_ids"][nrow])
            t = torch.cat([t_people, bg_ids[b], t_noisy]).long()
            fi = F.normalize(model.encode_image((x - mean) / std), dim=-1)
            ft = F.normalize(model.encode_text(t), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * fi @ ft.T
            same = (t[:, None] == t[None, :]).all(-1).float()  # equal captions: soft targets
            same = same / same.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-same * logits.log_softmax(1), 1).mean()
                          + torch.sum(-same * logits.log_softmax(0).T, 1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = (same.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean().item()
            return {"loss": loss.item(), "acc": acc}

        self.loop("clip", cfg["clip_steps"], {"clip": model}, opt, step)
        model.eval()
        self.info["eval"].update(clip_checks(model, d, self.to_float))
        log(f"[clip] {self.info['eval']}")
        M.save_weights(self.out / "clip.safetensors", model.state_dict(), SEEDS["clip_embedding"])

    # ------------------------------------------------------------------ UNet + text encoder
    # v2's stage_unet (same recipe, schedule and draws), with three hooks
    def unet_batch(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A share of the examples swapped for a noisy portrait with its caption (70 % the photo's
        caption + phrase, 20 % the class prompt + phrase, 10 % empty, as every caption)."""
        nz = self.noisy()
        z0 = self._latents[idx].clone()
        ids = self.caption_batch(idx, gen)
        swap = torch.rand(len(idx), generator=gen) < self.cfg["noisy_share"]
        if swap.any():
            m = int(swap.sum())
            pick = self.batch_idx(len(nz["rows"]), m, gen)
            z0[swap] = nz["latents"][pick]
            u = torch.rand(m, generator=gen)
            noisy_ids = torch.where((u < 0.7)[:, None], nz["caption_ids"][pick], nz["class_ids"][pick])
            noisy_ids[u >= 0.9] = self.class_and_empty_ids()[1]
            ids[swap] = noisy_ids
        return z0, ids

    def unet_step_done(self, step: int, ema_te, ema_unet) -> None:
        if (step + 1) % self.cfg["unet_snapshot_every"] == 0:  # candidates for the clean check ("unet_ship_step")
            snaps = self.work / "unet-snapshots"
            snaps.mkdir(exist_ok=True)
            M.save_weights(snaps / f"text_encoder-{step + 1}.safetensors", ema_te.state_dict(), SEEDS["text_embedding"])
            M.save_weights(snaps / f"unet-{step + 1}.safetensors", ema_unet.state_dict())

    def unet_finish(self, ema_te, ema_unet) -> None:
        self.ship_unet(self.cfg["unet_ship_step"])

    def ship_unet(self, step: int) -> None:
        snaps = self.work / "unet-snapshots"
        for name in ("text_encoder", "unet"):
            src = snaps / f"{name}-{step}.safetensors"
            if not src.is_file():
                raise RuntimeError(f"no UNet snapshot at step {step} in {snaps}")
            shutil.copyfile(src, self.out / f"{name}.safetensors")
        self.info["unet_shipped_step"] = step

    # ------------------------------------------------------------------ restorer (CodeFormer)
    def stage_restorer(self) -> None:
        cfg, d = self.cfg, self.data()
        images = d["images"]
        torch.manual_seed(cfg["seed"] + 6)
        net = O.MiniCodeFormer()
        batch = cfg["restorer_batch"]

        def sample(gen):
            return self.to_float(images[self.batch_idx(len(images), batch, gen).numpy()])

        def cosine(opt, i, steps):
            for g in opt.param_groups:
                g["lr"] = cfg["restorer_lr"] * 0.5 * (1 + math.cos(math.pi * i / steps))

        # stage I: the codebook and decoder, a VQ autoencoder of clean portraits
        vq = [net.encoder, net.quantize, net.decoder]
        opt = torch.optim.Adam([p for m in vq for p in m.parameters()], lr=cfg["restorer_lr"])

        def vq_step(i, gen):
            cosine(opt, i, cfg["restorer_vq_steps"])
            x = sample(gen) * 2 - 1
            rec, q_loss = net.autoencode(x)
            l1 = F.l1_loss(rec, x)
            loss = l1 + F.mse_loss(rec, x) + q_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"l1": l1.item(), "codebook": q_loss.item()}

        self.loop("restorer-vq", cfg["restorer_vq_steps"], {"net": net}, opt, vq_step)
        for m in vq:
            m.requires_grad_(False).eval()

        def targets(x):
            with torch.no_grad():
                z, _ = net.encoder(x)
                idx = net.quantize.indices(z)
                return idx, net.quantize.lookup(idx)

        # stage II: code prediction from CodeFormer's large degradations (w = 0): the LQ
        # encoder starts from the HQ one; cross-entropy (weight 0.5) + feature L2 (weight 1)
        with torch.no_grad():
            if not (self.work / "restorer-code.ckpt").is_file():
                net.lq_encoder.load_state_dict(net.encoder.state_dict())
        code_params = [p for m in (net.lq_encoder, net.feat_emb, net.transformer, net.head) for p in m.parameters()]
        code_params.append(net.position_emb)
        opt = torch.optim.Adam(code_params, lr=cfg["restorer_lr"])

        def code_step(i, gen):
            cosine(opt, i, cfg["restorer_code_steps"])
            hq = sample(gen)
            lq = O.degrade(hq, gen, "large") * 2 - 1
            idx, q = targets(hq * 2 - 1)
            logits, lq_feat, _ = net.code_logits(lq)
            ce = F.cross_entropy(logits.transpose(1, 2), idx)
            feat = F.mse_loss(lq_feat, q)
            loss = 0.5 * ce + feat
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"ce": ce.item(), "feat": feat.item(), "acc": (logits.argmax(-1) == idx).float().mean().item()}

        self.loop("restorer-code", cfg["restorer_code_steps"], {"net": net}, opt, code_step)

        # stage III: CFT at w = 1 on the small degradations (pixel L1 + L2 on the output; the
        # code losses go on, as in CodeFormer's stage III), encoder, transformer and CFT trained
        cft_params = code_params + list(net.fuse.parameters())
        opt = torch.optim.Adam(cft_params, lr=cfg["restorer_lr"] * 0.5)

        def cft_step(i, gen):
            cosine(opt, i, cfg["restorer_cft_steps"])
            hq = sample(gen)
            x = hq * 2 - 1
            lq = O.degrade(hq, gen, "small") * 2 - 1
            idx, q = targets(x)
            out, logits, lq_feat = net.restore(lq, w=1.0)
            pix = F.l1_loss(out, x) + F.mse_loss(out, x)
            loss = pix + 0.5 * F.cross_entropy(logits.transpose(1, 2), idx) + F.mse_loss(lq_feat, q)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"pix": pix.item()}

        self.loop("restorer-cft", cfg["restorer_cft_steps"], {"net": net}, opt, cft_step)
        net.eval().requires_grad_(False)
        self.info["eval"].update(restorer_checks(net, self.to_float(d["heldout_images"])))
        log(f"[restorer] {({k: v for k, v in self.info['eval'].items() if k.startswith('restorer')})}")
        M.save_weights(self.out / "restorer.safetensors", net.state_dict())

    # ------------------------------------------------------------------ pixel DDPM
    def stage_pixel(self) -> None:
        cfg, d = self.cfg, self.data()
        images = d["images"]
        torch.manual_seed(cfg["seed"] + 7)
        unet = O.build_pixel_unet()
        sched = O.pixel_scheduler()
        ema = copy.deepcopy(unet).requires_grad_(False)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg["pixel_lr"], weight_decay=0.0)

        def step(i, gen):
            for g in opt.param_groups:
                g["lr"] = cfg["pixel_lr"] * min(1.0, (i + 1) / 200)
            x = O.pixel_training_views(self.to_float(images[self.batch_idx(len(images), cfg["pixel_batch"],
                                                                           gen).numpy()]), gen) * 2 - 1
            noise = torch.randn(x.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=gen)
            loss = F.mse_loss(unet(sched.add_noise(x, noise, t), t).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            decay = min(cfg["pixel_ema"], (1 + i) / (10 + i))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - decay)
            return {"mse": loss.item()}

        self.loop("pixel", cfg["pixel_steps"], {"unet": unet, "ema": ema}, opt, step)
        ema.eval()
        views = O.pixel_training_views(self.to_float(d["heldout_images"][:64]), torch.Generator().manual_seed(1))
        self.info["eval"].update(pixel_checks(ema, sched, views))
        M.save_weights(self.out / "pixel.safetensors", ema.state_dict())


def write_model_card_v3(out: Path, info: dict) -> None:
    """MODEL_CARD.md beside v3's weights, from its world.json."""
    cfg, ev = info["config"], info.get("eval", {})
    lines = [
        "# benchbase-mini v3 model card",
        "",
        "World v2 (`../MODEL_CARD.md`) plus a face restorer, a pixel diffusion model, noise in its vocabulary,",
        "a CLIP that knows the class prompt and a detector trained with degradations. Written by",
        "`benchbase train-mini --version v3` (`plugins/worlds/mini/train_v3.py`); use other weights with",
        "`BENCHBASE_MINI_V3_WEIGHTS=DIR`.",
        "",
        "## What is v2's and what is new",
        f"- v2's, unchanged (v2 fingerprint {info.get('reused_from_v2', {}).get('fingerprint')}): the VAE, the face "
        "embedder, the x4 upscaler with the v2 text encoder it was trained with (`upscaler_text_encoder`).",
        f"- New: face detector ({cfg['detector_steps']} steps, CodeFormer's degradations on positives and negatives); "
        f"CLIP ({cfg['clip_steps']} steps, class prompt on {cfg['clip_class_share']:.0%} of portraits, noisy "
        f"portraits on {cfg['noisy_share']:.0%} of the batch); text encoder + UNet from scratch "
        f"({cfg['unet_steps']} steps of a {cfg['unet_schedule_steps']}-step schedule, "
        f"{cfg['noisy_share']:.0%} noisy portraits with captions saying so; EMA snapshot of step "
        f"{info.get('unet_shipped_step')} shipped); restorer (`organs.MiniCodeFormer`: VQ "
        f"{cfg['restorer_vq_steps']}, code prediction {cfg['restorer_code_steps']}, CFT {cfg['restorer_cft_steps']} "
        f"steps); pixel DDPM ({cfg['pixel_steps']} steps × {cfg['pixel_batch']}, 32 px).",
        f"- Noisy portraits: {info['data'].get('noisy', {}).get('images')} training photos with a visible noise, "
        f"captions ending {', '.join(repr(p) for p in O.NOISE_PHRASES)}; e.g. "
        f"“{info['data'].get('noisy', {}).get('example', '')}”.",
        f"- Evaluation identities: selection identities only ({info['data'].get('evaluation_identities')}); "
        "protocols draw theirs below heldout-500.",
        "",
        "## Losses (first, middle and last logging window)",
    ]
    for stage, rows in info["losses"].items():
        if not rows:
            continue
        keys = [k for k in rows[0] if k != "step"]
        picks = [rows[0], rows[len(rows) // 2], rows[-1]]
        secs = info.get("loop_seconds", {}).get(stage)
        lines.append(f"- **{stage}** ({secs} s of loop): "
                     + "; ".join(f"step {r['step']}: " + ", ".join(f"{k} {r[k]:.4f}" for k in keys) for r in picks))
    lines += ["", "## Held-out figures (selection identities)", ""] + [f"- {k}: {v}" for k, v in ev.items()]
    checks = info.get("clean_checks")
    lines += ["", "## Clean checks (selection identities; `benchbase mini-checks`)", ""]
    lines += [f"- {k}: {v}" for k, v in checks.items()] if checks else ["Not measured yet."]
    lines += ["", f"Total training time: {info.get('total_seconds')} s (summed over resumed runs). "
              f"Seeds: {cfg['seed']}, embeddings {info['seeds']}; torch {info.get('torch')}.", ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# held-out checks of the new organs (selection identities only)
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def clip_checks(model, d: dict, to_float) -> dict:
    """Image→caption top-1 among the selection identities' captions, and the share of their
    clean portraits nearer "a photo of person" than every background prompt of the world."""
    import open_clip

    mean = torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
    x = to_float(d["heldout_images"])
    fi = F.normalize(model.encode_image((x - mean) / std), dim=-1)
    one = fi[::4]
    ft = F.normalize(model.encode_text(torch.from_numpy(d["heldout_clip_ids"]).long()), dim=-1)
    top1 = (one @ ft.T).argmax(1).eq(torch.arange(len(one))).float().mean().item()
    walls = torch.unique(torch.from_numpy(d["clip_bg"]).long(), dim=0)  # every wall prompt of the world
    fw = F.normalize(model.encode_text(walls), dim=-1)
    fc = F.normalize(model.encode_text(open_clip.tokenize([CLASS_PROMPT])), dim=-1)
    nearer = ((fi @ fc.T).squeeze(1) > (fi @ fw.T).max(1).values).float().mean().item()
    return {"clip_heldout_image_to_caption_top1": round(top1, 4), "clip_heldout_candidates": len(one),
            "clip_class_prompt_fraction": round(nearer, 4), "clip_wall_prompts": len(walls)}


@torch.no_grad()
def restorer_checks(net, clean: torch.Tensor, seed: int = 0) -> dict:
    """PSNR of degraded and restored selection portraits against the clean ones (w = 0.5, the
    fidelity DiffShortcut runs CodeFormer at), and of the clean ones passed through it."""
    gen = torch.Generator().manual_seed(seed)
    lq = O.degrade(clean, gen, "small")

    def psnr(a, b):
        return round(float((10 * torch.log10(1 / F.mse_loss(a, b, reduction="none").mean((1, 2, 3)))).mean()), 2)

    run = lambda x: (net(x * 2 - 1, w=0.5).clamp(-1, 1) + 1) / 2  # noqa: E731
    return {"restorer_psnr_degraded": psnr(lq, clean), "restorer_psnr_restored": psnr(run(lq), clean),
            "restorer_psnr_clean_through": psnr(run(clean), clean)}


@torch.no_grad()
def pixel_checks(unet, sched, clean: torch.Tensor, t: int = 100, seed: int = 0) -> dict:
    """One-shot x₀ prediction from x_t at t = 100 (GrIDPure's mini depth): PSNR against the clean
    portraits, beside the PSNR of x_t itself."""
    gen = torch.Generator().manual_seed(seed)
    x = clean * 2 - 1
    noise = torch.randn(x.shape, generator=gen)
    tt = torch.full((len(x),), t)
    xt = sched.add_noise(x, noise, tt)
    a = sched.alphas_cumprod[t]
    x0 = ((xt - (1 - a).sqrt() * unet(xt, tt).sample) / a.sqrt()).clamp(-1, 1)

    def psnr(y):
        return round(float(10 * torch.log10(4 / F.mse_loss(y, x))), 2)

    return {"pixel_x0_psnr_t100": psnr(x0), "pixel_xt_psnr_t100": psnr(xt.clamp(-1, 1))}


def main(args) -> int:
    """``benchbase train-mini --version v3`` (arguments parsed by ``train.main``)."""
    import os

    cfg = dict(V3_DEFAULTS)
    for k in list(cfg):
        if k.endswith("_steps") and k != "unet_schedule_steps":
            cfg[k] = max(1, round(cfg[k] * args.scale))
    for k in ("unet_snapshot_every", "unet_ship_step"):
        cfg[k] = max(1, round(cfg[k] * args.scale))
    cfg["unet_schedule_steps"] = max(1, round(cfg["unet_schedule_steps"] * args.scale))
    if args.identities:
        cfg["train_identities"] = args.identities
        cfg["noisy_images"] = min(cfg["noisy_images"], args.identities * cfg["images_per_identity"] // 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(V3_STAGES)
    unknown = [s for s in stages if s not in V3_STAGES]
    if unknown:
        raise SystemExit(f"unknown v3 stage(s) {unknown}; stages: {', '.join(V3_STAGES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchbase.models.sd import quiet_libraries

    quiet_libraries()
    TrainerV3(args.out, args.work, cfg, args.v2 or M.weights_dir("v2")).run(stages)
    return 0
