"""Adaptive attacks and the worst-case leaderboard.

1. On the tiny backend, ASPL that knows it will be JPEG-compressed (``adaptive = true``: its
   PGD loss is taken through JPEG's differentiable view) leaves a higher *post-JPEG* surrogate
   loss than plain ASPL. The surrogate here is the tiny model with v-prediction: its target
   v = α·ε − σ·z depends on the image latent, so the loss responds to a perturbation clearly
   enough to compare two attacks on a random-weight model (with ε-prediction the random UNet
   barely sees its input and the difference drowns in the attack's own sampling noise).
   Both attacks run with the same seeds; the loss is averaged over fixed timesteps × noise
   draws with common random numbers, and over three attack seeds.
2. A CDL-aware adaptive ASPL trains its surrogate and takes its PGD loss on the CDL prompts.
3. A suite with an adaptive attack (AdvDM, the cheapest one), both defenses and both personalizers runs end to end on
   the tiny backend, and the worst-case tables are written.
4. The worst-case views pick the right rows and name them, on a hand-built results file.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchbase.components import Threat
from benchbase.images import quantize_to_budget
from benchbase.testing import fixed_timestep_loss, make_context, sample_identity, tiny_backend

# shrunk ASPL: 2 outer iterations × (1 surrogate step, 12 PGD steps); α raised so the few
# steps cover the ball; a 16-level budget makes the effect measurable on the tiny model
ASPL_FAST = {"max_train_steps": 2, "max_f_train_steps": 1, "max_adv_train_steps": 12, "pgd_alpha": 2.0, "eps": 16.0,
                 "num_class_images": 2, "class_inference_steps": 2}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def vpred():
    backend = tiny_backend(prediction_type="v_prediction")
    backend.name, backend.version = "tiny", "test"
    return backend


@pytest.fixture(scope="module")
def identity():
    return sample_identity("astronaut", 64, images_per_set=2)


def test_adaptive_aspl_survives_jpeg_better(vpred, identity, tmp_path):
    from benchbase_plugins.attacks.aspl import ASPL
    from benchbase_plugins.defenses.basic import NoDefense
    from benchbase_plugins.purifiers.classic import JPEG

    jpeg = JPEG()  # quality 75
    clean = identity.set_B
    post, pre = {False: [], True: []}, {False: [], True: []}
    for adaptive in (False, True):
        for seed in SEEDS:
            ctx = make_context(backend=vpred, identity=identity, seed=seed, store_dir=tmp_path)
            if adaptive:
                ctx = ctx.with_(threat=Threat(purifiers=[jpeg], defense=NoDefense(), training_prompts=ctx.prompts))
            attack = ASPL(**ASPL_FAST)
            protected = quantize_to_budget(attack.protect(clean.clone(), ctx), clean, attack.eps)
            assert ctx.info["adaptive"] is adaptive
            models = ctx.models()
            cond = models.encode_prompt([ctx.prompts.instance] * len(clean))
            post[adaptive].append(fixed_timestep_loss(models, cond, jpeg.purify(protected, ctx)))
            pre[adaptive].append(fixed_timestep_loss(models, cond, protected))
    models = vpred.load(torch.device("cpu"), torch.float32)
    cond = models.encode_prompt([ctx.prompts.instance] * len(clean))
    floor = fixed_timestep_loss(models, cond, jpeg.purify(clean, ctx))  # JPEG of the clean images
    gain = {a: sum(v) / len(v) - floor for a, v in post.items()}
    assert gain[True] > 0
    # observed ≈ 3x; 1.5x leaves room for platform differences without accepting a tie
    assert gain[True] > 1.5 * gain[False], (gain, post, pre)
    # the non-adaptive attack is not simply weaker: before JPEG it is the stronger one
    assert sum(pre[False]) > sum(pre[True]), pre


def test_cdl_aware_aspl_uses_the_defense_prompts(tiny, identity, tmp_path):
    from benchbase_plugins.attacks.aspl import ASPL
    from benchbase_plugins.defenses.cdl import CDL

    tokenized: list[str] = []

    class Spy:
        def __init__(self, backend):
            self._b = backend

        def __getattr__(self, name):
            return getattr(self._b, name)

        def load(self, device, dtype):
            models = self._b.load(device, dtype)
            tokenize = models.tokenize

            def spy(prompts, *a, **k):
                tokenized.extend(prompts)
                return tokenize(prompts, *a, **k)

            models.tokenize = spy
            return models

    defense = CDL()
    ctx = make_context(backend=Spy(tiny), identity=identity, store_dir=tmp_path)
    ctx = ctx.with_(threat=Threat(purifiers=[], defense=defense, training_prompts=defense.training_prompts(ctx.prompts)))
    ASPL(max_train_steps=1, max_f_train_steps=1, max_adv_train_steps=1, num_class_images=2,
         class_inference_steps=2).protect(identity.set_B.clone(), ctx)
    assert "a photo of sks person, bhj noisy pattern" in tokenized
    assert "a photo of person, without bhj noisy pattern" in tokenized
    assert "a photo of sks person" not in tokenized  # nothing conditions on the undefended prompt


# -- the grid ---------------------------------------------------------------------------------

FAST_DB = {"max_train_steps": 2, "num_class_images": 2, "class_inference_steps": 2, "num_images_per_prompt": 1,
               "num_inference_steps": 2, "learning_rate": 1e-4}


def test_suite_with_adaptive_attack_defenses_and_personalizers(tmp_path):
    from benchbase import leaderboard
    from benchbase.pipeline import Runner
    from benchbase.suite import parse_suite

    suite = parse_suite({
        "name": "adaptive-grid", "backend": {"name": "tiny"},
        "dataset": {"name": "sample", "identities": ["astronaut"], "images_per_set": 2},
        "attacks": ["none", {"name": "advdm", "adaptive": True, "label": "advdm-adaptive", "steps": 2}],
        "purifiers": ["none", "jpeg"],
        "defenses": ["none", "cdl"],
        "personalizers": [{"name": "dreambooth", **FAST_DB}, {"name": "lora", **FAST_DB}],
        "metrics": ["psnr", "ref-rmse"],
    })
    summary = Runner(suite, tmp_path / "run", progress=False).run()
    assert not summary.failed, summary.failed[:2]
    assert len(summary.records) == 2 * 2 * 2 * 2 * 2  # cells × metrics, one identity
    assert all(r["status"] == "ok" for r in summary.records)
    # the adaptive protection depends on the threat: one per (purifier chain, defense), + `none`
    assert summary.executed["protect"] == 1 + 2 * 2
    assert summary.executed["personalize"] == 16
    metas = [json.loads(p.read_text()) for p in (tmp_path / "run" / "store" / "protect").glob("*/*/_done.json")]
    threats = [m["parts"]["threat"] for m in metas if "threat" in m["parts"]]
    assert sorted((t["purifiers"][0]["name"], t["defense"]["name"]) for t in threats) == [
        ("jpeg", "cdl"), ("jpeg", "none"), ("none", "cdl"), ("none", "none")]
    trained = [(json.loads(p.read_text()), p.parent)
               for p in (tmp_path / "run" / "store" / "personalize").glob("*/*/_done.json")]
    assert len(trained) == 16
    for meta, folder in trained:
        cdl = meta["parts"]["defense"]["name"] == "cdl"
        assert meta["info"]["training_prompts"]["instance"].endswith(", bhj noisy pattern") == cdl
        lora = meta["parts"]["personalizer"]["name"] == "lora"
        assert (folder / "pytorch_lora_weights.safetensors").is_file() == lora and (folder / "unet").is_dir() != lora
    md, text = leaderboard.write(tmp_path / "run")
    assert "worst case" in text and "worst under" in text
    attacks = leaderboard.build(tmp_path / "run")["attacks"]
    assert list(attacks["attack"]) == ["none", "advdm-adaptive"]
    assert (md.parent / "attacks.csv").is_file() and (md.parent / "purifiers.csv").is_file()


# -- worst-case views on a hand-built results file ---------------------------------------------

IDENTITIES = {"id1": +0.02, "id2": -0.02}  # offsets that cancel in the mean over identities
EFFECT = {  # per attack: base protection and what each counter-measure / victim takes away
    "none": {"base": 0.0, "jpeg": 0.0, "cdl": 0.0, "lora": 0.0},
    "aspl": {"base": 0.6, "jpeg": 0.3, "cdl": 0.2, "lora": -0.05},
    "aspl-adaptive": {"base": 0.7, "jpeg": 0.1, "cdl": 0.05, "lora": -0.05},
}


def _fdfr(attack, purifier, defense, personalizer):
    """FDFR-like (↑ favours the protector)."""
    e = EFFECT[attack]
    return (0.1 + e["base"] - (e["jpeg"] if purifier == "jpeg" else 0) - (e["cdl"] if defense == "cdl" else 0)
            - (e["lora"] if personalizer == "lora" else 0))


def _ism(attack, purifier, defense, personalizer):
    """ISM-like (↓ favours the protector): counter-measures raise it, LoRA raises it further."""
    e = EFFECT[attack]
    return (0.9 - e["base"] + (e["jpeg"] if purifier == "jpeg" else 0) + (e["cdl"] if defense == "cdl" else 0)
            + (0.1 if personalizer == "lora" and attack != "none" else 0))


def _write_run(folder, drop=None):
    records = []
    for attack in EFFECT:
        for purifier in ("none", "jpeg"):
            for defense in ("none", "cdl"):
                for personalizer in ("dreambooth", "lora"):
                    for identity, offset in IDENTITIES.items():
                        for metric, fn, direction in (("fdfr", _fdfr, "higher"), ("ism", _ism, "lower")):
                            cell = {"attack": attack, "purifier": purifier, "defense": defense, "personalizer": personalizer}
                            rec = {"suite": "hand", "identity": identity, "seed": 0, **cell, "metric": metric,
                                   "direction": direction, "status": "ok",
                                   "value": fn(attack, purifier, defense, personalizer) + offset,
                                   "per_prompt": {}, "count": 4, "error": None, "adaptive": attack.endswith("adaptive")}
                            if drop and drop == (attack, purifier, defense, personalizer, identity, metric):
                                continue
                            records.append(rec)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "run.json").write_text(json.dumps({"suite": "hand", "suite_hash": "0", "backend": {
        "description": "hand-built"}, "device": "cpu", "dtype": "float32", "seeds": [0]}))
    return folder


def _row(view, **keys):
    mask = True
    for k, v in keys.items():
        mask = mask & (view[k] == v)
    rows = view[mask]
    assert len(rows) == 1, keys
    return rows.iloc[0]


def test_attack_worst_case_is_direction_aware_and_named(tmp_path):
    from benchbase import leaderboard

    views = leaderboard.build(_write_run(tmp_path / "run"))
    attacks = leaderboard.render(views)["attacks"].frame()
    aspl = _row(attacks, attack="aspl")
    # FDFR ↑: the protector's worst is the lowest value: JPEG + CDL (0.1 + 0.6 − 0.3 − 0.2), DreamBooth
    assert aspl["fdfr ↑ worst"] == "0.200" and aspl["fdfr worst under"] == "jpeg / cdl / dreambooth"
    # ISM ↓: the protector's worst is the highest value: JPEG + CDL under LoRA (0.9 − 0.6 + 0.5 + 0.1)
    assert aspl["ism ↓ worst"] == "0.900" and aspl["ism worst under"] == "jpeg / cdl / lora"
    adaptive = _row(attacks, attack="aspl-adaptive")
    assert adaptive["fdfr ↑ worst"] == "0.650" and adaptive["fdfr worst under"] == "jpeg / cdl / dreambooth"
    assert adaptive["ism ↓ worst"] == "0.450" and adaptive["ism worst under"] == "jpeg / cdl / lora"
    # the adaptive attack ranks above plain ASPL by its worst case, though both look alike without
    # counter-measures
    assert float(adaptive["fdfr ↑ worst"]) > float(aspl["fdfr ↑ worst"])
    assert aspl["fdfr ↑ (no counter-measure)"].startswith("0.700")
    assert aspl["n identities"] == 2
    numeric = _row(views["attacks"], attack="aspl")  # the view itself holds the numbers
    assert numeric["fdfr|worst|mean"] == pytest.approx(0.2) and numeric["fdfr|base|mean"] == pytest.approx(0.7)


def test_purifier_worst_case_is_the_strongest_attack(tmp_path):
    from benchbase import leaderboard

    purifiers = leaderboard.render(leaderboard.build(_write_run(tmp_path / "run")))["purifiers"].frame()
    both = _row(purifiers, purifier="jpeg", defense="cdl")
    # the restorer's worst case is the protector's best, over attacks other than `none`
    assert both["fdfr ↑ worst"] == "0.700" and both["fdfr worst under"] == "aspl-adaptive / lora"
    assert both["ism ↓ worst"] == "0.350" and both["ism worst under"] == "aspl-adaptive / dreambooth"
    bare = _row(purifiers, purifier="none", defense="none")
    assert bare["fdfr ↑ worst"] == "0.850" and bare["fdfr worst under"] == "aspl-adaptive / lora"


def test_a_missing_identity_makes_the_worst_case_incomplete(tmp_path):
    from benchbase import leaderboard

    run = _write_run(tmp_path / "run", drop=("aspl", "jpeg", "none", "lora", "id2", "fdfr"))
    attacks = leaderboard.render(leaderboard.build(run))["attacks"].frame()
    aspl = _row(attacks, attack="aspl")
    assert aspl["fdfr ↑ worst"] == "incomplete"  # never a worst case over a partial grid
    assert aspl["ism ↓ worst"] == "0.900"  # the other metric is complete
    assert _row(attacks, attack="aspl-adaptive")["fdfr ↑ worst"] == "0.650"
    md, text = leaderboard.write(run)
    assert "Attacks: no counter-measure and worst case" in text and (md.parent / "attacks.csv").is_file()
