"""The ``lora`` personalizer: only adapter parameters train (UNet, and text encoder when
asked), the stored artifact holds only adapters and is a small fraction of the UNet, diffusers
loads it, and generation with the merged adapters equals running them alongside the frozen
weights."""

from __future__ import annotations

import json

import pytest
import torch

from benchbase.testing import make_context, sample_identity

FAST = {"max_train_steps": 3, "num_class_images": 2, "class_inference_steps": 2, "num_images_per_prompt": 1,
            "num_inference_steps": 2, "learning_rate": 1e-3}


class RecordingBackend:
    """Delegates to a backend and keeps every model set it loads (to inspect what trained)."""

    def __init__(self, backend):
        self._backend = backend
        self.loaded = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def load(self, device, dtype):
        models = self._backend.load(device, dtype)
        self.loaded.append(models)
        return models


def _plain_name(name: str) -> str:
    return name.replace(".base_layer.", ".")  # a wrapped projection's frozen weight under its original name


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """LoRA trained twice: UNet only (default) and with text-encoder LoRA."""
    from benchbase.components import Prompts
    from benchbase_plugins.defenses.basic import NoDefense
    from benchbase_plugins.personalizers.lora import DreamBoothLoRA

    identity = sample_identity("astronaut", 64, images_per_set=2)
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for te in (False, True):
        backend = RecordingBackend(tiny)
        ctx = make_context(backend=backend, identity=identity, store_dir=root / "store", prompts=Prompts())
        folder = root / f"te{int(te)}"
        folder.mkdir()
        personalizer = DreamBoothLoRA(train_text_encoder=te, **FAST)
        personalizer.train(identity.set_B, ctx, NoDefense(), folder)
        # the model that trained is the one holding adapters (class images load their own copy)
        holding = [m for m in backend.loaded if any(".lora_A." in n for n, _ in m.unet.named_parameters())]
        assert len(holding) == 1
        out[te] = {"models": holding[0], "folder": folder, "info": ctx.info, "p": personalizer}
    base = tiny.load(torch.device("cpu"), torch.float32)
    return out, base, identity


def _changed(module, reference):
    ref = dict(reference.named_parameters())
    frozen_changed, adapters = [], {}
    for name, param in module.named_parameters():
        if ".lora_" in name:
            adapters[name] = param
        elif not torch.equal(param.detach(), ref[_plain_name(name)].detach()):
            frozen_changed.append(name)
    return frozen_changed, adapters


@pytest.mark.parametrize("te", [False, True], ids=["unet", "unet+text_encoder"])
def test_only_adapters_change(trained, te):
    runs, base, _ = trained
    models = runs[te]["models"]
    frozen, unet_adapters = _changed(models.unet, base.unet)
    assert frozen == [] and unet_adapters
    # LoRA B starts at zero: every UNet adapter was updated (a non-zero B), on q/k/v/out only
    b = {n: p for n, p in unet_adapters.items() if ".lora_B." in n}
    assert all(p.abs().sum() > 0 for p in b.values())
    suffixes = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in b}
    assert suffixes == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    te_frozen, te_adapters = _changed(models.text_encoder, base.text_encoder)
    assert te_frozen == []
    assert bool(te_adapters) == te
    assert all(p.abs().sum() > 0 for n, p in te_adapters.items() if ".lora_B." in n)
    assert not any(p.requires_grad for n, p in models.vae.named_parameters())


@pytest.mark.parametrize("te", [False, True], ids=["unet", "unet+text_encoder"])
def test_records_the_victims_loss_on_the_instance_images(trained, te):
    """The LoRA victim records its loss on the instance images (prior term left out): the mean of
    the last 10 steps and one mean per 10 steps, next to losses.json's total loss."""
    import json

    runs, _, _ = trained
    info, folder, p = runs[te]["info"], runs[te]["folder"], runs[te]["p"].params
    total = json.loads((folder / "losses.json").read_text())
    assert len(total) == p.max_train_steps
    assert len(info["instance_loss_trajectory"]) == -(-p.max_train_steps // 10) and info["instance_loss_every"] == 10
    assert 0 < info["final_instance_loss"] < sum(total[-10:]) / len(total[-10:])  # the total adds the prior term


@pytest.mark.parametrize("te", [False, True], ids=["unet", "unet+text_encoder"])
def test_artifact_holds_only_small_adapters(trained, te, tmp_path):
    from safetensors.torch import load_file

    from benchbase.toolkit.lora import split_lora_state

    runs, base, _ = trained
    folder = runs[te]["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["adapters.json", "losses.json",
                                                         "pytorch_lora_weights.safetensors"]
    state = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    layers = split_lora_state(state)  # every key is an A or B matrix of a UNet / text-encoder layer
    assert set(layers) == ({"unet", "text_encoder"} if te else {"unet"})
    config = json.loads((folder / "adapters.json").read_text())
    assert config["rank"] == 4 and config["alpha"] == 4.0
    assert all(a.shape[0] == 4 and b.shape[1] == 4 for group in layers.values() for a, b in group.values())
    base.unet.save_pretrained(tmp_path / "unet")  # what full fine-tuning stores for the UNet alone
    full = sum(f.stat().st_size for f in (tmp_path / "unet").iterdir())
    lora = (folder / "pytorch_lora_weights.safetensors").stat().st_size
    assert lora < 0.1 * full, (lora, full)
    assert runs[te]["info"]["adapter_parameters"] == sum(v.numel() for v in state.values())


def test_merged_adapters_equal_the_trained_wrappers(trained, tiny):
    """Generation's base-model-plus-merged-adapters computes what training's wrappers compute."""
    from peft.tuners.lora import LoraLayer

    runs, _, _ = trained
    run = runs[True]
    models = run["models"]
    merged = run["p"].load_victim(run["folder"], make_context(backend=tiny))
    for module, merged_module in ((models.unet, merged.unet), (models.text_encoder, merged.text_encoder)):
        wrappers = {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}
        assert wrappers
        for name, wrapper in wrappers.items():
            linear = merged_module.get_submodule(name)
            assert type(linear) is torch.nn.Linear  # plain layers: nothing but weights changed
            x = torch.randn(2, wrapper.base_layer.in_features, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                assert torch.allclose(wrapper(x), linear(x), atol=1e-5, rtol=1e-4), name


def test_generation_uses_the_adapters(trained, tiny):
    """Same seeds, same prompts: the personalised model's images differ from the base model's."""
    from benchbase.components import Prompts
    from benchbase.toolkit import generate_images
    from benchbase_plugins.defenses.basic import NoDefense

    runs, _, identity = trained
    run = runs[True]
    ctx = make_context(backend=tiny, identity=identity, prompts=Prompts(eval=["a photo of sks person"]))
    images = run["p"].generate(run["folder"], ctx, NoDefense())
    assert list(images) == ["a photo of sks person"] and images["a photo of sks person"].shape == (1, 3, 64, 64)
    base = generate_images(tiny.load(torch.device("cpu"), torch.float32), "a photo of sks person", 1, 2, 7.5,
                           seed=0)
    assert not torch.equal(images["a photo of sks person"], base)
    again = run["p"].generate(run["folder"], ctx, NoDefense())
    assert torch.equal(again["a photo of sks person"], images["a photo of sks person"])


def test_diffusers_loads_the_stored_adapters(trained, tiny):
    """The folder is what diffusers' DreamBooth-LoRA script writes: ``load_lora_weights`` on a
    plain pipeline gives the model that generation's merge gives (UNet and text encoder)."""
    runs, _, _ = trained
    run = runs[True]
    merged = run["p"].load_victim(run["folder"], make_context(backend=tiny))
    pipe = tiny.load(torch.device("cpu"), torch.float32).pipeline()
    pipe.load_lora_weights(str(run["folder"]))
    ids = merged.tokenize(["a photo of sks person"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = merged.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        assert torch.allclose(ours, theirs, atol=1e-5)
        a = merged.unet(x, torch.tensor([500]), ours).sample
        b = pipe.unet(x, torch.tensor([500]), theirs).sample
    assert torch.allclose(a, b, atol=1e-5)
    base = tiny.load(torch.device("cpu"), torch.float32)
    with torch.no_grad():  # and the adapters matter: the base model's output is elsewhere
        assert not torch.allclose(base.unet(x, torch.tensor([500]), base.text_encoder(ids)[0]).sample, a, atol=1e-5)
