"""benchbase-mini v3: its organs (restorer, pixel model, noise vocabulary), the selection
identities, and the version switch of the backend and roles. These run without v3's weights;
a test that needs them skips, saying so."""

from __future__ import annotations

import pytest
import torch

from benchbase_plugins.worlds.mini import models as M
from benchbase_plugins.worlds.mini import organs as O
from benchbase_plugins.worlds.mini import portraits as P


def _portraits(n: int = 4, seed: int = 0) -> torch.Tensor:
    from benchbase.images import pil_to_tensor

    ident = P.identity("heldout-500")
    return torch.stack([pil_to_tensor(P.render(ident, seed + i).image) for i in range(n)])


def test_selection_identities_are_disjoint_from_every_protocol_identity():
    sel = P.selection_names(64)
    assert len(set(sel)) == 64 and all(int(n.split("-")[1]) >= P.SELECTION_START for n in sel)
    assert not set(sel) & set(P.heldout_names(P.SELECTION_START))
    # and they are people the training never saw
    taken = {P.identity(t).key() for t in P.train_names(4096)}
    assert not {P.identity(n).key() for n in sel} & taken


def test_mini_dataset_draws_selection_identities_on_request():
    from benchbase_plugins.worlds.mini.dataset import MiniDataset

    assert MiniDataset(identities=3).identities() == P.heldout_names(3)
    assert MiniDataset(identities=3, split="selection").identities() == P.selection_names(3)


def test_degradations_are_codeformers_kinds_and_stay_in_range():
    x = _portraits()
    gen = torch.Generator().manual_seed(0)
    for level in ("small", "large"):
        y = O.degrade(x, gen, level)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        assert (y - x).abs().mean() > 0.005  # something happened
    # the large degradations remove more detail than the small ones (on average over draws)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    small = torch.stack([(O.degrade(x, g1, "small") - x).abs().mean() for _ in range(4)]).mean()
    large = torch.stack([(O.degrade(x, g2, "large") - x).abs().mean() for _ in range(4)]).mean()
    assert large > small


def test_noise_overlays_add_high_frequency_energy_within_their_amplitude():
    x = _portraits()
    gen = torch.Generator().manual_seed(0)
    for kind in range(len(O.NOISE_PHRASES)):
        y = torch.stack([O.noise_overlay(img, kind, gen) for img in x])
        assert (y - x).abs().max() <= 32 / 255 + 1e-6 if kind == 0 else True
        assert (O.high_frequency_energy(y) > O.high_frequency_energy(x)).all()


def test_codeformer_fidelity_weight_controls_the_input_path():
    torch.manual_seed(0)
    net = O.MiniCodeFormer().eval()
    for fuse in net.fuse.values():  # untrained CFT blocks: give them a non-zero effect
        for p in fuse.parameters():
            torch.nn.init.normal_(p, std=0.05)
    x = _portraits(2) * 2 - 1
    with torch.no_grad():
        prior = net(x, w=0.0)
        half, full = net(x, w=0.5), net(x, w=1.0)
        out, logits, lq = net.restore(x, w=1.0)
    assert prior.shape == x.shape and logits.shape == (2, O.CODE_SIDE ** 2, O.CODEBOOK_SIZE)
    assert torch.equal(out, full)
    # w = 0 decodes the predicted codes only; w > 0 adds the input's features, more with larger w
    assert not torch.allclose(prior, half) and (full - prior).abs().mean() > (half - prior).abs().mean()


def test_pixel_model_views_match_gridpures_geometry():
    x = _portraits(8)
    v = O.pixel_training_views(x, torch.Generator().manual_seed(0))
    assert v.shape == (8, 3, O.PIXEL_SIDE, O.PIXEL_SIDE)
    unet = O.build_pixel_unet()
    assert unet.config.sample_size == 32  # GrIDPure's window on 64 px: 32 at stride 16
    out = unet(v[:2] * 2 - 1, torch.tensor([10, 500])).sample
    assert out.shape == v[:2].shape
    s = O.pixel_scheduler()
    assert s.config.beta_schedule == "linear" and s.config.num_train_timesteps == 1000


def test_v3_backend_says_what_is_missing_without_its_weights(tmp_path, monkeypatch):
    from benchbase.errors import WeightsUnavailableError
    from benchbase_plugins.worlds.mini.backend import MiniBackend

    monkeypatch.setenv("BENCHBASE_MINI_V3_WEIGHTS", str(tmp_path))
    backend = MiniBackend(version="v3")
    assert backend.default_models["face-restorer"] == "mini-v3"
    assert MiniBackend().default_models.get("face-restorer") is None  # v2 has no restorer
    with pytest.raises(WeightsUnavailableError, match="train-mini --version v3"):
        backend.fingerprint()
    # v2's fingerprint keeps its form, so protocol 1's stage keys stay valid
    assert MiniBackend().fingerprint() == f"mini-{M.fingerprint()}"


def test_v3_roles_are_registered_for_the_backend_to_find():
    from benchbase.plugins import get_plugin_manager
    from benchbase_plugins.worlds.mini.backend import MiniBackend

    pm = get_plugin_manager()
    backend = MiniBackend(version="v3")
    for role in ("face-detector", "face-embedder", "clip", "x4-upscaler", "face-restorer", "pixel-diffusion"):
        assert pm.find_model(role, "auto", backend).name == "mini-v3", role


def test_realign_finds_a_restorer_by_role_and_can_drop_the_upscaler():
    """realign with a face-restorer model registered by a plugin, and sr = false: the restorer
    alone, at the input size (a stand-in restorer, so no weights are needed)."""
    from benchbase.components import Context
    from benchbase_plugins.purifiers.realign import FACE_RESTORERS, Realign

    class Halve:
        def __init__(self, weights, ctx, upscale=1):
            self.upscale = upscale

        def restore(self, images, fidelity, ctx):
            out = images * 0.5
            return torch.nn.functional.interpolate(out, scale_factor=self.upscale) if self.upscale > 1 else out

    FACE_RESTORERS["test-halve"] = Halve
    try:
        x = _portraits(2)
        ctx = Context(device=torch.device("cpu"), dtype=torch.float32, seed=0, generator=torch.Generator().manual_seed(0))
        out = Realign(restorer="test-halve", sr=False, restorer_upscale=1).purify(x, ctx)
        assert torch.allclose(out, x * 0.5, atol=1e-6)
        # a restorer that upscales (CodeFormer's -s 2) comes back at the input size
        assert Realign(restorer="test-halve", sr=False, restorer_upscale=2).purify(x, ctx).shape == x.shape
    finally:
        del FACE_RESTORERS["test-halve"]


@pytest.mark.skipif(M.weights_present(version="v3") is not None, reason="world v3's weights are not shipped yet")
def test_v3_weights_load_and_restore():
    net = M.load_restorer("v3")
    x = _portraits(2) * 2 - 1
    with torch.no_grad():
        assert net(x, w=0.5).shape == x.shape


def test_v3_train_script_runs_end_to_end_at_a_tiny_scale(tmp_path):
    """Every stage of `benchbase train-mini --version v3` at 1/500 of its steps on top of the
    shipped v2 weights: all v3 files load, the model card is written, a rerun does no work."""
    from benchbase_plugins.worlds.mini.train import main

    out, work = tmp_path / "v3", tmp_path / "work"
    args = ["--version", "v3", "--out", str(out), "--work", str(work), "--scale", "0.002", "--identities", "6"]
    assert main(args) == 0
    assert M.weights_present(out, version="v3") is None and (out / "MODEL_CARD.md").is_file()
    info = M.world_info(out)
    assert info["stages_done"] == ["data", "reuse", "detector", "noisy", "clip", "unet", "restorer", "pixel"]
    assert info["data"]["evaluation_identities"]["first"] == P.selection_names(1)[0]  # never a protocol identity
    assert {"clip_class_prompt_fraction", "restorer_psnr_restored", "pixel_x0_psnr_t100",
            "detector_degraded_recall"} <= set(info["eval"])
    assert main(args) == 0
    assert M.world_info(out)["seconds"] == info["seconds"]


def test_clean_checks_are_read_from_a_selection_run(tmp_path):
    """`benchbase mini-checks`: means over the run's identities, realign's drop per chain."""
    from benchbase.records import Record, dumps_records
    from benchbase_plugins.worlds.mini.checks import from_run

    def rec(identity, purifier, personalizer, metric, value, status="ok"):
        return Record(identity=identity, seed=0, attack="none", purifier=purifier, defense="none",
                      personalizer=personalizer, metric=metric, direction="lower", status=status, value=value)

    records = []
    for ident, db, base, realigned in (("heldout-500", 0.6, 0.05, 0.58), ("heldout-501", 0.5, 0.03, 0.40)):
        records += [rec(ident, "none", "dreambooth", "ism", db), rec(ident, "none", "base", "ism", base),
                    rec(ident, "none", "dreambooth", "ism-ceiling", 0.9), rec(ident, "none", "dreambooth", "fdfr", 0.1),
                    rec(ident, "none", "base", "fdfr", 0.2), rec(ident, "realign-quarter", "dreambooth", "ism", realigned)]
    records.append(rec("heldout-501", "realign-half", "dreambooth", "ism", None, status="failed"))
    (tmp_path / "results.jsonl").write_text(dumps_records(records))
    checks = from_run(tmp_path)
    assert checks["selection_identities"] == ["heldout-500", "heldout-501"]
    assert checks["dreambooth_ism"] == 0.55 and checks["base_ism"] == 0.04 and checks["ceiling_ism"] == 0.9
    assert checks["fdfr_dreambooth"] == 0.1 and checks["fdfr_base"] == 0.2
    assert checks["realign_clean_ism_drop"] == {"realign-quarter": 0.06}  # a chain with no ok record is left out
