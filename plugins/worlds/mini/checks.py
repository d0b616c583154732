"""World v3's clean checks (``benchbase mini-checks RUN_DIR``): the figures every choice about
the world was made on, measured on clean data of selection identities only, written to the
world's ``world.json`` under ``"clean_checks"`` and to its model card.

From the ``mini-v3-select`` run's records (means over its selection identities):
``dreambooth_ism``, ``base_ism``, ``ceiling_ism`` (set_B against set_C, the same person),
``fdfr_dreambooth``, ``fdfr_base`` and ``realign_clean_ism_drop`` (clean victim ISM minus the
victim trained on realigned clean photos, per realign chain). Computed here from the weights:
``clip_class_prompt_fraction`` (the share of the selection identities' clean portraits that the
world's CLIP places nearer "a photo of person" than every wall prompt of the world),
``noise_prompt_hf_ratio`` (high-frequency energy of generations of "a photo of person with
noisy pattern" over that of "a photo of person", same starting noise) and
``vae_pgd_to_noise_shift_ratio`` (the VAE fragility figure the trainer measured on selection
identities).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchbase_plugins.worlds.mini import models as M
from benchbase_plugins.worlds.mini import organs as O
from benchbase_plugins.worlds.mini import portraits as P

NOISE_PROMPT = "a photo of person with noisy pattern"
CLEAN_PROMPT = "a photo of person"


def _mean(records, **where) -> tuple[float | None, list[str]]:
    vals = [r for r in records if r.status == "ok" and all(getattr(r, k) == v for k, v in where.items())]
    if not vals:
        return None, []
    return round(statistics.fmean(r.value for r in vals), 4), sorted({r.identity for r in vals})


def from_run(run_dir: Path) -> dict:
    """The clean checks a ``mini-v3-select`` run measured."""
    from benchbase.records import read_records

    recs = [r for r in read_records(run_dir) if r.attack == "none" and r.defense == "none"]
    out: dict = {}
    db, ids = _mean(recs, purifier="none", personalizer="dreambooth", metric="ism")
    out["selection_identities"] = ids
    out["dreambooth_ism"] = db
    out["base_ism"] = _mean(recs, purifier="none", personalizer="base", metric="ism")[0]
    out["ceiling_ism"] = _mean(recs, purifier="none", personalizer="dreambooth", metric="ism-ceiling")[0]
    out["fdfr_dreambooth"] = _mean(recs, purifier="none", personalizer="dreambooth", metric="fdfr")[0]
    out["fdfr_base"] = _mean(recs, purifier="none", personalizer="base", metric="fdfr")[0]
    drops = {}
    for purifier in sorted({r.purifier for r in recs if r.purifier.startswith("realign")}):
        after = _mean(recs, purifier=purifier, personalizer="dreambooth", metric="ism")[0]
        if db is not None and after is not None:
            drops[purifier] = round(db - after, 4)
    out["realign_clean_ism_drop"] = drops
    return out


@torch.no_grad()
def clip_class_prompt_fraction(version: str = "v3", identities: int = 64) -> float:
    """Share of selection identities' clean portraits (set_A's 4 each) nearer the class prompt
    than every wall prompt of the world."""
    import open_clip

    from benchbase.images import pil_to_tensor

    model, _, tokenizer = M.load_clip(version)
    mean = torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
    x = torch.stack([pil_to_tensor(P.render(P.identity(n), 1000 + i).image)
                     for n in P.selection_names(identities) for i in range(4)])
    fi = torch.nn.functional.normalize(model.encode_image((x - mean) / std), dim=-1)
    walls = sorted({P.background_caption(s) for s in range(2000)})
    fw = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(walls)), dim=-1)
    fc = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize([CLEAN_PROMPT])), dim=-1)
    return round(float(((fi @ fc.T).squeeze(1) > (fi @ fw.T).max(1).values).float().mean()), 4)


@torch.no_grad()
def noise_prompt_hf_ratio(version: str = "v3", n: int = 32, steps: int = 25, seed: int = 0) -> float:
    """Mean high-frequency energy of generations of ``NOISE_PROMPT`` over ``CLEAN_PROMPT``'s,
    the same starting noise for both (guidance 7.5, DDIM ``steps``)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(M.ensure_folder("pipeline", version)),
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    energy = {}
    for prompt in (NOISE_PROMPT, CLEAN_PROMPT):
        gen = torch.Generator().manual_seed(seed)
        images = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=7.5, generator=gen,
                      output_type="pt").images
        energy[prompt] = float(O.high_frequency_energy(images).mean())
    return round(energy[NOISE_PROMPT] / energy[CLEAN_PROMPT], 4)


def write(version: str, checks: dict, folder: Path | None = None) -> Path:
    folder = folder or M.weights_dir(version)
    path = folder / "world.json"
    info = json.loads(path.read_text())
    info["clean_checks"] = checks
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchbase mini-checks", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished mini-v3-select run")
    ap.add_argument("--version", default="v3", choices=("v3",))
    ap.add_argument("--write", action="store_true", help="write them into the weights' world.json")
    args = ap.parse_args(argv)
    checks = from_run(args.run_dir)
    info = M.world_info(M.weights_dir(args.version))
    ev = info.get("eval", {})
    checks["clip_class_prompt_fraction"] = clip_class_prompt_fraction(args.version)
    checks["noise_prompt_hf_ratio"] = noise_prompt_hf_ratio(args.version)
    if ev.get("vae_latent_shift_noise"):
        checks["vae_pgd_to_noise_shift_ratio"] = round(ev["vae_latent_shift_pgd"] / ev["vae_latent_shift_noise"], 2)
    print(json.dumps(checks, indent=1))
    if args.write:
        print(f"written to {write(args.version, checks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
