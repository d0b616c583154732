"""Training-time defenses: DiffShortcut's CDL produces exactly the documented prompts
(DiffShortcut, arXiv 2406.18944) in what the personalizers actually hand the model —
tokenised training prompts and the prompts/negative prompt of every sampler call — under
both DreamBooth and LoRA; ``none`` changes nothing; the registry lists both defenses."""

from __future__ import annotations

import pytest
import torch

from benchbase.components import Prompts
from benchbase.testing import make_context, sample_identity

INSTANCE = "a photo of sks person, bhj noisy pattern"
CLASS = "a photo of person, without bhj noisy pattern"
EVAL = ["a photo of sks person, without bhj noisy pattern", "a dslr portrait of sks person, without bhj noisy pattern"]
NEGATIVE = "noisy, lowres, artifact, pattern"

FAST = {"max_train_steps": 2, "num_class_images": 2, "class_inference_steps": 2, "num_images_per_prompt": 1,
            "num_inference_steps": 2, "learning_rate": 1e-4}


def cdl(**params):
    from benchbase_plugins.defenses.cdl import CDL

    return CDL(**params)


def none():
    from benchbase_plugins.defenses.basic import NoDefense

    return NoDefense()


# -- the prompt arithmetic ------------------------------------------------------------------


def test_cdl_prompts_are_the_released_ones():
    d = cdl()
    trained = d.training_prompts(Prompts())
    assert (trained.instance, trained.class_) == (INSTANCE, CLASS)
    assert trained.eval == Prompts().eval  # evaluation keys stay the undefended prompts
    assert [d.generation_prompt(p) for p in Prompts().eval] == EVAL
    assert d.negative_prompt("") == ""  # --outputNeg False (default)
    assert cdl(negative_prompt=True).negative_prompt("") == NEGATIVE
    assert cdl(negative_prompt=True).negative_prompt("blurry") == "blurry, " + NEGATIVE


def test_cdl_noise_phrase_is_a_parameter():
    d = cdl(noise_phrase="xyz artifacts")
    trained = d.training_prompts(Prompts())
    assert trained.instance == "a photo of sks person, xyz artifacts"
    assert trained.class_ == "a photo of person, without xyz artifacts"
    assert d.generation_prompt("a photo of sks person") == "a photo of sks person, without xyz artifacts"


def test_paper_quirks_reproduce_the_released_baseline_suffix():
    # --inputNegTok False: plain DreamBooth prompts in training ...
    off = cdl(train_noise_token=False)
    assert off.training_prompts(Prompts()) == Prompts()
    # ... and, unlike the released infer(), no suffix unless paper_quirks asks for it
    assert off.generation_prompt("a photo of sks person") == "a photo of sks person"
    quirky = cdl(train_noise_token=False, paper_quirks=True)
    assert quirky.training_prompts(Prompts()) == Prompts()
    assert quirky.generation_prompt("a photo of sks person") == EVAL[0]


def test_none_changes_nothing():
    d = none()
    assert d.training_prompts(Prompts()) == Prompts()
    assert d.generation_prompt("a photo of sks person") == "a photo of sks person"
    assert d.negative_prompt("") == ""
    batch = {"instance_images": torch.zeros(1, 3, 8, 8)}
    assert d.transform_batch(batch, None) is batch and d.extra_loss(batch, {}, None) is None


def test_registry_lists_both_defenses():
    from benchbase.plugins import get_plugin_manager

    pm = get_plugin_manager()
    assert {"none", "cdl"} <= set(pm.entries("defenses"))
    assert type(pm.create("defenses", "cdl", {})).__name__ == "CDL"
    assert type(pm.create("defenses", "none", {})).__name__ == "NoDefense"


# -- what reaches the model -------------------------------------------------------------------


class SpyBackend:
    """Delegates to a backend and records what every loaded model is asked: tokenised prompts
    and each sampler call's prompt / negative prompt."""

    def __init__(self, backend):
        self._backend = backend
        self.tokenized: list[str] = []
        self.sampled: list[tuple[str, str | None]] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def load(self, device, dtype):
        models = self._backend.load(device, dtype)
        tokenize, pipeline = models.tokenize, models.pipeline

        def spy_tokenize(prompts, *a, **k):
            self.tokenized.extend([prompts] if isinstance(prompts, str) else list(prompts))
            return tokenize(prompts, *a, **k)

        def spy_pipeline(*a, **k):
            pipe = pipeline(*a, **k)
            spy = self

            class Pipe:
                def __call__(self, prompt, negative_prompt=None, **kw):
                    negs = negative_prompt or [None] * len(prompt)
                    spy.sampled.extend(zip(prompt, negs))
                    return pipe(prompt, negative_prompt=negative_prompt, **kw)

            return Pipe()

        models.tokenize, models.pipeline = spy_tokenize, spy_pipeline
        return models


@pytest.fixture(scope="module")
def identity():
    return sample_identity("astronaut", 64, images_per_set=2)


def _personalizer(kind):
    if kind == "dreambooth":
        from benchbase_plugins.personalizers.dreambooth import DreamBooth

        return DreamBooth(**FAST)
    from benchbase_plugins.personalizers.lora import DreamBoothLoRA

    return DreamBoothLoRA(**FAST)


@pytest.mark.parametrize("kind", ["dreambooth", "lora"])
def test_cdl_prompts_reach_the_model(kind, tiny, identity, tmp_path):
    spy = SpyBackend(tiny)
    personalizer = _personalizer(kind)
    defense = cdl(negative_prompt=True)
    ctx = make_context(backend=spy, identity=identity, store_dir=tmp_path / "store")
    out = tmp_path / "model"
    out.mkdir()
    personalizer.train(identity.set_B, ctx, defense, out)
    # training conditions on exactly the instance prompt and the class prompt of CDL
    assert set(spy.tokenized) == {INSTANCE, CLASS}, spy.tokenized
    assert ctx.info["training_prompts"] == {"instance": INSTANCE, "class": CLASS}

    spy.sampled.clear()
    gen_ctx = make_context(backend=spy, identity=identity, store_dir=tmp_path / "store")
    images = personalizer.generate(out, gen_ctx, defense)
    # results stay keyed by the undefended prompt; the sampler saw the suffixed prompt + negative
    assert list(images) == Prompts().eval
    assert sorted(set(spy.sampled)) == sorted((p, NEGATIVE) for p in EVAL)
    assert gen_ctx.info["generation_prompts"] == dict(zip(Prompts().eval, EVAL))
    assert all(v.shape == (1, 3, 64, 64) for v in images.values())


def _class_image_prompts(kind, tiny, identity, tmp_path):
    spy = SpyBackend(tiny)
    ctx = make_context(backend=spy, identity=identity, store_dir=tmp_path / "store")
    (tmp_path / "model").mkdir()
    _personalizer(kind).train(identity.set_B, ctx, cdl(), tmp_path / "model")
    return {p for p, _ in spy.sampled}


def test_lora_prior_images_are_samples_of_the_plain_class_prompt(tiny, identity, tmp_path):
    # DiffShortcut generates the class images before the suffix is added (DiffShortcut's released training script)
    assert _class_image_prompts("lora", tiny, identity, tmp_path) == {"a photo of person"}


def test_dreambooth_prior_images_are_samples_of_the_plain_class_prompt(tiny, identity, tmp_path):
    assert _class_image_prompts("dreambooth", tiny, identity, tmp_path) == {"a photo of person"}
