"""Sampling: per-identity random streams with common random numbers inside an identity
(benchbase.seeds), every plugin drawing from a named derivation of its stage's stream, and
contrasts anyone can recompute from the committed per-record data (per_identity.csv)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchbase import hookimpl, leaderboard
from benchbase.components import Metric, MetricValue, Personalizer
from benchbase.images import load_pngs
from benchbase.pipeline import Runner
from benchbase.plugins import PluginManager
from benchbase.records import read_records_and_rows
from benchbase.seeds import derive_seed, shared_seed, stage_seed
from benchbase.suite import parse_suite

LEADERBOARDS = Path(__file__).resolve().parents[1] / "leaderboards"
BASE_DREAMBOOTH = {"name": "dreambooth", "label": "base", "max_train_steps": 0, "num_class_images": 2,
                   "class_inference_steps": 2, "num_images_per_prompt": 2, "num_inference_steps": 2}


class Spy(Personalizer):
    """A victim whose whole output is its random draws: training writes the first draws of
    ``ctx.generator`` and of a named sub-stream; generation returns images of pure noise from
    the sub-streams ``("generation", prompt, j)``."""

    def train(self, images, ctx, defense, out_dir):
        draws = {"generator": torch.rand(16, generator=ctx.generator).tolist(),
                 "named": torch.rand(16, generator=ctx.rng("named")).tolist(),
                 "images": float(images.sum())}
        (out_dir / "draws.json").write_text(json.dumps(draws))

    def generate(self, model_dir, ctx, defense):
        side = ctx.identity.set_B.shape[-1]
        return {prompt: torch.stack([torch.rand(3, side, side, generator=ctx.rng("generation", prompt, j))
                                     for j in range(2)]) for prompt in ctx.prompts.eval}


class MeanPixel(Metric):
    """The mean of the generated images (reads only what the victim drew)."""

    reads = ("generated",)

    def score(self, inputs, ctx):
        return MetricValue(value=float(torch.cat(list(inputs.generated.values())).mean()))


class SpyPlugin:
    @hookimpl
    def register_personalizers(self, register):
        register("spy", Spy)

    @hookimpl
    def register_metrics(self, register):
        register("mean-pixel", MeanPixel)


def test_streams_name_the_identity_and_sub_streams_differ():
    a, b = stage_seed(0, "fp-a", "protect", "noise"), stage_seed(0, "fp-b", "protect", "noise")
    assert a != b and a == stage_seed(0, "fp-a", "protect", "noise")  # reproducible, per identity
    assert stage_seed(1, "fp-a", "protect", "noise") != a  # per seed
    assert stage_seed(0, "fp-a", "protect", "aspl") != a  # per attack
    assert derive_seed(a, "generation", "p", 0) != derive_seed(a, "generation", "p", 1)
    assert shared_seed("class_images", "a photo of person", 0) != shared_seed("class_images", "a photo of person", 1)
    assert shared_seed("class_images", "x", 0) != shared_seed("fsmg-surrogate", "x", 0)


def test_context_rng_is_a_named_derivation_of_the_stage_stream():
    from benchbase.testing import make_context

    ctx = make_context(seed=3)
    first = torch.rand(4, generator=ctx.rng("generation", "p", 0))
    assert torch.equal(first, torch.rand(4, generator=ctx.rng("generation", "p", 0)))  # named: reproducible
    assert not torch.equal(first, torch.rand(4, generator=ctx.rng("generation", "p", 1)))
    torch.rand(100, generator=ctx.generator)  # draws on the stage generator move no sub-stream
    assert torch.equal(first, torch.rand(4, generator=ctx.rng("generation", "p", 0)))
    assert not torch.equal(first, torch.rand(4, generator=make_context(seed=4).rng("generation", "p", 0)))


@pytest.fixture(scope="module")
def two_identities(tmp_path_factory):
    """Two identities x (clean, noise) x (spy victim, DreamBooth with 0 steps), with contrasts."""
    suite = parse_suite({
        "name": "sampling", "backend": {"name": "tiny"},
        "dataset": {"name": "sample", "identities": ["astronaut", "hopper"], "images_per_set": 2},
        "attacks": ["none", {"name": "noise", "eps": 8}], "purifiers": ["none"],
        "personalizers": [{"name": "spy"}, BASE_DREAMBOOTH], "metrics": ["mean-pixel", "psnr", "ssim"],
        "contrasts": [
            {"label": "noise lowers PSNR", "metric": "psnr", "a": {"attack": "noise"}, "b": {"attack": "none"},
             "direction": "less", "family": "photos"},
            {"label": "noise lowers SSIM", "metric": "ssim", "a": {"attack": "noise"}, "b": {"attack": "none"},
             "direction": "less", "family": "photos"},
            {"label": "victims pair", "metric": "mean-pixel", "a": {"attack": "noise"}, "b": {"attack": "none"}},
        ],
    })
    pm = PluginManager()
    pm.register(SpyPlugin(), name="spy-plugin")
    run_dir = tmp_path_factory.mktemp("sampling")
    summary = Runner(suite, run_dir, manager=pm, progress=False).run()
    assert not summary.failed, summary.failed[:2]
    records, _ = read_records_and_rows(run_dir)
    return run_dir, records


def _folder(run_dir: Path, stage: str, key: str) -> Path:
    return run_dir / "store" / stage / key[:2] / key


def _stage(run_dir, records, stage, **cell) -> Path:
    rec = next(r for r in records if all(getattr(r, k) == v for k, v in cell.items()))
    return _folder(run_dir, stage, rec.stages[stage])


def test_two_identities_draw_different_noise(two_identities):
    """The bug of protocol 1: every identity drew the same uniform noise (97.7 % of pixels equal)."""
    run_dir, records = two_identities
    levels = {}
    for ident in ("astronaut", "hopper"):
        protected = load_pngs(_stage(run_dir, records, "protect", identity=ident, attack="noise") / "images")
        clean = load_pngs(_stage(run_dir, records, "clean", identity=ident, attack="noise") / "images")
        levels[ident] = torch.round((protected - clean) * 255)
    interior = [(levels[i].abs() < 8) for i in levels]  # away from 0/255 clipping of either identity
    both = interior[0] & interior[1]
    equal = (levels["astronaut"] == levels["hopper"])[both].float().mean().item()
    assert equal < 0.2, f"{equal:.1%} of the noise levels are equal across identities"


def test_victims_of_one_identity_share_their_stream_across_attacks(two_identities):
    run_dir, records = two_identities
    draws = {(ident, attack): json.loads((_stage(run_dir, records, "personalize", identity=ident, attack=attack,
                                                 personalizer="spy") / "draws.json").read_text())
             for ident in ("astronaut", "hopper") for attack in ("none", "noise")}
    for ident in ("astronaut", "hopper"):
        clean, noise = draws[(ident, "none")], draws[(ident, "noise")]
        assert clean["images"] != noise["images"]  # two stages, trained on other photos ...
        assert clean["generator"] == noise["generator"] and clean["named"] == noise["named"]  # ... one stream
    assert draws[("astronaut", "none")]["generator"] != draws[("hopper", "none")]["generator"]
    assert draws[("astronaut", "none")]["named"] != draws[("hopper", "none")]["named"]
    assert draws[("astronaut", "none")]["generator"] != draws[("astronaut", "none")]["named"]


def test_dreambooth_generations_pair_across_attacks_and_differ_across_identities(two_identities):
    """The real DreamBooth with 0 steps is the base model for every cell: the clean and the noise
    victim of one identity generate the same images (same starting noise), two identities do not
    (protocol 1's base row had one FDFR for all 16 identities)."""
    run_dir, records = two_identities
    images = {}
    for ident in ("astronaut", "hopper"):
        for attack in ("none", "noise"):
            folder = _stage(run_dir, records, "generate", identity=ident, attack=attack, personalizer="base")
            images[(ident, attack)] = torch.cat([load_pngs(p) for p in sorted(folder.iterdir()) if p.is_dir()])
    assert torch.equal(images[("astronaut", "none")], images[("astronaut", "noise")])
    assert torch.equal(images[("hopper", "none")], images[("hopper", "noise")])
    assert (images[("astronaut", "none")] - images[("hopper", "none")]).abs().mean() > 0.05
    first = images[("astronaut", "none")]
    assert (first[0] - first[1]).abs().mean() > 0.05  # and the images of one prompt differ from each other


def test_class_images_are_one_shared_stage(two_identities):
    run_dir, _ = two_identities
    assert len(list((run_dir / "store" / "class_images").glob("*/*/_done.json"))) == 1


def _recompute(per_identity: pd.DataFrame, contrast: dict) -> dict:
    """A contrast from per_identity.csv alone: identity value = mean of its seeds' ok records."""
    def side(cell):
        sel = per_identity[(per_identity["metric"] == contrast["metric"]) & (per_identity["status"] == "ok")]
        for k, v in cell.items():
            sel = sel[sel[k] == v]
        return sel.groupby("identity")["value"].mean()

    a, b = side(contrast["a"]), side(contrast["b"])
    both = a.index.intersection(b.index)
    d = (a[both] - b[both]).to_numpy(dtype=float)
    n = len(d)
    from scipy import stats

    mean = float(d.mean()) if n else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    alternative = contrast.get("direction", "two-sided")
    if n < 2:
        p = math.nan
    elif d.std(ddof=1) == 0:  # t is 0 or infinite
        against = {"greater": mean <= 0, "less": mean >= 0}.get(alternative, mean == 0)
        p = 1.0 if against else 0.0
    else:
        p = float(stats.ttest_1samp(d, 0.0, alternative=alternative).pvalue)
    return {"n": n, "diff": mean, "ci95": half, "p": p}


def _holm_by_hand(ps: list[float]) -> list[float]:
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def _number(text: str) -> float:
    return float(text.replace("−", "-"))


def check_contrasts_csv(folder: Path, contrasts: list[dict]) -> int:
    """Every row of ``folder/contrasts.csv`` recomputed from ``folder/per_identity.csv`` alone."""
    per_identity = pd.read_csv(folder / "per_identity.csv", dtype={"identity": str, "attack": str, "purifier": str,
                                                                   "defense": str, "personalizer": str})
    assert list(per_identity.columns) == leaderboard.PER_IDENTITY
    table = pd.read_csv(folder / "contrasts.csv", dtype=str, keep_default_na=False)
    assert len(table) == len(contrasts)
    got = [_recompute(per_identity, c) for c in contrasts]
    families: dict[str, list[int]] = {}
    for i, c in enumerate(contrasts):
        families.setdefault(c.get("family") or f"alone-{i}", []).append(i)
    adjusted = [math.nan] * len(contrasts)
    for members in families.values():
        tested = [i for i in members if not math.isnan(got[i]["p"])]
        for i, p in zip(tested, _holm_by_hand([got[i]["p"] for i in tested])):
            adjusted[i] = p
    for (_, row), c, want, p_adj in zip(table.iterrows(), contrasts, got, adjusted):
        assert row["contrast"] == c["label"] and int(row["n identities"]) == want["n"]
        if want["n"] < 2:
            continue
        diff, half = (_number(x) for x in re.fullmatch(r"(\S+) ± (\S+)", row["a − b"]).groups())
        assert diff == pytest.approx(want["diff"], abs=6e-5) and half == pytest.approx(want["ci95"], abs=6e-5)
        low, high = (_number(x) for x in re.fullmatch(r"\[(\S+), (\S+)\]", row["95% interval"]).groups())
        assert low == pytest.approx(want["diff"] - want["ci95"], abs=6e-5)
        assert high == pytest.approx(want["diff"] + want["ci95"], abs=6e-5)
        assert _number(row["p"]) == pytest.approx(want["p"], rel=1e-3, abs=1e-12)
        assert _number(row["p (Holm)"]) == pytest.approx(p_adj, rel=1e-3, abs=1e-12)
        direction = c.get("direction", "two-sided")
        shown = p_adj < 0.05
        expect = ("not shown" if not shown else "a > b" if direction == "greater" else "a < b"
                  if direction == "less" else "a > b" if want["diff"] > 0 else "a < b")
        assert row["verdict (α = 0.05)"] == expect
    return len(table)


def test_leaderboard_writes_per_identity_and_contrasts_recompute_from_it(two_identities, tmp_path):
    run_dir, records = two_identities
    leaderboard.write(run_dir, tmp_path)
    per_identity = pd.read_csv(tmp_path / "per_identity.csv")
    assert len(per_identity) == len(records)  # one row per record
    assert set(per_identity["identity"]) == {"astronaut", "hopper"}
    info = json.loads((run_dir / "run.json").read_text())
    from benchbase.suite import contrasts_of

    contrasts = contrasts_of(info["suite_data"])
    assert check_contrasts_csv(tmp_path, contrasts) == 3
    table = pd.read_csv(tmp_path / "contrasts.csv", dtype=str, keep_default_na=False)
    assert list(table["test"]) == ["a < b", "a < b", "a ≠ b"] and list(table["family"]) == ["photos", "photos", ""]
    # the victims pair: a base victim's generations do not depend on the attack, the spy's neither
    assert table.loc[2, "a − b"].startswith("+0.0000 ± 0.0000") and table.loc[2, "verdict (α = 0.05)"] == "not shown"


def test_committed_leaderboards_recompute_from_their_per_identity_csv():
    """Every committed leaderboard folder that holds both files (protocol 1's folders predate
    per_identity.csv and stay as they were)."""
    from benchbase.suite import load_suite

    checked = 0
    for folder in sorted(p for p in LEADERBOARDS.iterdir() if p.is_dir()):
        if not ((folder / "per_identity.csv").is_file() and (folder / "contrasts.csv").is_file()):
            continue
        suite = re.search(r"suite `([^`]+)`", (folder / "leaderboard.md").read_text()).group(1)
        checked += check_contrasts_csv(folder, load_suite(suite).contrasts)
    if not checked:
        pytest.skip("no committed leaderboard has per_identity.csv and contrasts.csv yet")


def test_holm_and_one_sided_p_values_by_hand():
    # four p-values, m = 4: sorted 0.01, 0.02, 0.03, 0.04 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), max(0.06, 0.04)
    assert leaderboard.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert leaderboard.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = leaderboard.holm([0.01, math.nan, 0.03])  # an untested contrast does not count in m
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.03)
    d = np.array([0.1, 0.2, -0.05, 0.3])  # mean 0.1375, sd 0.14930, t = 1.84188 on 3 degrees of freedom
    t = d.mean() / (d.std(ddof=1) / 2)
    assert t == pytest.approx(1.84188, abs=1e-5)
    x = t / math.sqrt(3)  # Student t with 3 degrees of freedom has a closed-form CDF
    cdf = 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi
    greater = leaderboard.t_pvalue(d, "greater")
    assert greater == pytest.approx(1 - cdf, abs=1e-12) and greater == pytest.approx(0.081367, abs=1e-6)
    assert leaderboard.t_pvalue(d, "two-sided") == pytest.approx(2 * greater)
    assert leaderboard.t_pvalue(d, "less") == pytest.approx(1 - greater)
    assert leaderboard.verdict(0.1375, greater, "greater") == "not shown"
    assert leaderboard.verdict(0.1375, 0.01, "greater") == "a > b" and leaderboard.verdict(-1, 0.01, "two-sided") == "a < b"
    assert math.isnan(leaderboard.t_pvalue(d[:1]))
    assert leaderboard.t_pvalue(np.array([0.25, 0.25, 0.25]), "greater") == 0.0  # no spread: t is infinite


def test_contrast_direction_and_family_are_validated():
    from benchbase.errors import ConfigError

    base = {"name": "t", "backend": {"name": "tiny"}, "dataset": {"name": "sample"}, "attacks": ["none", "noise"],
            "personalizers": ["dreambooth"], "metrics": ["psnr"]}
    contrast = {"metric": "psnr", "a": {"attack": "none"}, "b": {"attack": "noise"}}
    (c,) = parse_suite({**base, "contrasts": [contrast]}).contrasts
    assert c["direction"] == "two-sided" and "family" not in c
    (c,) = parse_suite({**base, "contrasts": [{**contrast, "direction": "greater", "family": "f"}]}).contrasts
    assert c["direction"] == "greater" and c["family"] == "f"
    with pytest.raises(ConfigError, match="direction") as err:
        parse_suite({**base, "contrasts": [{**contrast, "direction": "bigger"}]})
    assert len(str(err.value).splitlines()) == 1
