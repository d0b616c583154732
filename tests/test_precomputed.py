"""``precomputed``: protections made elsewhere, read from the Anti-DreamBooth layout.

Checked with photos protected by benchbase's own PhotoGuard and by an independent plain PGD
written here (on the tiny VAE encoder): the images fine-tuned on are the files bit for bit,
the recorded L∞/L2 are the files' own, an image over the declared budget is refused (or
flagged and kept), and the stage key follows the image bytes, not the folder path.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from benchbase.errors import DataError
from benchbase.images import load_pngs, quantize_to_budget, to_uint8
from benchbase.pipeline import Runner
from benchbase.suite import parse_suite
from benchbase.testing import make_context, sample_identity, tiny_backend

FAST_DREAMBOOTH = {"name": "dreambooth", "max_train_steps": 1, "num_class_images": 1, "class_inference_steps": 1,
                   "num_images_per_prompt": 1, "num_inference_steps": 1}


def _write(root, data, images):
    """Protected images as ``<root>/<identity>/set_B/<clean stem>.png``."""
    folder = root / data.name / "set_B"
    folder.mkdir(parents=True, exist_ok=True)
    for arr, stem in zip(to_uint8(images), data.files["set_B"]):
        Image.fromarray(arr).save(folder / f"{stem}.png")
    return folder


def _levels(images):
    return torch.from_numpy(to_uint8(images).astype(np.int64))


def _plain_pgd(vae, clean, eps_levels, steps=5):
    """An independent protection: sign-gradient ascent on ‖μ(x+δ) − μ(x)‖₂ of the VAE encoder
    from a random start (the norm has no gradient at δ = 0), projected on the L∞ ball, rounded
    towards the clean image onto the 8-bit grid."""
    eps = eps_levels / 255
    with torch.no_grad():
        mu0 = vae.encode(clean * 2 - 1).latent_dist.mean
    start = (torch.rand(clean.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps
    delta = ((clean + start).clamp(0, 1) - clean).requires_grad_(True)
    for _ in range(steps):
        shift = (vae.encode((clean + delta) * 2 - 1).latent_dist.mean - mu0).flatten(1).norm(dim=1).sum()
        (grad,) = torch.autograd.grad(shift, delta)
        with torch.no_grad():
            delta += eps / 2 * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((clean + delta).clamp(0, 1) - clean)
    levels = torch.floor(clean * 255 + 0.5) + torch.trunc(delta.detach() * 255)
    return levels.clamp(0, 255) / 255


def _suite(root, eps, **extra):
    attack = {"name": "precomputed", "root": str(root), "eps": eps, **extra}
    return parse_suite({"name": "t", "backend": {"name": "tiny"}, "dataset": {"name": "sample", "identities": ["astronaut"]},
                        "attacks": [attack], "purifiers": ["none"], "personalizers": [FAST_DREAMBOOTH],
                        "metrics": ["linf"]})


def _protect_meta(run_dir):
    (done,) = list((run_dir / "store" / "protect").glob("*/*/_done.json"))
    return json.loads(done.read_text()), done.parent / "images"


@pytest.fixture(scope="module")
def identity():
    return sample_identity("astronaut", 64)


def test_benchbase_photoguard_images_are_used_bit_for_bit_and_cached_by_their_bytes(tmp_path, identity):
    from benchbase_plugins.attacks.photoguard import PhotoGuard

    attack = PhotoGuard(steps=3)
    ctx = make_context(backend=tiny_backend(), identity=identity, store_dir=tmp_path / "pg")
    protected = quantize_to_budget(attack.protect(identity.set_B.clone(), ctx), identity.set_B, attack.eps)
    root = tmp_path / "external"
    folder = _write(root, identity, protected)

    run_dir = tmp_path / "run"
    first = Runner(_suite(root, 7.65), run_dir, progress=False).run()
    assert not first.failed, first.failed
    meta, images = _protect_meta(run_dir)
    assert torch.equal(load_pngs(images), load_pngs(folder))  # the files, unchanged
    diff = _levels(protected) - _levels(identity.set_B)
    info = meta["info"]
    assert info["linf_levels_per_image"] == diff.abs().flatten(1).amax(1).double().tolist()
    assert np.allclose(info["l2_levels_per_image"], diff.double().flatten(1).norm(dim=1).numpy())
    assert info["over_budget"] == [] and info["declared_eps"] == 7.65 and info["linf_levels"] <= 7
    assert "root" not in meta["parts"]["attack"]["params"]  # the key names the bytes, not the path
    assert meta["parts"]["attack"]["params"]["images_sha256"]

    # same bytes in another folder: a pure cache hit
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert Runner(_suite(moved, 7.65), run_dir, progress=False).run().executed == {}
    # one level changed in one pixel: the protection is read again
    arr = np.asarray(Image.open(moved / "astronaut" / "set_B" / "astronaut_set_B_000.png")).copy()
    arr[0, 0, 0] = arr[0, 0, 0] + 1 if arr[0, 0, 0] < 255 else 254
    Image.fromarray(arr).save(moved / "astronaut" / "set_B" / "astronaut_set_B_000.png")
    again = Runner(_suite(moved, 7.65), run_dir, progress=False).run()
    assert again.executed.get("protect") == 1


def test_independent_pgd_is_measured_refused_over_budget_or_flagged(tmp_path, identity):
    from benchbase_plugins.attacks.precomputed import Precomputed

    vae = tiny_backend().load(torch.device("cpu"), torch.float32).vae
    protected = _plain_pgd(vae, identity.set_B, eps_levels=4)
    root = tmp_path / "ext"
    _write(root, identity, protected)
    linf = (_levels(protected) - _levels(identity.set_B)).abs().flatten(1).amax(1)
    assert linf.max() == 4  # the independent attack spends its budget

    def run(**params):
        attack = Precomputed(root=str(root), **params)
        ctx = make_context(identity=identity)
        out = quantize_to_budget(attack.protect(identity.set_B.clone(), ctx), identity.set_B, attack.eps)
        return out, ctx.info

    out, info = run(eps=4)
    assert torch.equal(out, protected) and info["linf_levels_per_image"] == linf.double().tolist()
    # the protection survives the trip: the encoder's latent moves more than under noise of that budget
    with torch.no_grad():
        mu = lambda x: vae.encode(x * 2 - 1).latent_dist.mean  # noqa: E731
        noise = quantize_to_budget(identity.set_B + (torch.rand(identity.set_B.shape, generator=torch.Generator()
                                   .manual_seed(0)) * 2 - 1) * 4 / 255, identity.set_B, 4)
        shift = lambda x: (mu(x) - mu(identity.set_B)).flatten(1).norm(dim=1).mean()  # noqa: E731
        assert shift(out) > 1.5 * shift(noise)

    with pytest.raises(DataError, match="exceed the declared budget eps = 2"):
        run(eps=2)
    flagged, info = run(eps=2, over_budget="flag")
    assert torch.equal(flagged, protected)  # kept as they are, not clipped to 2
    assert info["over_budget"] == [s for s, v in zip(identity.files["set_B"], linf.tolist()) if v > 2]


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing \\['astronaut_set_B_003'\\]"),
    ("extra", "unexpected \\['stray'\\]"),
    ("size", "32×32 px, the clean image 64×64"),
    ("jpeg", "is JPEG, not PNG"),
    ("sixteen", "has mode I;16"),
    ("alpha", "transparent pixels"),
    ("no-identity", "is missing"),
])
def test_bad_folders_are_one_clear_error(tmp_path, identity, damage, message):
    from benchbase_plugins.attacks.precomputed import Precomputed

    folder = _write(tmp_path, identity, identity.set_B)
    first = folder / "astronaut_set_B_000.png"
    if damage == "missing":
        (folder / "astronaut_set_B_003.png").unlink()
    elif damage == "extra":
        shutil.copy(first, folder / "stray.png")
    elif damage == "size":
        Image.open(first).resize((32, 32)).save(first)
    elif damage == "jpeg":
        first.unlink()
        Image.fromarray(to_uint8(identity.set_B[:1])[0]).save(folder / "astronaut_set_B_000.png", format="JPEG")
    elif damage == "sixteen":
        Image.fromarray(np.full((64, 64), 1000, dtype=np.uint16)).save(first)
    elif damage == "alpha":
        rgba = Image.open(first).convert("RGBA")
        rgba.putalpha(128)
        rgba.save(first)
    elif damage == "no-identity":
        shutil.rmtree(tmp_path / "astronaut")
        _write(tmp_path, sample_identity("hopper", 64), identity.set_B)
    attack = Precomputed(root=str(tmp_path), eps=8)
    with pytest.raises(DataError, match=message):
        attack.protect(identity.set_B.clone(), make_context(identity=identity))


def test_config_needs_a_folder_with_images(tmp_path):
    from benchbase_plugins.attacks.precomputed import Precomputed

    with pytest.raises(DataError, match="does not exist"):
        Precomputed(root=str(tmp_path / "nowhere"), eps=8).config()
    with pytest.raises(DataError, match="no <identity>/set_B/ images"):
        Precomputed(root=str(tmp_path), eps=8).config()


def test_exported_clean_set_is_read_back_unchanged(tmp_path, identity):
    from benchbase_plugins.attacks.precomputed import Precomputed, export_clean_set_b

    paths = export_clean_set_b(identity, tmp_path)
    assert [p.name for p in paths] == [f"{s}.png" for s in identity.files["set_B"]]
    ctx = make_context(identity=identity)
    out = Precomputed(root=str(tmp_path), eps=1).protect(identity.set_B.clone(), ctx)
    assert torch.equal(out, identity.set_B) and ctx.info["linf_levels_per_image"] == [0.0] * 4
