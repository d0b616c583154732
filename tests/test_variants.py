"""Swept entries (budget curves) and attacks with their own surrogate (transfer): parsing, the
stages they plan, the records, the ``curves``/``transfer`` views, ``benchbase transfer`` and the
report's plot. Tiny backend, CPU; the runs score PSNR only, so no victim is ever trained."""

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from benchbase import leaderboard, report, variants
from benchbase.components import Attack
from benchbase.errors import ConfigError, DataError
from benchbase.hookspecs import hookimpl
from benchbase.pipeline import Runner
from benchbase.records import Record, Stage, dumps_records
from benchbase.suite import parse_suite

BASE = {"backend": {"name": "tiny"}, "dataset": {"name": "sample", "identities": ["astronaut", "hopper"]},
        "attacks": ["none"], "personalizers": ["dreambooth"], "metrics": ["psnr"]}


# ---------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------


def test_a_sweep_is_one_entry_per_value_and_a_list_parameter_is_never_expanded():
    suite = parse_suite({**BASE, "attacks": [
        "aspl", {"name": "aspl", "sweep": {"eps": [2, 6.375, 8.0]}},
        {"name": "simac", "ensemble": [{"name": "tiny"}, {"name": "tiny", "seed": 1}]}],
        "purifiers": ["none", ["jpeg", {"name": "jpeg", "sweep": {"quality": [50, 75]}}]]})
    labels = [a.label for a in suite.attacks]
    assert labels == ["aspl", "aspl[eps=2]", "aspl[eps=6.375]", "aspl[eps=8]", "simac"]
    assert [a.params.get("eps") for a in suite.attacks[1:4]] == [2, 6.375, 8.0]
    assert [a.sweep for a in suite.attacks[1:4]] == [("eps", 2), ("eps", 6.375), ("eps", 8.0)]
    assert {a.base for a in suite.attacks[:4]} == {"aspl"}  # the plain entry's random stream
    assert len(suite.attacks[4].params["ensemble"]) == 2 and suite.attacks[4].sweep is None
    assert [suite.purifier_label(c) for c in suite.purifiers] == ["none", "jpeg+jpeg[quality=50]",
                                                                "jpeg+jpeg[quality=75]"]
    assert suite.n_cells == 5 * 3


@pytest.mark.parametrize("change, message", [
    ({"attacks": [{"name": "noise", "sweep": {"eps": 4}}]}, "non-empty list"),
    ({"attacks": [{"name": "noise", "sweep": {"eps": [4, 4]}}]}, "appears twice"),
    ({"attacks": [{"name": "noise", "sweep": {"eps": [4, 8], "x": [1]}}]}, "one parameter"),
    ({"attacks": [{"name": "noise", "eps": 4, "sweep": {"eps": [4, 8]}}]}, "both a parameter and swept"),
    ({"personalizers": [{"name": "dreambooth", "sweep": {"max_train_steps": [1, 2]}}]}, "attacks and purifiers"),
    ({"purifiers": [{"name": "jpeg", "surrogate": {"name": "tiny"}}]}, "for attacks only"),
    ({"purifiers": [[{"name": "jpeg", "sweep": {"quality": [50, 60]}}, {"name": "jpeg", "sweep": {"quality": [1, 2]}}]]},
     "one purifier of a chain"),
    ({"backend": {"name": "tiny", "sweep": {"seed": [0, 1]}}}, "belong to attack"),
    ({"attacks": [{"name": "noise", "surrogate": 3}]}, "`surrogate` must be a backend table"),
])
def test_bad_sweeps_and_surrogates_are_one_line_each(change, message):
    with pytest.raises(ConfigError) as exc:
        parse_suite({**BASE, **change}, "bad.toml")
    assert message in str(exc.value) and "Traceback" not in str(exc.value)
    assert all(line.startswith("bad.toml: ") for line in str(exc.value).splitlines())


def test_a_surrogate_labels_its_attack_and_is_not_a_parameter_of_it():
    suite = parse_suite({**BASE, "attacks": ["advdm", {"name": "advdm", "surrogate": {"name": "tiny", "seed": 1}},
                                             {"name": "advdm", "surrogate": {"name": "tiny", "label": "B"},
                                              "sweep": {"eps": [4, 8]}}]})
    assert [a.label for a in suite.attacks] == ["advdm", "advdm@tiny(seed=1)", "advdm[eps=4]@B", "advdm[eps=8]@B"]
    assert all("surrogate" not in a.params for a in suite.attacks)
    assert [s.where for s in suite.surrogates()] == ["attacks[1].surrogate", "attacks[2].surrogate",
                                                     "attacks[2].surrogate"]
    assert suite.surrogates()[1] is suite.surrogates()[2]  # a swept entry's model: one component
    assert suite.surrogates()[0] in suite.specs()  # built (validated) with the other components


def test_an_unknown_surrogate_backend_is_one_line_with_close_names(tmp_path):
    suite = parse_suite({**BASE, "attacks": [{"name": "advdm", "surrogate": {"name": "tinyy"}}]}, "s.toml")
    with pytest.raises(ConfigError) as exc:
        Runner(suite, tmp_path / "run", progress=False)
    (line,) = str(exc.value).splitlines()
    assert line.startswith("s.toml: attacks[0].surrogate") and "'tiny'" in line


def test_a_surrogate_at_another_resolution_is_refused(tmp_path):
    suite = parse_suite({**BASE, "attacks": [{"name": "advdm", "surrogate": {"name": "tiny", "resolution": 32}}]})
    with pytest.raises(ConfigError, match="works at 32 px, the suite's backend at 64 px"):
        Runner(suite, tmp_path / "run", progress=False)


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


def _protect_nodes(runner: Runner) -> dict[str, str]:
    """The protect key of each attack label (of the first identity's cells)."""
    plan = runner._plan or runner.plan()
    return {cp.cell.attack.label: cp.stages["protect"] for cp in plan.cells if cp.cell.identity == "astronaut"}


def test_a_two_value_sweep_plans_two_protect_stages_with_their_own_keys(tmp_path):
    swept = Runner(parse_suite({**BASE, "attacks": [{"name": "noise", "sweep": {"eps": [4, 8]}}]}),
                   tmp_path / "a", progress=False)
    plain = Runner(parse_suite({**BASE, "attacks": [{"name": "noise", "eps": 4}]}), tmp_path / "b", progress=False)
    keys, one = _protect_nodes(swept), _protect_nodes(plain)
    def count(runner, stage):
        return sum(n.stage == stage for n in runner._plan.nodes.values())

    assert count(swept, Stage.PROTECT) == 2 * count(plain, Stage.PROTECT) == 2 * 2  # 2 identities
    assert count(swept, Stage.SCORE) == 2 * count(plain, Stage.SCORE)
    assert count(swept, Stage.CLEAN) == count(plain, Stage.CLEAN) == 2  # one clean set per identity
    assert set(keys) == {"noise[eps=4]", "noise[eps=8]"} and keys["noise[eps=4]"] != keys["noise[eps=8]"]
    assert keys["noise[eps=4]"] == one["noise"]  # a swept value is the plain entry's stage
    assert len(swept._plan.cells) == 2 * len(plain._plan.cells)


class Spy(Attack):
    """Records which model the protect stage was handed (and changes nothing)."""

    def protect(self, images, ctx):
        ctx.info["model"] = ctx.backend.fingerprint()
        return images


class SpyPlugin:
    @hookimpl
    def register_attacks(self, register):
        register("spy", Spy)


def _manager():
    from benchbase.plugins import PluginManager

    pm = PluginManager()
    pm.register(SpyPlugin(), name="variants-test-plugin")
    return pm


def test_the_protect_stage_gets_the_surrogate_and_everything_downstream_the_victim(tmp_path):
    suite = parse_suite({**BASE, "dataset": {"name": "sample", "identities": ["astronaut"]},
                         "attacks": ["spy", {"name": "spy", "surrogate": {"name": "tiny", "seed": 1}},
                                     {"name": "spy", "label": "same", "surrogate": {"name": "tiny"}}],
                         "metrics": ["psnr", "ref-rmse"]})
    runner = Runner(suite, tmp_path / "run", manager=_manager(), progress=False)
    plan = runner.plan()
    keys = _protect_nodes(runner)
    assert keys["spy"] == keys["same@tiny"] != keys["spy@tiny(seed=1)"]  # the same model is the same stage
    node = next(n for n in plan.nodes.values() if n.key == keys["spy@tiny(seed=1)"])
    other = runner.component(suite.surrogates()[0]).fingerprint()
    assert other != runner.backend_fp and runner.node_at(node.address).parts["backend"] == other
    assert runner.run_stage(node.address).ok
    assert runner.store.meta(Stage.PROTECT, node.key).info["model"] == other
    for n in plan.nodes.values():  # the victim keeps the suite's model
        if n.stage in (Stage.PURIFY, Stage.PERSONALIZE):
            assert runner.node_at(n.address).parts["backend"] == runner.backend_fp


# ---------------------------------------------------------------------------------------
# Views from records
# ---------------------------------------------------------------------------------------


def _rows(victim: str, cells: list[tuple], values: dict) -> list[dict]:
    """Records of a run on ``victim``: cells are (attack label, attack_base, surrogate, sweep)."""
    out = []
    for attack, base, surrogate, sweep in cells:
        for i, identity in enumerate(("a", "b", "c")):
            out.append(Record(identity=identity, seed=0, attack=attack, purifier="none", defense="none",
                              personalizer="db", metric="ism", direction="lower", status="ok",
                              attack_name=base.split("[")[0], value=values[attack] + 0.01 * i, surrogate=surrogate,
                              victim=victim, attack_base=base, sweep=sweep, metric_name="ism").to_json())
    return out


def test_the_curves_view_has_one_row_per_line_and_value_in_order():
    sweep = lambda v, curve="aspl": {"attack": {"param": "eps", "value": v, "curve": curve}}  # noqa: E731
    rows = _rows("mini", [("none", "none", "mini", {}), ("aspl[eps=8]", "aspl[eps=8]", "mini", sweep(8)),
                          ("aspl[eps=2]", "aspl[eps=2]", "mini", sweep(2)),
                          ("noise[eps=2]", "noise[eps=2]", "mini", sweep(2, "noise")),
                          ("noise[eps=8]", "noise[eps=8]", "mini", sweep(8, "noise"))],
                 {"none": 0.7, "aspl[eps=8]": 0.3, "aspl[eps=2]": 0.6, "noise[eps=2]": 0.69, "noise[eps=8]": 0.65})
    df = pd.DataFrame(rows)
    table, directions = leaderboard.cell_table(df)
    view = variants.curves_view(df, table)
    assert list(zip(view["curve"], view["value"])) == [("aspl", 2), ("aspl", 8), ("noise", 2), ("noise", 8)]
    assert view["ism|mean"].round(3).tolist() == [0.61, 0.31, 0.70, 0.66]
    assert (view["ism|ci95"] > 0).all() and (view["identities"] == 3).all()
    lines = variants.curve_lines(view)[("attack", "eps")]
    assert [(line["label"], line["name"]) for line in lines] == [("aspl", "aspl"), ("noise", "noise")]
    assert [round(m, 3) for _, m, _ in lines[0]["points"]["ism"]] == [0.61, 0.31]
    rendered = variants.render_curves(view, directions).frame()
    assert rendered["ism ↓"].tolist()[0].startswith("0.610 ± ")
    assert "curves" not in leaderboard.views_of(df[df["attack"] == "none"], leaderboard.RunInfo())


def _fake_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text(dumps_records(rows))
    return folder


def test_the_transfer_matrix_of_two_victims(tmp_path):
    a = _rows("v2", [("none", "none", "v2", {}), ("aspl", "aspl", "v2", {}), ("aspl@v3", "aspl", "v3", {})],
              {"none": 0.8, "aspl": 0.2, "aspl@v3": 0.5})
    b = _rows("v3", [("none", "none", "v3", {}), ("aspl", "aspl", "v3", {}), ("aspl@v2", "aspl", "v2", {})],
              {"none": 0.8, "aspl": 0.1, "aspl@v2": 0.6})
    view = variants.transfer_view(pd.DataFrame(a + b))
    # only aspl was made on another model than its victim: "none" is no matrix
    got = {(s, v): round(m, 3) for s, v, m in zip(view["surrogate"], view["victim"], view["ism|mean"])}
    assert set(view["attack"]) == {"aspl"}
    assert got == {("v2", "v2"): 0.21, ("v3", "v2"): 0.51, ("v3", "v3"): 0.11, ("v2", "v3"): 0.61}
    md, text = variants.write_transfer([_fake_run(tmp_path / "r2", a), _fake_run(tmp_path / "r3", b)],
                                       tmp_path / "out")
    frame = pd.read_csv(tmp_path / "out" / "transfer.csv")
    assert frame.columns.tolist()[4:7] == ["protected on", "ism ↓ · fine-tuned on v2", "ism ↓ · fine-tuned on v3"]
    assert frame["protected on"].tolist() == ["v2", "v3"]
    assert frame["ism ↓ · fine-tuned on v3"].tolist()[0].startswith("0.610 ± ")  # made on v2, trained on v3
    assert "## Transfer" in text and md.is_file() and (tmp_path / "out" / "transfer_numeric.csv").is_file()
    out = CliRunner().invoke(__import__("benchbase.cli", fromlist=["main"]).main,
                             ["transfer", str(tmp_path / "r2"), str(tmp_path / "r2"), "--out", str(tmp_path / "o")])
    assert out.exit_code != 0 and "both fine-tune 'v2'" in out.output
    old = [{k: v for k, v in r.items() if k not in ("victim", "surrogate")} for r in a]
    with pytest.raises(DataError, match="name no victim model"):
        variants.transfer_frames([_fake_run(tmp_path / "old", old)])


# ---------------------------------------------------------------------------------------
# Real runs: records, leaderboard, report, a shared store across victims
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_victims(tmp_path_factory):
    """Two runs sharing a store: victim tiny (seed 0) and victim tiny (seed 1); each protects with
    AdvDM on both models, and sweeps noise over two budgets. Scores PSNR (no fine-tuning)."""
    root = tmp_path_factory.mktemp("variants")
    store = root / "store"
    models = {"A": {"name": "tiny"}, "B": {"name": "tiny", "seed": 1}}
    runs = {}
    for victim, other in (("A", "B"), ("B", "A")):
        suite = parse_suite({**BASE, "name": f"victim-{victim}", "backend": models[victim], "attacks": [
            "none", {"name": "noise", "sweep": {"eps": [4, 8]}}, {"name": "advdm", "steps": 1},
            {"name": "advdm", "steps": 1, "surrogate": models[other]}]})
        runs[victim] = Runner(suite, root / victim, store_dir=store, progress=False).run()
    return root, runs


def test_runs_record_the_variants_and_share_protections_across_victims(two_victims):
    root, runs = two_victims
    recs = {r["attack"]: r for r in runs["A"].records if r["identity"] == "astronaut"}
    assert recs["advdm@tiny(seed=1)"]["surrogate"] == "tiny(seed=1)" and recs["advdm"]["surrogate"] == "tiny"
    assert {r["victim"] for r in runs["A"].records} == {"tiny"}
    assert recs["advdm@tiny(seed=1)"]["attack_base"] == "advdm"
    assert recs["noise[eps=8]"]["sweep"] == {"attack": {"param": "eps", "value": 8, "curve": "noise"}}
    # victim B's AdvDM made on A is victim A's plain AdvDM: computed once, in the first run
    b = {r["attack"]: r for r in runs["B"].records if r["identity"] == "astronaut"}
    assert b["advdm@tiny"]["stages"]["protect"] == recs["advdm"]["stages"]["protect"]
    assert b["advdm"]["stages"]["protect"] == recs["advdm@tiny(seed=1)"]["stages"]["protect"]
    assert b["advdm@tiny"]["value"] == recs["advdm"]["value"]
    # both AdvDMs came from the store; `none` and noise depend on no model but their keys name the
    # suite's backend, as every protect key does: 2 identities x (none, noise x 2)
    assert runs["B"].executed["protect"] == 2 * 3 and runs["A"].executed["protect"] == 2 * 5


def test_leaderboard_transfer_command_and_report_of_real_runs(two_victims, tmp_path):
    root, _ = two_victims
    md, text = leaderboard.write(root / "A")
    assert "## Budget curves" in text and "## Transfer" in text
    curves = pd.read_csv(root / "A" / "leaderboard" / "curves_numeric.csv")
    assert curves["value"].tolist() == [4, 8] and (curves["psnr|mean"].diff().dropna() < 0).all()
    _, matrix = variants.write_transfer([root / "A", root / "B"], tmp_path / "t")
    frame = pd.read_csv(tmp_path / "t" / "transfer.csv")
    assert frame["attack"].tolist() == ["advdm", "advdm"]
    assert frame["protected on"].tolist() == ["tiny", "tiny(seed=1)"]
    assert frame.filter(like="fine-tuned on").shape[1] == 2 and not frame.isna().any().any()
    index = report.write(root / "A", tmp_path / "report")
    html = index.read_text()
    svg = tmp_path / "report" / "plots" / "curves-0-eps.svg"
    assert "Budget curves" in html and "plots/curves-0-eps.svg" in html and svg.is_file()
    text = svg.read_text()
    assert 'id="curve-0-0' in text and "psnr ↑ (visibility cost)" in text and "attack eps" in text
