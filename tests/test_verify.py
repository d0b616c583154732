"""`benchbase verify`: every stage records the SHA-256 of its files; verify
re-hashes them, names every damaged stage, exits 1, and marks it and everything computed from it,
so the next run recomputes exactly those — and its records equal the undamaged run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchbase.cli import main
from benchbase.pipeline import Runner
from benchbase.records import DONE, INVALID, StageMeta
from benchbase.suite import parse_suite

SUITE = {"name": "verify", "backend": {"name": "tiny"},
         "dataset": {"name": "sample", "identities": ["astronaut"], "images_per_set": 2},
         "attacks": ["none", {"name": "noise", "eps": 8}], "purifiers": ["jpeg"],
         "personalizers": [{"name": "dreambooth", "max_train_steps": 1, "num_class_images": 1,
                            "class_inference_steps": 2, "num_images_per_prompt": 1, "num_inference_steps": 2}],
         "metrics": ["psnr", "ref-rmse"]}


def run(run_dir: Path):
    return Runner(parse_suite(SUITE), run_dir, progress=False).run()


def verify(*args: str):
    result = CliRunner().invoke(main, ["verify", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def folder(store: Path, stage: str, key: str) -> Path:
    return store / stage / key[:2] / key


def done_stages(store: Path) -> set[tuple[str, str]]:
    return {(p.parts[-4], p.parts[-2]) for p in store.glob(f"*/*/*/{DONE}")}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    summary = run(root / "run")
    assert summary.records and not summary.failed
    return root / "run", summary.records


def test_every_stage_records_the_sha256_of_its_files(original):
    run_dir, _ = original
    metas = [StageMeta.from_json(json.loads(p.read_text())) for p in (run_dir / "store").glob(f"*/*/*/{DONE}")]
    assert metas and all(m.sha256 is not None and set(m.sha256) == set(m.files) for m in metas)
    personalize = [m for m in metas if m.stage == "personalize"]
    assert personalize and all(any(u[0] == "class_images" for u in m.uses) for m in personalize)
    code, out = verify(run_dir)
    assert code == 0 and " 0 damaged" in out, out


def test_one_flipped_byte_is_found_and_exactly_its_dependents_recomputed(original, tmp_path):
    ref_dir, ref_records = original
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)  # a copy: the reference stays whole
    store = run_dir / "store"
    noise = next(r for r in ref_records if r["attack"] == "noise")["stages"]
    png = sorted((folder(store, "protect", noise["protect"]) / "images").glob("*.png"))[0]
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one stored protected PNG
    png.write_bytes(bytes(data))
    before = done_stages(store)

    code, out = verify(run_dir)
    assert code == 1, out
    assert f"damaged: protect {noise['protect']}" in out and f"images/{png.name} differs (SHA-256)" in out
    marked = before - done_stages(store)
    want = {("protect", noise["protect"]), ("purify", noise["purify"]), ("personalize", noise["personalize"]),
            ("generate", noise["generate"])}
    want |= {("score", r["key"]) for r in ref_records if r["attack"] == "noise"}
    assert marked == want  # the damaged stage and everything downstream; nothing of the `none` cell
    assert all((folder(store, s, k) / INVALID).is_file() for s, k in marked)

    again = run(run_dir)
    scores = sum(1 for r in ref_records if r["attack"] == "noise")
    assert again.executed == {"protect": 1, "purify": 1, "personalize": 1, "generate": 1, "score": scores}
    assert again.records == ref_records
    code, out = verify(run_dir)
    assert code == 0 and " 0 damaged" in out, out


def test_a_missing_shared_file_marks_every_stage_that_read_it(original, tmp_path):
    ref_dir, ref_records = original
    store = tmp_path / "store"
    shutil.copytree(ref_dir / "store", store)
    meta_path = next(store.glob(f"class_images/*/*/{DONE}"))
    meta = StageMeta.from_json(json.loads(meta_path.read_text()))
    victim = sorted(meta.sha256)[0]
    (meta_path.parent / victim).unlink()
    before = done_stages(store)
    code, out = verify(store, "--dry-run")  # a store folder, reported only
    assert code == 1 and f"{victim} is missing" in out and "would be marked" in out, out
    assert done_stages(store) == before
    code, out = verify(store)
    marked = {s for s, _ in before - done_stages(store)}
    assert code == 1 and marked == {"class_images", "personalize", "generate", "score"}, marked
    # the psnr scores read only the protection: they are not computed from the class images
    psnr = {r["key"] for r in ref_records if r["metric"] == "psnr"}
    assert all((folder(store, "score", k) / DONE).is_file() for k in psnr)


def test_stages_without_hashes_are_unverifiable_not_damaged(original, tmp_path):
    ref_dir, _ = original
    store = tmp_path / "store"
    shutil.copytree(ref_dir / "store", store)
    for path in store.glob(f"*/*/*/{DONE}"):  # as an older benchbase wrote them
        data = json.loads(path.read_text())
        data.pop("sha256")
        path.write_text(json.dumps(data))
    png = next(store.glob("protect/*/*/images/*.png"))
    png.write_bytes(png.read_bytes()[:-1] + b"\0")
    code, out = verify(store)
    n = len(list(store.glob(f"*/*/*/{DONE}")))
    assert code == 0 and f"0 stages verified, 0 damaged, {n} unverifiable (no hashes" in out, out


def test_verify_of_something_else_is_one_line(tmp_path):
    code, out = verify(tmp_path)
    assert code == 2 and out.startswith("error: ") and len(out.strip().splitlines()) == 1, out
