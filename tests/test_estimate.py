"""`benchbase estimate`: the cost model plans the run's own graph (the counts are what a run
executes), prices every bundled component, and fails in one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchbase import estimate as cost_model
from benchbase.errors import ConfigError, DataError
from benchbase.pipeline import Runner
from benchbase.plugins import get_plugin_manager
from benchbase.store import read_stage_metas
from benchbase.suite import load_suite, parse_suite

BENCHBASE = [sys.executable, "-m", "benchbase.cli"]
CLASS = {"num_class_images": 2, "class_inference_steps": 2}


def cli(*args):
    return subprocess.run([*BENCHBASE, *args], capture_output=True, text=True, timeout=300)


def sharing_suite():
    """Two identities; ASPL and DreamBooth ask for the same class images (one shared stage);
    psnr reads only the protection (shared by every purifier), ref-rmse the generations."""
    return parse_suite({
        "name": "est", "backend": {"name": "tiny"},
        "dataset": {"name": "sample", "images_per_set": 2},
        "attacks": ["none", {"name": "aspl", "max_train_steps": 1, "max_f_train_steps": 1,
                             "max_adv_train_steps": 1, **CLASS}],
        "purifiers": ["none", "jpeg"],
        "personalizers": [{"name": "dreambooth", "max_train_steps": 1, "num_images_per_prompt": 1,
                           "num_inference_steps": 1, **CLASS}],
        "metrics": ["psnr", "ref-rmse"],
    })


def test_unique_stage_counts_equal_what_a_run_executes(tmp_path):
    suite = sharing_suite()
    est = cost_model.estimate(suite)
    summary = Runner(suite, tmp_path / "run", progress=False).run()
    assert not summary.failed
    assert dict(est.counts) == summary.executed
    assert est.counts["class_images"] == 1  # the attack's and the victim's, computed once
    assert est.counts["score"] < len(est_cells := range(est.cells)) * 2  # psnr shared across purifiers
    assert len(est_cells) == 2 * 2 * 2
    assert est.device == "tiny-cpu" and est.total > 0 and not est.missing

    # every stage the run computed has its own figure under its key (what benchmarks/calibrate.py
    # sets beside the store's seconds), the shared stages excepted; the figures add up per kind
    metas = read_stage_metas(tmp_path / "run" / "store")
    own = {(stage, key) for stage, keys in metas.items() if stage != "class_images" for key in keys}
    assert {(stage, key) for key, (stage, _, _) in est.by_key.items()} == own
    for stage in ("protect", "personalize", "generate"):
        assert sum(s for st, _, s in est.by_key.values() if st == stage) == pytest.approx(est.seconds[stage])
    assert {label for st, label, _ in est.by_key.values() if st == "protect"} == {"none", "aspl"}

    # what is left of a finished run: nothing
    left = cost_model.estimate(suite, store=tmp_path / "run" / "store")
    assert sum(left.counts.values()) == 0 and left.total == 0
    assert sum(left.cached.values()) > 0


def test_full_protocol_counts_without_the_data():
    suite = load_suite("sd21-vggface2")
    est = cost_model.estimate(suite, identities=3)
    a, p, d, v = len(suite.attacks), len(suite.purifiers), len(suite.defenses), len(suite.personalizers)
    assert est.cells == 3 * a * p * d * v
    assert est.counts["protect"] == 3 * a
    assert est.counts["purify"] == 3 * a * p
    assert est.counts["personalize"] == est.counts["generate"] == 3 * a * p * d * v
    assert est.counts["class_images"] == 1  # every surrogate attack and DreamBooth share one set
    assert est.counts["fsmg_surrogate"] == 3  # one per identity
    assert est.device == "h200"
    assert not est.missing, est.missing  # every component of the protocol is priced
    # fine-tuning dominates the protocol; unpriced identity attacks cost nothing
    assert max(est.seconds, key=est.seconds.get) == "personalize"
    assert est.by_label[("protect", "none")][1] == 0
    text = cost_model.render(est)
    assert "GPU-hours" in text and "personalize" in text


def test_every_bundled_component_has_a_cost_entry():
    costs = cost_model.load_costs()["components"]
    pm = get_plugin_manager()
    for family in ("attacks", "purifiers", "personalizers"):
        names = set(pm.entries(family))
        missing = names - set(costs[family])
        assert not missing, f"{family} without a cost entry in benchbase/costs.toml: {sorted(missing)}"
    for name in pm.entries("personalizers"):
        assert {"personalize", "generate"} <= set(costs["personalizers"][name])
    assert "*" in costs["metrics"]


def test_formulas_are_arithmetic_only():
    names = {"steps": 10, "mode": "fused", "strengths": [0.0, 0.5, 1.0], "low_res": None}
    assert cost_model.evaluate("steps * 2 if mode == 'fused' else steps", names) == 20
    assert cost_model.evaluate("npositive(strengths)", names) == 2
    assert cost_model.evaluate("ifnone(low_res, 64)", names) == 64
    assert cost_model.evaluate("grid_windows(512, 256, True)", {}) == 10
    assert cost_model.op_name("unet_train.{P}", {"P": "bf16"}) == "unet_train.bf16"
    for bad in ("__import__('os')", "steps.real", "(lambda: 1)()", "nosuch + 1", "[x for x in strengths]"):
        with pytest.raises(ConfigError):
            cost_model.evaluate(bad, names)


def test_missing_image_side_is_scaled_by_area():
    costs = cost_model.Costs({"ops": {"upscale_step.128": 1.0, "upscale_step.512": 20.0}})
    assert costs("upscale_step.256") == pytest.approx(4.0)  # nearest measured side (128, log scale), x area
    assert costs("upscale_step.1024") == pytest.approx(80.0)
    assert costs("pixel_fwd") is None


def test_unreadable_dataset_is_one_line(tmp_path):
    suite = parse_suite({"name": "x", "backend": {"name": "tiny"},
                         "dataset": {"name": "folder", "root": str(tmp_path / "nope")},
                         "attacks": ["none"], "personalizers": ["dreambooth"], "metrics": ["psnr"]})
    with pytest.raises(DataError, match="--identities"):
        cost_model.estimate(suite)


def test_cli_unknown_suite_and_device_are_one_line():
    out = cli("estimate", "smok")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "smoke" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = cli("estimate", "smoke", "--device", "a100")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "h200" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_estimates_a_builtin_suite():
    out = cli("estimate", "sd21-vggface2", "--identities", "2")
    assert out.returncode == 0, out.stderr
    assert "GPU-hours" in out.stdout and "class_images" in out.stdout


def test_calibration_keeps_the_fastest_run_and_prices_a_shared_stage_once():
    """benchmarks/calibrate.py's comparison (no timing: measured seconds made up here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import calibrate

    suites, what = calibrate.calibration_suites({"advdm", "aspl-fp32", "dreambooth"}, [0, 1], world="tiny")
    assert [s.name for s in suites] == ["calibrate-protect", "calibrate-personalize"]
    ests = [cost_model.estimate(s) for s in suites]
    measured, n = [], 0
    for est in ests:
        for key, (stage, label, _) in est.by_key.items():
            n += 1
            measured.append({"stage": stage, "key": key, "seconds": float(n), "cpu_s": n / 2, "load": 1.0})
    measured.append({"stage": "class_images", "key": "whatever", "seconds": 7.0, "cpu_s": 3.0, "load": 2.0})
    device, rows = calibrate.compare(suites, measured, what, None, None)
    assert device == "tiny-cpu"
    by = {(r["stage"], r["component"]): r for r in rows}
    # the identity attack, clean and score stages are not rows; the class images one row, priced
    # once although both suites ask for them
    assert set(by) == {("protect", "advdm"), ("protect", "aspl-fp32"), ("class_images", "shared"),
                       ("personalize", "dreambooth"), ("generate", "dreambooth")}
    shared = [sec for est in ests for (s, _), (_, sec) in est.by_label.items() if s == "class_images"]
    assert by[("class_images", "shared")]["estimate_s"] == pytest.approx(shared[0], abs=1e-3)
    for (stage, label), row in by.items():
        if stage == "class_images":
            continue
        runs = [m for m in measured if m["key"] in ests[0].by_key | ests[1].by_key
                and (ests[0].by_key | ests[1].by_key)[m["key"]][:2] == (stage, label)]
        assert len(row["all_s"]) == len(runs) == 2 * ests[0].identities  # two seeds: two stages per identity
        assert row["measured_s"] == min(m["seconds"] for m in runs)
        assert row["cpu_s"] == min(m["cpu_s"] for m in runs)
        assert row["ratio"] == pytest.approx(row["measured_s"] / row["estimate_s"], abs=0.01)
