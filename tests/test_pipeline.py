"""The runner: end to end on the tiny backend, pure cache hits, resume after an interruption,
failed cells recorded while the grid goes on, unavailable metrics."""

import json

import pytest
import torch

from benchbase import hookimpl, leaderboard
from benchbase.components import Attack, Defense, Metric, MetricValue, Purifier
from benchbase.errors import WeightsUnavailableError
from benchbase.pipeline import Runner
from benchbase.plugins import PluginManager
from benchbase.suite import load_suite, parse_suite
from benchbase_plugins.personalizers.dreambooth import DreamBooth

FAST_DREAMBOOTH = {"name": "dreambooth", "max_train_steps": 2, "num_class_images": 2, "class_inference_steps": 2,
                   "num_images_per_prompt": 2, "num_inference_steps": 2}


def small_suite(**over):
    data = {"name": "t", "backend": {"name": "tiny"}, "dataset": {"name": "sample", "identities": ["astronaut"]},
            "attacks": ["none", {"name": "noise", "eps": 8}], "purifiers": ["none", "jpeg"],
            "personalizers": [FAST_DREAMBOOTH], "metrics": ["psnr", "ref-rmse"]}
    data.update(over)
    return parse_suite(data)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The built-in smoke suite, run twice into the same folder."""
    run_dir = tmp_path_factory.mktemp("smoke")
    suite = load_suite("smoke")
    first = Runner(suite, run_dir, progress=False).run()
    second = Runner(suite, run_dir, progress=False).run()
    return run_dir, first, second


def test_smoke_suite_end_to_end(smoke_runs):
    run_dir, first, _ = smoke_runs
    assert not first.failed, first.failed[:2]
    metrics = {r["metric"] for r in first.records}
    assert {"psnr", "ref-rmse"} <= metrics
    for stage in ("protect", "purify", "personalize", "generate", "score", "class_images"):
        assert first.executed.get(stage), f"stage {stage} never ran"
    # one protection per identity x attack, shared by both purifiers
    n_ids = len({r["identity"] for r in first.records})
    assert first.executed["protect"] == n_ids * 2
    noise_psnr = [r["value"] for r in first.records if r["attack"] == "noise" and r["metric"] == "psnr"]
    assert all(25 < v < 45 for v in noise_psnr)  # uniform ±8 levels: ≈ 10·log10(3·255²/64) ≈ 34 dB
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["suite"] == "smoke" and "torch" in info["packages"]
    md, text = leaderboard.write(run_dir)
    assert "Random-weight model" in text and "psnr ↑" in text and (md.parent / "cells.csv").is_file()
    # what the committed smoke leaderboard holds: every record, and the suite's contrasts
    assert len((md.parent / "per_identity.csv").read_text().splitlines()) == len(first.records) + 1
    assert len((md.parent / "contrasts.csv").read_text().splitlines()) == 1 + 2


def test_second_run_is_a_pure_cache_hit(smoke_runs):
    _, first, second = smoke_runs
    assert second.executed == {}, second.executed
    assert second.records == first.records


def test_protected_pngs_respect_the_budget(smoke_runs):
    run_dir, _, _ = smoke_runs
    metas = [json.loads(p.read_text()) for p in (run_dir / "store" / "protect").glob("*/*/_done.json")]
    assert metas and all(m["info"]["linf_levels"] <= m["info"]["eps_levels"] for m in metas)
    noise = [m for m in metas if m["parts"]["attack"]["name"] == "noise"]
    assert all(m["info"]["linf_levels"] == 8 for m in noise)


class Interrupting(Purifier):
    """Raises KeyboardInterrupt (like Ctrl-C) on its first call in this process."""

    calls = 0

    def purify(self, images, ctx):
        type(self).calls += 1
        if type(self).calls == 1:
            raise KeyboardInterrupt
        return images


class Exploding(Purifier):
    def purify(self, images, ctx):
        raise ValueError("this purifier always fails")


class Caching(Purifier):
    """Keeps a 'model' between batches, like the diffusion purifiers do."""

    released = 0

    def purify(self, images, ctx):
        self._model = object()
        return images

    def release(self):
        type(self).released += 1
        self._model = None


class NeedsWeights(Metric):
    reads = ("protected", "clean")

    def score(self, inputs, ctx):
        raise WeightsUnavailableError("unavailable: imaginary-net — put its weights in ~/imaginary")


class TestPlugin:
    @hookimpl
    def register_purifiers(self, register):
        register("interrupting", Interrupting)
        register("exploding", Exploding)
        register("caching", Caching)

    @hookimpl
    def register_metrics(self, register):
        register("needs-weights", NeedsWeights)


def manager():
    pm = PluginManager()
    pm.register(TestPlugin(), name="test-plugin")
    return pm


def test_interrupted_run_resumes_with_only_unfinished_stages(tmp_path):
    Interrupting.calls = 0
    suite = small_suite(attacks=[{"name": "noise", "eps": 8}], purifiers=["none", "interrupting"], metrics=["psnr", "ref-rmse"])
    with pytest.raises(KeyboardInterrupt):
        Runner(suite, tmp_path, manager=manager(), progress=False).run()
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "interrupted"
    resumed = Runner(suite, tmp_path, manager=manager(), progress=False).run()
    # the protection and the whole 'none' branch finished before the interruption
    assert "protect" not in resumed.executed
    assert resumed.executed["purify"] == 1 and resumed.executed["personalize"] == 1
    assert not resumed.failed
    assert not list((tmp_path / "store").glob("*/*/.*"))  # no temporary leftovers


def test_failed_cell_is_recorded_and_grid_goes_on(tmp_path):
    suite = small_suite(attacks=["none"], purifiers=["exploding", "none"], metrics=["psnr", "ref-rmse"])
    summary = Runner(suite, tmp_path, manager=manager(), progress=False).run()
    exploding = [r for r in summary.records if r["purifier"] == "exploding"]
    failed = [r for r in exploding if r["metric"] == "ref-rmse"]  # needs the purified images
    assert failed and all(r["status"] == "failed" and "always fails" in r["error"] for r in failed)
    # psnr of the protection does not depend on the purifier, so it still scores, even there
    assert all(r["status"] == "ok" for r in exploding if r["metric"] == "psnr")
    assert all(r["status"] == "ok" for r in summary.records if r["purifier"] == "none")
    text = leaderboard.write(tmp_path)[1]
    assert "INCOMPLETE" in text


def test_unavailable_metric_is_recorded_not_zero(tmp_path):
    suite = small_suite(attacks=["none"], purifiers=["none"], metrics=["psnr", "needs-weights"])
    summary = Runner(suite, tmp_path, manager=manager(), progress=False).run()
    rec = [r for r in summary.records if r["metric"] == "needs-weights"][0]
    assert rec["status"] == "unavailable" and rec["value"] is None and "imaginary-net" in rec["error"]
    text = leaderboard.write(tmp_path)[1]
    assert "unavailable" in text and "imaginary-net" in text


def test_purifier_chain_and_labels(tmp_path):
    suite = small_suite(attacks=["noise"], purifiers=[["jpeg", {"name": "jpeg", "quality": 30}]],
                        metrics=[{"name": "psnr", "of": "purified"}])
    assert suite.purifier_label(suite.purifiers[0]).count("jpeg") == 2
    summary = Runner(suite, tmp_path, progress=False).run()
    assert summary.records[0]["status"] == "ok"


def test_cache_key_changes_with_parameters(tmp_path):
    a = Runner(small_suite(attacks=[{"name": "noise", "eps": 4}], purifiers=["none"], metrics=["psnr"]), tmp_path,
               progress=False).run()
    b = Runner(small_suite(attacks=[{"name": "noise", "eps": 2}], purifiers=["none"], metrics=["psnr"]), tmp_path,
               progress=False).run()
    assert b.executed.get("protect") == 1
    assert a.records[0]["value"] < b.records[0]["value"]  # smaller budget, higher PSNR


def test_seeds_are_deterministic(tmp_path):
    suite = small_suite(attacks=["noise"], purifiers=["none"], metrics=["psnr"])
    r1 = Runner(suite, tmp_path / "a", progress=False).run().records
    r2 = Runner(suite, tmp_path / "b", progress=False).run().records
    assert [r["value"] for r in r1] == [r["value"] for r in r2]
    other = small_suite(attacks=["noise"], purifiers=["none"], metrics=["psnr"], seeds=[1])
    r3 = Runner(other, tmp_path / "c", progress=False).run().records
    assert r3[0]["value"] != r1[0]["value"]


def test_dreambooth_changes_weights_and_caches_class_images(tmp_path, tiny):
    from benchbase.components import Defense
    from benchbase.testing import make_context, sample_identity
    from benchbase_plugins.personalizers.dreambooth import DreamBooth

    ident = sample_identity(resolution=64)
    ctx = make_context(backend=tiny, identity=ident, store_dir=tmp_path / "store")
    db = DreamBooth(max_train_steps=3, learning_rate=1e-3, num_class_images=2, class_inference_steps=2,
                    num_images_per_prompt=3, num_inference_steps=2, generation_batch_size=2)
    db.train(ident.set_B, ctx, Defense(), tmp_path / "model")
    assert (tmp_path / "model" / "unet").is_dir() and ctx.info["steps"] == 3
    # the victim's loss on the instance images: mean of the last 10 (here all 3) steps, one value per 10
    assert len(ctx.info["instance_loss_trajectory"]) == 1 and ctx.info["final_instance_loss"] > 0
    assert ctx.info["final_instance_loss"] == pytest.approx(ctx.info["instance_loss_trajectory"][0])
    from safetensors.torch import load_file

    trained = load_file(next((tmp_path / "model" / "unet").glob("*.safetensors")))
    base = tiny.load(torch.device("cpu"), torch.float32).unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in trained)
    images = db.generate(tmp_path / "model", ctx, Defense())
    assert list(images) == ctx.prompts.eval and images[ctx.prompts.eval[0]].shape == (3, 3, 64, 64)
    store_dirs = list((tmp_path / "store" / "class_images").glob("*/*/_done.json"))
    assert len(store_dirs) == 1


def test_purifier_models_are_released_after_the_purify_stage(tmp_path):
    Caching.released = 0
    suite = small_suite(attacks=["none", "noise"], purifiers=["caching"], metrics=[{"name": "psnr", "of": "purified"}])
    runner = Runner(suite, tmp_path, manager=manager(), progress=False)
    runner.run()
    assert Caching.released == 2  # once per purify stage (two protections)
    purifier = runner.component(suite.purifiers[0][0])
    assert purifier._model is None


def test_contrasts_are_paired_t_intervals():
    import math

    import pandas as pd
    from scipy.stats import t

    rows = []
    values = {"none": [0.9, 0.8, 0.85, 0.95], "noise": [0.7, 0.75, 0.6, 0.8], "jpeg": [0.8, 0.8, 0.7, 0.9]}
    for cell, vals in values.items():
        for i, v in enumerate(vals):
            rows.append({"identity": f"id{i}", "metric": "ism", "status": "ok", "value": v, "direction": "lower",
                         "attack": "none" if cell == "none" else "noise", "purifier": "jpeg" if cell == "jpeg" else "none",
                         "defense": "none", "personalizer": "db"})
    sel = {"attack": "none", "purifier": "none", "defense": "none", "personalizer": "db"}
    noise = {**sel, "attack": "noise"}
    view = leaderboard.contrasts_view(pd.DataFrame(rows), [
        {"label": "x", "metric": "ism", "a": sel, "b": noise},
        {"label": "y", "metric": "ism", "a": {**noise, "purifier": "jpeg"}, "b": noise, "recovery": sel}])
    d = [a - b for a, b in zip(values["none"], values["noise"])]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    half = t.ppf(0.975, 3) * sd / 2
    # the view holds numbers; text appears only when rendering
    assert view.loc[0, "diff"] == pytest.approx(mean) and view.loc[0, "ci95"] == pytest.approx(half)
    assert bool(view.loc[0, "excludes_0"]) and view.loc[0, "n"] == 4
    rendered = leaderboard.render_contrasts(view)
    assert rendered.column("a − b").text[0] == f"{mean:+.4f} ± {half:.4f}"
    assert rendered.column("a − b").values[0] == pytest.approx(mean)
    gap = sum(values["none"]) / 4 - sum(values["noise"]) / 4
    gain = sum(values["jpeg"]) / 4 - sum(values["noise"]) / 4
    assert view.loc[1, "recovered"] == pytest.approx(gain / gap)
    assert rendered.column("recovered").text[1].startswith(f"{gain / gap:.0%}")
    # no loss to recover (the "attacked" cell is the better one): no percentage is invented
    flipped = leaderboard.contrasts_view(pd.DataFrame(rows), [
        {"label": "z", "metric": "ism", "a": {**noise, "purifier": "jpeg"}, "b": sel, "recovery": noise}])
    assert math.isnan(flipped.loc[0, "recovered"])
    assert leaderboard.render_contrasts(flipped).column("recovered").text[0].startswith("n/a")


def test_dreambooth_batch_of_two_sees_every_image_and_fused_adamw_matches(tmp_path, tiny):
    """train_batch_size k takes k instance and k class images per step; the fused CPU AdamW
    gives the same update as the per-tensor loop."""
    from benchbase.components import Defense
    from benchbase.testing import make_context, sample_identity
    from benchbase.toolkit import fused_kwargs
    from benchbase_plugins.personalizers.dreambooth import DreamBooth

    seen = []

    class Spy(Defense):
        def transform_batch(self, batch, ctx):
            seen.append((batch["instance_images"].shape[0], batch["class_images"].shape[0]))
            return batch

    ident = sample_identity(resolution=64)
    ctx = make_context(backend=tiny, identity=ident, store_dir=tmp_path / "store")
    db = DreamBooth(max_train_steps=2, train_batch_size=2, learning_rate=1e-3, num_class_images=2,
                    class_inference_steps=2)
    db.train(ident.set_B, ctx, Spy(), tmp_path / "model")
    assert seen == [(2, 2), (2, 2)] and ctx.info["steps"] == 2
    w = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    v = [torch.nn.Parameter(x.detach().clone()) for x in w]
    assert fused_kwargs(w) == {"fused": True}
    a, b = torch.optim.AdamW(w, lr=1e-2, **fused_kwargs(w)), torch.optim.AdamW(v, lr=1e-2)
    for _ in range(3):
        for opt, ps in ((a, w), (b, v)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in ps).backward()
            opt.step()
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(w, v))


def test_leaderboard_header_names_the_face_models():
    """FDFR/ISM depend on the detector, its threshold and the embedder: the header says which."""
    import pandas as pd

    details = {"detector": "retinaface", "detector_model": "RetinaFace-R50 (retina-face, PyTorch), threshold 0.9",
               "embedder_model": "ArcFace ResNet-34 (deepface, PyTorch)", "no_face": "drop"}
    df = pd.DataFrame([{"metric": "ism", "identity": "a", "details": details},
                       {"metric": "psnr", "identity": "a", "details": {}}])
    text = leaderboard.header({"suite": "s"}, df)
    assert "- Face models: `ism`: detector RetinaFace-R50 (retina-face, PyTorch), threshold 0.9, embedder " \
           "ArcFace ResNet-34 (deepface, PyTorch), images without a face: drop." in text
    assert "Face models" not in leaderboard.header({}, df[df["metric"] == "psnr"])


# -- unavailable: a stage of any family that cannot run here -------------------

class Absent:
    """Raises ``benchbase.Unavailable`` until ``Absent.installed`` (the weights "arrive")."""

    installed = False

    @staticmethod
    def check(family: str) -> None:
        from benchbase import Unavailable

        if not Absent.installed:
            raise Unavailable(f"unavailable: imaginary-{family} — put its weights in ~/imaginary")


class AbsentAttack(Attack):
    def protect(self, images, ctx):
        Absent.check("attack")
        return images


class AbsentPurifier(Purifier):
    def purify(self, images, ctx):
        Absent.check("purifier")
        return images


class AbsentDefense(Defense):
    def transform_batch(self, batch, ctx):
        Absent.check("defense")
        return batch


class AbsentPersonalizer(DreamBooth):
    def train(self, images, ctx, defense, out_dir):
        Absent.check("personalizer")
        return super().train(images, ctx, defense, out_dir)


class AbsentMetric(Metric):
    reads = ("protected", "clean")

    def score(self, inputs, ctx):
        Absent.check("metric")
        return MetricValue(value=1.0)


class AbsentPlugin:
    @hookimpl
    def register_attacks(self, register):
        register("absent", AbsentAttack)

    @hookimpl
    def register_purifiers(self, register):
        register("absent", AbsentPurifier)

    @hookimpl
    def register_defenses(self, register):
        register("absent", AbsentDefense)

    @hookimpl
    def register_personalizers(self, register):
        register("absent", AbsentPersonalizer)

    @hookimpl
    def register_metrics(self, register):
        register("absent", AbsentMetric)


ABSENT_CELLS = {  # family -> the suite entries that put the absent component in the grid, the stage
    "attack": ({"attacks": ["absent"]}, "protect"),
    "purifier": ({"purifiers": ["absent"]}, "purify"),
    "defense": ({"defenses": ["absent"]}, "personalize"),
    "personalizer": ({"personalizers": [{**FAST_DREAMBOOTH, "name": "absent"}]}, "personalize"),
    "metric": ({"metrics": ["absent", "ref-rmse"]}, "score"),
}


@pytest.mark.parametrize("family", list(ABSENT_CELLS))
def test_absent_model_is_unavailable_not_failed_in_every_family(tmp_path, family):
    over, stage = ABSENT_CELLS[family]
    pm = PluginManager()
    pm.register(AbsentPlugin(), name="absent-plugin")
    suite = small_suite(**{"attacks": ["none"], "purifiers": ["none"], "metrics": ["ref-rmse"], **over})
    Absent.installed = False
    summary = Runner(suite, tmp_path, manager=pm, progress=False).run()
    assert summary.records and not summary.failed
    needs = [r for r in summary.records if r["status"] != "ok"]
    assert needs and all(r["status"] == "unavailable" and r["value"] is None for r in needs)
    # the reason, and the stage when it is not the metric's own
    want = f"unavailable: imaginary-{family}" if family == "metric" else f"{stage} unavailable: imaginary-{family}"
    assert all(r["error"].startswith(want) and "\n" not in r["error"] for r in needs), needs[0]["error"]
    assert json.loads((tmp_path / "run.json").read_text())["unavailable_records"] == len(needs)
    text = leaderboard.write(tmp_path)[1]
    assert "## Unavailable" in text and f"imaginary-{family}" in text and "## Failures" not in text
    cells = leaderboard.build(tmp_path)["cells"]
    metric = needs[0]["metric"]
    assert set(cells[f"{metric}|status"]) == {"unavailable"}
    # not cached: once the weights are there, the next run computes it (and only what was missing)
    Absent.installed = True
    try:
        again = Runner(suite, tmp_path, manager=pm, progress=False).run()
    finally:
        Absent.installed = False
    assert again.executed.get(stage) and "clean" not in again.executed
    assert all(r["status"] == "ok" for r in again.records), [r["error"] for r in again.records]
