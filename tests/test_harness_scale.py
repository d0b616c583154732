"""What the harness-at-scale work changed keeps behaviour: the grouped leaderboard table equals
the per-row computation it replaced, value for value; a large run rewrites results.jsonl on a
schedule but ends with every record; planning memoises a cell's nodes without changing a key.
(Speed itself is measured in benchmarks/harness.py, not here.)"""

import math
import random

import numpy as np
import pandas as pd
import pytest

from benchbase import leaderboard
from benchbase.leaderboard import ROW, _summary, t95


def reference_cell_table(df: pd.DataFrame):
    """The per-row/per-metric loop ``cell_table`` was before it was grouped (kept as the oracle)."""
    directions = df.groupby("metric")["direction"].first().to_dict()
    metrics = list(dict.fromkeys(df["metric"]))
    n_ids = df["identity"].nunique()
    rows = []
    for key, group in df.groupby(ROW, sort=False):
        row = dict(zip(ROW, key))
        expected = df[["identity", "seed"]].drop_duplicates().shape[0]
        complete = True
        for metric in metrics:
            g = group[group["metric"] == metric]
            ok = g[g["status"] == "ok"]
            scored = g[g["status"].isin(["ok", "empty"])]
            if len(g) and (g["status"] == "unavailable").all():
                row[f"{metric}|status"] = "unavailable"
                row[f"{metric}|note"] = str(g["error"].iloc[0])
                continue
            if len(scored) < expected:
                complete = False
                row[f"{metric}|status"] = f"incomplete ({len(scored)}/{expected})"
                errors = g[g["status"] == "failed"]["error"]
                row[f"{metric}|note"] = str(errors.iloc[0]) if len(errors) else "missing"
                continue
            if not len(ok):
                row[f"{metric}|status"] = "n/a"
                row[f"{metric}|note"] = str(g["error"].iloc[0])
                continue
            per_identity = ok.groupby("identity")["value"].mean()
            s = _summary(per_identity)
            row[f"{metric}|mean"], row[f"{metric}|ci95"] = s["mean"], s["ci95"]
            row[f"{metric}|status"] = "ok"
        row["identities"] = group[group["status"] == "ok"]["identity"].nunique()
        row["complete"] = complete and row["identities"] == n_ids
        rows.append(row)
    return pd.DataFrame(rows), directions


def random_records(seed: int, identities: int = 7, seeds=(0, 1)) -> pd.DataFrame:
    rng = random.Random(seed)
    metrics = [("ism", "lower"), ("fdfr", "higher"), ("brisque", "lower"), ("weightless", "higher")]
    recs = []
    for ident in [f"id{i}" for i in rng.sample(range(50), identities)]:  # not in sorted order
        for s in seeds:
            for a in ("none", "aspl", "noise"):
                for p in ("none", "jpeg+sr"):
                    for d in ("none", "cdl"):
                        if rng.random() < 0.05:  # a cell with no records at all for this identity
                            continue
                        for m, direction in metrics:
                            if m == "weightless":
                                status = "unavailable"
                            else:
                                status = rng.choices(["ok", "empty", "failed"], [0.85, 0.1, 0.05])[0]
                            value = rng.uniform(-1, 1) * 10 ** rng.randint(-3, 3) if status == "ok" else None
                            recs.append({"identity": ident, "seed": s, "attack": a, "purifier": p, "defense": d,
                                         "personalizer": "dreambooth", "metric": m, "direction": direction,
                                         "status": status, "value": value,
                                         "error": None if status == "ok" else f"{status} {rng.randint(0, 9)}"})
    rng.shuffle(recs)  # records arrive in any order
    return pd.DataFrame(recs)


@pytest.mark.parametrize("seed", range(6))
def test_grouped_cell_table_equals_the_per_row_loop(seed):
    df = random_records(seed, identities=3 + seed)
    new, new_dirs = leaderboard.cell_table(df)
    old, old_dirs = reference_cell_table(df)
    assert new_dirs == old_dirs
    pd.testing.assert_frame_equal(new, old, check_exact=True)
    assert set(new.filter(like="|status").stack()) >= {"ok", "unavailable"}


def test_summary_matches_pandas_for_many_lengths():
    rng = np.random.default_rng(0)
    for n in list(range(1, 40)) + [127, 128, 129, 300, 1000]:
        values = rng.normal(size=n) * 10.0 ** rng.integers(-4, 4)
        s = _summary(pd.Series(values))
        mean, ci = leaderboard._summary_array(values)
        assert mean == s["mean"]
        assert (math.isnan(ci) and math.isnan(s["ci95"])) or ci == s["ci95"]
    assert t95(5) == pytest.approx(2.776, abs=1e-3)


def test_large_run_writes_results_on_a_schedule_and_ends_complete(tmp_path, monkeypatch):
    from benchbase import pipeline
    from benchbase.pipeline import Runner
    from benchbase.suite import parse_suite

    suite = parse_suite({"name": "t", "backend": {"name": "tiny"},
                         "dataset": {"name": "sample", "identities": ["astronaut"], "images_per_set": 2},
                         "attacks": ["none", {"name": "noise", "eps": 4}, {"name": "noise", "label": "n2", "eps": 2}],
                         "purifiers": ["none", "jpeg"], "personalizers": [{"name": "dreambooth", "max_train_steps": 0,
                                                                          "num_class_images": 1, "class_inference_steps": 1,
                                                                          "num_images_per_prompt": 1, "num_inference_steps": 1}],
                         "metrics": ["psnr", "linf"]})
    writes = []
    real = pipeline.atomic_write_text

    def counting(path, text):
        if path.name == "results.jsonl":
            writes.append(text.count("\n"))
        real(path, text)

    monkeypatch.setattr(pipeline, "atomic_write_text", counting)
    small = Runner(suite, tmp_path / "small", progress=False).run()
    assert writes == sorted(writes) and len(writes) >= 6  # every cell, as it finishes (small run)
    writes.clear()
    monkeypatch.setattr(Runner, "SMALL_RUN", 2)  # as if it were a large run
    big = Runner(suite, tmp_path / "big", store_dir=tmp_path / "small" / "store", progress=False).run()
    assert len(writes) < 6 and writes[-1] == len(small.records)  # throttled, then whole at the end
    assert big.records == small.records
    assert (tmp_path / "big" / "results.jsonl").read_text() == (tmp_path / "small" / "results.jsonl").read_text()


def test_plan_keys_are_unchanged_by_memoising(tmp_path):
    """Every score's upstream keys equal a fresh builder's (the memo keeps only the last cell)."""
    from benchbase.pipeline import Runner
    from benchbase.suite import load_suite

    suite = load_suite("tiny-all")
    runner = Runner(suite, tmp_path, progress=False)
    plan = runner.plan()
    fresh = Runner(suite, tmp_path / "other", progress=False)
    for cp in plan.cells[::7]:
        ident = fresh.identity(cp.cell.identity)
        # a fresh builder, cells addressed in another order: the same keys
        assert fresh.stages.stage_keys(ident, cp.cell) == cp.stages
        for spec, key in zip(suite.metrics, cp.scores):
            assert fresh.stages.score(ident, cp.cell, spec).key == key


def test_report_gallery_is_capped_with_a_note(tmp_path):
    """A grid larger than --max-cells gets image grids for the first cells and a note, not
    tens of thousands of thumbnails; the tables still have every cell."""
    from benchbase import report
    from benchbase.pipeline import Runner
    from benchbase.suite import parse_suite

    suite = parse_suite({"name": "cap", "backend": {"name": "tiny"},
                         "dataset": {"name": "sample", "identities": ["astronaut"], "images_per_set": 1},
                         "attacks": ["none", {"name": "noise", "eps": 4}], "purifiers": ["none", "jpeg"],
                         "personalizers": [{"name": "dreambooth", "max_train_steps": 0, "num_class_images": 1,
                                            "class_inference_steps": 1, "num_images_per_prompt": 1,
                                            "num_inference_steps": 1}],
                         "metrics": ["psnr"]})
    Runner(suite, tmp_path, progress=False).run()
    full = report.write(tmp_path, tmp_path / "full").read_text()
    capped = report.write(tmp_path, tmp_path / "capped", max_cells=2).read_text()
    assert "Image grids of the first" not in full
    assert "Image grids of the first 2 of 4 cells" in capped
    assert full.count('<details class="cell"') == 4 and capped.count('<details class="cell"') == 2
    assert capped.count("<tr") == full.count("<tr")  # every cell in the tables


def test_table_rows_equal_record_to_json(tmp_path):
    """The rows tables are built from equal Record.to_json(), the exact path taken for lines
    with a non-finite number or a missing optional field."""
    import json

    from benchbase.records import RESULTS, Record, read_records_and_rows

    base = {"identity": "a", "seed": 0, "attack": "none", "purifier": "none", "defense": "none",
            "personalizer": "db", "metric": "ism", "direction": "lower", "status": "ok", "value": 0.5,
            "details": {"per_image": [0.1, 0.2], "of": "generated"}, "key": "ae309bc1", "stages": {"clean": "k"}}
    lines = [json.dumps(base),
             json.dumps({**base, "value": None, "status": "empty", "details": "not a dict"}),
             json.dumps({k: v for k, v in base.items() if k not in ("details", "stages", "key")}),
             json.dumps({**base, "details": {"per_image": [float("nan"), 1.0]}}),  # NaN token
             json.dumps(base).replace('"value": 0.5', '"value": 1e999'),  # parses as inf
             json.dumps({**base, "extra_field": 1})]
    (tmp_path / RESULTS).write_text("\n".join(lines) + "\n")
    records, rows = read_records_and_rows(tmp_path)
    assert rows == [r.to_json() for r in records]
    assert rows[3]["details"]["per_image"][0] is None and rows[4]["value"] is None
    assert list(rows[0]) == list(Record.ORDER)
