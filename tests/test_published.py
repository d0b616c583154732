"""Published numbers beside measured ones (benchbase.published): the shipped table and the
``<metric> reported`` column of the leaderboard's cells table."""

import math
from pathlib import Path

import pandas as pd
import pytest

from benchbase import leaderboard, published
from benchbase.errors import DataError
from benchbase.records import RunInfo

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_table_is_the_repository_copy_and_every_row_names_its_source():
    shipped = published.default_path()
    assert shipped.read_bytes() == (ROOT / "leaderboards" / "published" / "published.csv").read_bytes()
    rows = published.load()
    assert list(rows.columns) == list(published.COLUMNS) and len(rows) > 0
    assert rows["value"].map(math.isfinite).all()
    for r in rows.to_dict("records"):
        assert r["source"].startswith("https://") and r["arxiv"] and r["table"].startswith("Table ")
        assert r["dataset"] in ("vggface2", "celebahq") and r["model"].startswith("SD-")
    # the consistency check the README describes: Table 4's transformation-training rows are
    # Table 1's VGGFace2 MetaCloak and Clean rows, value for value
    t1 = rows[(rows["table"] == "Table 1") & (rows["dataset"] == "vggface2")]
    t4 = rows[(rows["table"] == "Table 4") & rows["purifier"].eq("trans-training (MetaCloak)")]
    for attack in ("metacloak", "none"):
        assert (t1[t1["attack"] == attack]["value"].tolist() == t4[t4["attack"] == attack]["value"].tolist())


def _suite(model="stabilityai/stable-diffusion-2-1-base", root="data/VGGFace2-clean"):
    return {
        "name": "my-protocol", "backend": {"name": "sd", "model": model}, "dataset": {"name": "folder", "root": root},
        "attacks": ["none", "metacloak", {"name": "metacloak", "label": "metacloak-8", "eps": 8}],
        "purifiers": ["none", "jpeg", {"name": "jpeg", "label": "jpeg-50", "quality": 50}],
        "defenses": ["none"], "personalizers": [{"name": "dreambooth", "label": "dreambooth", "mixed_precision": "bf16"},
                                                {"name": "dreambooth", "label": "db-100", "max_train_steps": 100}],
        "metrics": [{"name": "clip-iqa", "label": "clip-iqac", "variant": "clip-iqac"}, "clip-iqa"],
    }


def _records(suite):
    rows = []
    for identity in ("a", "b"):
        for attack in ("none", "metacloak", "metacloak-8"):
            for purifier in ("none", "jpeg", "jpeg-50"):
                for metric, name in (("clip-iqac", "clip-iqa"), ("clip-iqa", "clip-iqa")):
                    for personalizer in ("dreambooth", "db-100"):
                        rows.append({"identity": identity, "seed": 0, "attack": attack, "purifier": purifier,
                                     "defense": "none", "personalizer": personalizer, "metric": metric,
                                     "metric_name": name, "direction": "lower", "status": "ok", "value": 0.1,
                                     "error": None})
    return pd.DataFrame(rows), RunInfo(suite=suite["name"], suite_data=suite)


def _reported(suite):
    tables = leaderboard.render(leaderboard.views_of(*_records(suite)))
    cells = tables["cells"]
    frame = cells.frame()
    got = {(r["attack"], r["purifier"]): r.get("clip-iqac reported") for r in frame.to_dict("records")
           if r["personalizer"] == "dreambooth"}
    # another recipe (100 steps instead of the default) is not the paper's victim
    assert all(r.get("clip-iqac reported", "—") == "—" for r in frame.to_dict("records") if r["personalizer"] == "db-100")
    return cells, got


def test_matching_cells_get_the_papers_value_and_other_budgets_purifier_settings_metrics_do_not():
    cells, got = _reported(_suite())
    headers = [c.header for c in cells.columns]
    # beside the measured column, and only for the metric measured the paper's way (CLIP-IQA-C)
    assert headers[headers.index("clip-iqac ↓") + 1] == "clip-iqac reported"
    assert "clip-iqa reported" not in headers
    # MetaCloak Table 4, standard training: no purifier -0.380, JPEG -0.363, Oracle (clean) 0.456
    assert got[("metacloak", "none")] == "-0.380 (MetaCloak T4)"
    assert got[("metacloak", "jpeg")] == "-0.363 (MetaCloak T4)"
    assert got[("none", "none")] == "0.456 (MetaCloak T4)"
    col = cells.column("clip-iqac reported")
    assert sorted(v for v in col.values if v is not None) == pytest.approx([-0.380, -0.363, 0.456])
    # a different budget (8 levels, the paper ran 11), a purifier with another option (quality 50),
    # a cell the paper has no number for (clean + JPEG): nothing reported
    assert got[("metacloak-8", "none")] == got[("metacloak-8", "jpeg")] == "—"
    assert got[("metacloak", "jpeg-50")] == "—" and got[("none", "jpeg")] == "—"


def test_no_reported_column_for_another_model_or_dataset():
    for suite in (_suite(model="runwayml/stable-diffusion-v1-5"), _suite(root="data/CelebA-HQ-clean")):
        cells, got = _reported(suite)
        assert not any(c.header.endswith("reported") for c in cells.columns)
    # and the suite's words are what names the dataset and model
    assert published.dataset_of(_suite(root="x/celeba-hq")) == "celebahq"
    assert published.model_of(_suite(model="/models/stable-diffusion-2-1")) == "SD-2.1"
    assert published.model_of({"backend": {"name": "mini"}}) is None


def test_a_broken_table_is_one_line_and_costs_no_leaderboard(tmp_path, monkeypatch):
    bad = tmp_path / "published.csv"
    bad.write_text("paper,value\nx,1\n")
    with pytest.raises(Exception, match=r"published.csv: missing column\(s\) arxiv"):
        published.load(str(bad))
    row = dict.fromkeys(published.COLUMNS, "")
    bad.write_text(",".join(published.COLUMNS) + "\n" + ",".join({**row, "value": "n/a"}.values()) + "\n")
    with pytest.raises(Exception, match=r"published.csv:2: value 'n/a'"):
        published.load(str(bad))

    def broken(path=None):
        raise DataError("published.csv: missing column(s) arxiv")

    monkeypatch.setattr(published, "load", broken)
    with pytest.warns(UserWarning, match="published numbers not shown: published.csv: missing column"):
        cells, _ = _reported(_suite())
    assert cells.column("clip-iqac ↓").values and not any(c.header.endswith("reported") for c in cells.columns)


def test_the_full_protocol_suite_gets_metacloaks_numbers_beside_its_clip_iqac():
    from benchbase.suite import load_suite

    suite = load_suite("sd21-vggface2")
    cells = [(a.label, p, "none", suite.personalizers[0].label) for a in suite.attacks
             for p in ("none", "jpeg", "sr")]
    table = pd.DataFrame(cells, columns=["attack", "purifier", "defense", "personalizer"])
    for label in ("clip-iqac", "clip-iqa", "ism", "liqe"):
        table[f"{label}|status"] = "ok"
    rep = published.reported_view(table, suite.raw)
    assert [c for c in rep.columns if c.endswith("|reported")] == ["clip-iqac|reported"]
    got = {k: v for k, v in zip(cells, rep["clip-iqac|reported"]) if not math.isnan(v)}
    assert {k[:2]: v for k, v in got.items()} == {("none", "none"): 0.456, ("metacloak", "none"): -0.380,
                                                 ("metacloak", "jpeg"): -0.363}
