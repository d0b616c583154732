"""The tiny backend (real CLIP token ids, deterministic, saved and loaded like real weights) and
the clear message when real weights are absent."""

import pytest
import torch

from benchbase.errors import WeightsUnavailableError


def test_tokenizer_matches_real_clip_ids(tiny):
    import open_clip

    models = tiny.load(torch.device("cpu"), torch.float32)
    ref = open_clip.get_tokenizer("ViT-B-32")
    for prompt in ["a photo of sks person", "a dslr portrait of sks person, without bhj noisy pattern"]:
        ours = models.tokenize([prompt])[0].tolist()
        theirs = ref([prompt])[0].tolist()
        n = theirs.index(49407) + 1
        assert ours[:n] == theirs[:n]
    assert models.tokenize(["a photo of sks person"])[0, :7].tolist() == [49406, 320, 1125, 539, 48136, 2533, 49407]


def test_tiny_backend_is_deterministic_and_round_trips(tiny, tmp_path):
    from benchbase_plugins.worlds.tiny.models import build_tiny_pipeline

    a = tiny.load(torch.device("cpu"), torch.float32)
    fresh = build_tiny_pipeline(seed=0)
    for k, v in fresh.unet.state_dict().items():
        assert torch.equal(v, a.unet.state_dict()[k])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    z1 = a.encode_images(x, sample=False)
    z2 = tiny.load(torch.device("cpu"), torch.float32).encode_images(x, sample=False)
    assert torch.equal(z1, z2) and z1.shape == (1, 4, 8, 8)


def test_v_prediction_target(tmp_path):
    from benchbase.testing import tiny_backend

    models = tiny_backend(prediction_type="v_prediction").load(torch.device("cpu"), torch.float32)
    assert models.prediction_type == "v_prediction"
    z = torch.randn(2, 4, 8, 8)
    cond = models.encode_prompt(["a photo of sks person"] * 2)
    loss = models.diffusion_loss(z, cond, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_missing_sd_weights_give_one_clear_sentence():
    from benchbase_plugins.backends.stable_diffusion import StableDiffusionBackend

    backend = StableDiffusionBackend(model="stabilityai/stable-diffusion-2-1-base")
    with pytest.raises(WeightsUnavailableError) as info:
        backend.load(torch.device("cpu"), torch.float32)
    msg = str(info.value)
    assert "stabilityai/stable-diffusion-2-1-base" in msg and "download" in msg
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        StableDiffusionBackend(model="./no/such/folder").load(torch.device("cpu"), torch.float32)
