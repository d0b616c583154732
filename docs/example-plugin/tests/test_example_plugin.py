"""Tests of the example plugin, written as a plugin author would: with ``benchbase.testing``
(offline, CPU, a few seconds to a minute)."""

import pytest
import torch

from benchbase.errors import ConfigError
from benchbase.plugins import PluginManager
from benchbase.testing import (
    PretrainedTiny,
    check_attack,
    check_purifier,
    denoising_loss,
    make_context,
    sample_identity,
)


def test_plugin_registers_its_components_by_name():
    import benchbase_example.plugin

    pm = PluginManager(entry_points=False)  # only this plugin, as a suite would find it
    pm.register(benchbase_example.plugin)
    assert set(pm.entries("attacks")) == {"checkerboard", "denoise-pgd"}
    attack = pm.create("attacks", "denoise-pgd", {"eps": 4, "steps": 2})
    assert attack.name == "denoise-pgd" and attack.version == "1" and attack.eps == 4
    with pytest.raises(ConfigError, match="steps"):
        pm.create("attacks", "denoise-pgd", {"steps": -1})


def test_checkerboard_keeps_the_attack_contract():
    from benchbase_example.components import Checkerboard

    out = check_attack(Checkerboard(eps=4))
    assert ((out - sample_identity(images_per_set=2).set_B).abs() * 255).max().round() == 4


def test_denoise_pgd_raises_the_loss_more_than_noise_of_the_same_budget():
    """The science check: PGD on the denoising loss beats uniform noise at eps 8 on a model
    whose loss depends on the pixels (the tiny backend briefly trained as a denoiser)."""
    from benchbase_example.components import DenoisePGD

    backend = PretrainedTiny()
    identity = sample_identity(images_per_set=2)
    clean = identity.set_B
    attack = DenoisePGD(eps=8, step_size=2, steps=8)
    contexts = []

    def new_context():
        contexts.append(make_context(backend=backend, identity=identity))
        return contexts[-1]

    adv = check_attack(attack, new_context)
    info = contexts[0].info  # the objective at each of the 8 PGD steps, and what it is
    assert len(info["objective_trajectory"]) == 8 and info["objective"] == "denoising loss L_DM of the frozen model (maximised)"
    noise = (clean + (torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 8 / 255).clamp(0, 1)
    models = backend.load(torch.device("cpu"), torch.float32)
    prompt = "a photo of sks person"
    base = denoising_loss(models, clean, prompt)
    assert denoising_loss(models, adv, prompt) - base > denoising_loss(models, noise, prompt) - base


def test_median_keeps_the_image_size_and_rejects_even_sizes():
    from benchbase_example.components import Median

    images = sample_identity(images_per_set=2).set_B
    for size in (1, 3, 5):
        out = check_purifier(Median(size=size), images)
        if size == 1:
            assert torch.equal(out, images)
    with pytest.raises(ConfigError, match="size: .*must be odd"):
        Median(size=4)
