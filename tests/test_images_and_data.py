"""Images, budgets and datasets: quantisation keeps the budget, bad input gives clear messages."""

import numpy as np
import pytest
import torch
from PIL import Image

from benchbase.errors import DataError
from benchbase.images import linf_levels, load_image, load_pngs, quantize_to_budget, save_pngs
from benchbase_plugins.datasets.folder import FolderDataset
from benchbase_plugins.datasets.sample import SampleDataset


@pytest.mark.parametrize("eps", [6.375, 8, 11, 16])
@pytest.mark.parametrize("mode", ["round", "truncate"])
def test_budget_holds_after_png_quantisation(tmp_path, eps, mode):
    g = torch.Generator().manual_seed(0)
    clean = torch.floor(torch.rand(2, 3, 32, 32, generator=g) * 255 + 0.5) / 255
    adv = clean + (torch.rand(clean.shape, generator=g) * 2 - 1) * (eps + 3) / 255  # overshoots on purpose
    q = quantize_to_budget(adv, clean, eps, mode)
    save_pngs(q, tmp_path)
    back = load_pngs(tmp_path)
    assert linf_levels(back, clean) <= np.floor(eps)
    assert torch.equal(back, q)


def test_round_half_up_matches_anti_dreambooth():
    clean = torch.zeros(1, 3, 2, 2) + 100 / 255
    adv = clean + 2.5 / 255
    assert quantize_to_budget(adv, clean, 8)[0, 0, 0, 0] * 255 == pytest.approx(103)
    assert quantize_to_budget(adv, clean, 8, "truncate")[0, 0, 0, 0] * 255 == pytest.approx(102)


def make_identity(root, name="alice", n=2, size=(40, 30)):
    rng = np.random.default_rng(0)
    for s in ("set_A", "set_B", "set_C"):
        (root / name / s).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / name / s / f"{i}.png")
    return root / name


def test_folder_dataset_loads_and_center_crops(tmp_path):
    make_identity(tmp_path)
    ds = FolderDataset(root=str(tmp_path))
    assert ds.identities() == ["alice"]
    data = ds.load("alice", 32)
    assert data.set_B.shape == (2, 3, 32, 32) and data.set_B.dtype == torch.float32
    assert torch.equal(data.set_B, torch.round(data.set_B * 255) / 255)  # on the 8-bit grid
    assert ds.fingerprint("alice") == ds.fingerprint("alice")


def test_grayscale_and_rgba_are_converted(tmp_path):
    Image.fromarray(np.full((20, 20), 80, np.uint8), "L").save(tmp_path / "g.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    g = load_image(tmp_path / "g.png")
    a = load_image(tmp_path / "a.png")
    assert g.shape == (3, 20, 20) and torch.allclose(g[0], g[1])
    assert torch.allclose(a, torch.ones_like(a))


@pytest.mark.parametrize("case,message", [
    ("corrupt", "corrupt or truncated"),
    ("not_image", "not an image"),
    ("tiny", "smaller than"),
])
def test_bad_files_name_the_file(tmp_path, case, message):
    ident = make_identity(tmp_path)
    bad = ident / "set_B" / "bad.png"
    if case == "corrupt":
        good = (ident / "set_B" / "0.png").read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    elif case == "not_image":
        bad.write_bytes(b"this is text, not a PNG")
    else:
        Image.new("RGB", (8, 8)).save(bad)
    with pytest.raises(DataError, match=message) as info:
        FolderDataset(root=str(tmp_path)).load("alice", 32)
    assert "bad.png" in str(info.value)


def test_odd_sizes_are_fine(tmp_path):
    make_identity(tmp_path, size=(513, 77))
    assert FolderDataset(root=str(tmp_path)).load("alice", 64).set_A.shape == (2, 3, 64, 64)


def test_empty_set_and_missing_folders(tmp_path):
    ident = make_identity(tmp_path)
    for f in (ident / "set_C").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="set_C contains no images"):
        FolderDataset(root=str(tmp_path)).load("alice", 32)
    (ident / "set_C").rmdir()
    with pytest.raises(DataError, match="set_C is missing"):
        FolderDataset(root=str(tmp_path)).load("alice", 32)
    with pytest.raises(DataError, match="does not exist"):
        FolderDataset(root=str(tmp_path / "nowhere")).identities()
    with pytest.raises(DataError, match="bob"):
        FolderDataset(root=str(tmp_path), identities=["bob"]).identities()


def test_sample_dataset_sets_are_distinct_and_deterministic():
    ds = SampleDataset()
    a, b = ds.load("astronaut", 64), ds.load("astronaut", 64)
    assert torch.equal(a.set_B, b.set_B)
    assert not torch.equal(a.set_A, a.set_B) and a.set_C.shape == (4, 3, 64, 64)
    with pytest.raises(DataError, match="unknown sample"):
        SampleDataset(identities=["nobody"]).identities()


def test_real_identity_in_anti_dreambooth_layout(n000050):
    ds = FolderDataset(root=str(n000050.parent), identities=["n000050"])
    data = ds.load("n000050", 64)
    assert data.set_A.shape == data.set_B.shape == data.set_C.shape == (4, 3, 64, 64)
    assert data.files["set_B"] == sorted(data.files["set_B"])
