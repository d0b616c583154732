"""Bad values never get through: every registered component's numeric parameters are finite and
bounded, a suite's problems are one line each naming the file, the entry and the parameter, the
core asserts every protection's budget after quantisation, and a device that is not there is one
clear line."""

import math
import typing

import pytest
import torch

from benchbase import hookimpl
from benchbase.components import Attack
from benchbase.errors import BudgetError, ConfigError
from benchbase.images import assert_budget, check_images, quantize_to_budget
from benchbase.models.sd import parse_device, resolve_device
from benchbase.pipeline import Runner
from benchbase.plugins import FAMILIES, PluginManager, get_plugin_manager
from benchbase.suite import parse_suite

#: numeric parameters that may legitimately be very negative (none today): name -> why
SIGNED: dict[tuple[str, str], str] = {}
#: parameters that must be > 0 (a zero learning rate trains nothing, silently)
POSITIVE = ("learning_rate", "lr", "adam_epsilon", "gpus_per_task", "cpus_per_task")
#: budgets, step sizes, counts: -1 must be rejected whatever the bound's exact value
NON_NEGATIVE = ("eps", "step_size", "pgd_alpha", "steps", "batch_size", "sigma", "radius", "bound", "weight",
                "noise_level", "max_retries", "seed")


def _kinds(annotation) -> set[type]:
    if annotation in (int, float):
        return {annotation}
    out: set[type] = set()
    for arg in typing.get_args(annotation):
        out |= _kinds(arg)
    return out


def _list_of_float(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is list:
        return float in _kinds(typing.get_args(annotation)[0])
    return any(_list_of_float(a) for a in typing.get_args(annotation))


def registered_params() -> list[tuple[str, str, type]]:
    pm = get_plugin_manager()
    return [(family, name, entry.load().Params) for family in FAMILIES
            for name, entry in pm.entries(family).items()]


def _required(params_cls) -> dict:
    """Values for required fields (e.g. the folder dataset's root) so only the field under test fails."""
    def value(info):  # a valid value of the field's type: "x" for text, 1 for numbers
        return 1 if info.annotation in (int, float) else "x"

    return {name: value(info) for name, info in params_cls.model_fields.items() if info.is_required()}


def _rejected(params_cls, field: str, value) -> bool:
    from pydantic import ValidationError

    try:
        params_cls(**{**_required(params_cls), field: value})
    except ValidationError as exc:
        return any(err["loc"] and err["loc"][0] == field for err in exc.errors())
    return False


COMPONENTS = registered_params()


@pytest.mark.parametrize("family,name,params_cls", COMPONENTS, ids=[f"{f}:{n}" for f, n, _ in COMPONENTS])
def test_every_numeric_parameter_is_finite_and_bounded(family, name, params_cls):
    checked = 0
    for field, info in params_cls.model_fields.items():
        kinds = _kinds(info.annotation)
        if _list_of_float(info.annotation):
            assert _rejected(params_cls, field, [math.nan]), f"{name}.{field}: NaN in the list accepted"
            continue
        if not kinds:
            continue
        checked += 1
        if float in kinds:
            for bad in (math.nan, math.inf, -math.inf):
                assert _rejected(params_cls, field, bad), f"{family} {name}: {field} = {bad} accepted"
        if (name, field) not in SIGNED:
            assert _rejected(params_cls, field, -10**9), (
                f"{family} {name}: {field} has no lower bound; give it Field(..., ge=...) or list it in SIGNED")
        if field in NON_NEGATIVE or field.endswith(("_steps", "_size", "_images", "_num")) \
                or field.startswith("num_"):
            assert _rejected(params_cls, field, -1), f"{family} {name}: {field} = -1 accepted"
        if field in POSITIVE or field.endswith("learning_rate"):
            assert _rejected(params_cls, field, 0), f"{family} {name}: {field} = 0 accepted (must be > 0)"
        if kinds == {int}:
            assert _rejected(params_cls, field, 2.5), f"{family} {name}: {field} = 2.5 accepted for an integer"
        assert _rejected(params_cls, field, True), f"{family} {name}: {field} = true read as a number"
    # the defaults themselves satisfy the bounds
    params_cls(**_required(params_cls))
    assert checked or not any(_kinds(i.annotation) for i in params_cls.model_fields.values())


def test_the_catalogue_is_covered():
    """The enumeration above sees every family (a registry change must not silently skip one)."""
    assert {f for f, _, _ in COMPONENTS} == set(FAMILIES)
    assert len(COMPONENTS) >= 40


BASE = {"name": "v", "backend": {"name": "tiny"}, "dataset": {"name": "sample", "identities": ["astronaut"]},
        "attacks": ["none"], "personalizers": ["dreambooth"], "metrics": [{"name": "psnr", "of": "protected"}]}


@pytest.mark.parametrize("entry,needle", [
    ({"attacks": ["none", {"name": "noise", "eps": math.nan}]}, "attacks[1]: attack 'noise': eps: Input should be a finite number (got nan)"),
    ({"attacks": [{"name": "noise", "label": "n", "eps": -3}]}, "attacks[0] (label 'n'): attack 'noise': eps: Input should be greater than or equal to 0 (got -3)"),
    ({"attacks": [{"name": "aspl", "pgd_alpha": math.inf}]}, "attacks[0]: attack 'aspl': pgd_alpha: Input should be a finite number (got inf)"),
    ({"personalizers": [{"name": "dreambooth", "learning_rate": 0}]}, "personalizers[0]: personalizer 'dreambooth': learning_rate: Input should be greater than 0"),
    ({"personalizers": [{"name": "lora", "max_train_steps": 2.5}]}, "max_train_steps: Input should be a valid integer"),
    ({"purifiers": [["jpeg", {"name": "blur", "radius": -1}]]}, "purifiers[0][1]: purifier 'blur': radius"),
    ({"metrics": [{"name": "ref-rmse", "size": 0}]}, "metrics[0]: metric 'ref-rmse': size"),
    ({"dataset": {"name": "sample", "images_per_set": 0}}, "dataset: dataset 'sample': images_per_set"),
    ({"backend": {"name": "tiny", "resolution": 60}}, "backend: backend 'tiny': resolution: Input should be a multiple of 8"),
    ({"attacks": [{"name": "noise", "epss": 3}]}, "attacks[0]: attack 'noise': epss: unknown parameter (did you mean eps?)"),
])
def test_a_bad_value_is_one_line_naming_file_entry_and_parameter(entry, needle, tmp_path):
    suite = parse_suite({**BASE, **entry}, "bad.toml")
    with pytest.raises(ConfigError) as info:
        Runner(suite, tmp_path / "run", progress=False)
    lines = str(info.value).splitlines()
    assert any(line.startswith("bad.toml: ") and needle in line for line in lines), lines
    assert not (tmp_path / "run").exists()  # nothing is written for a suite that does not validate


def test_all_problems_are_reported_at_once(tmp_path):
    suite = parse_suite({**BASE, "device": "tpu9", "attacks": [{"name": "noise", "eps": math.nan},
                                                               {"name": "mist", "steps": -1}]}, "bad.toml")
    with pytest.raises(ConfigError) as info:
        Runner(suite, tmp_path / "run", progress=False)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("bad.toml: ") for line in lines), lines
    assert "device 'tpu9' is not a device name" in lines[0]


def test_suite_values_are_validated_by_the_schema():
    for change, needle in [({"seeds": [0, -1]}, "seeds[1]"), ({"seeds": [0.5]}, "seeds[0]"),
                           ({"dtype": "float64"}, "dtype"), ({"device": "cuda 0"}, "not a device name"),
                           ({"name": "../../etc"}, "plain folder name")]:
        with pytest.raises(ConfigError, match=r"^bad\.toml: .*" + needle.replace("[", r"\[").replace("]", r"\]")):
            parse_suite({**BASE, **change}, "bad.toml")


# -- the core's assertions on every protect stage -------------------------------------------


class Rogue(Attack):
    """Attacks that misbehave the ways a plugin bug would."""

    class Params(Attack.Params):
        eps: float = 8.0  # redefined without bounds, as a careless third-party plugin might
        mode: str = "nan"

    def protect(self, images, ctx):
        if self.params.mode == "nan":
            out = images.clone()
            out[0, 0, 0, 0] = float("nan")
            return out
        if self.params.mode == "shape":
            return images[:, :, :8, :8]
        return (images + 0.5).clamp(0, 1)  # far over budget: the core clips it


class RoguePlugin:
    @hookimpl
    def register_attacks(self, register):
        register("rogue", Rogue, version="1")


def _rogue_run(tmp_path, **params):
    pm = PluginManager()
    pm.register(RoguePlugin(), name="rogue")
    suite = parse_suite({**BASE, "attacks": ["none", {"name": "rogue", **params}]}, "rogue.toml")
    return Runner(suite, tmp_path, manager=pm, progress=False).run()


@pytest.mark.parametrize("params,needle", [
    ({"mode": "nan"}, "attack 'rogue' returned 1 NaN/inf values"),
    ({"mode": "shape"}, "returned shape (4, 3, 8, 8), expected (4, 3, 64, 64)"),
    ({"mode": "big", "eps": -3}, "eps = -3.0 is not a budget"),
])
def test_a_misbehaving_attack_fails_its_stage_loudly(tmp_path, params, needle):
    summary = _rogue_run(tmp_path, **params)
    by_attack = {r["attack"]: r for r in summary.records}
    assert by_attack["none"]["status"] == "ok"  # the rest of the grid finishes
    bad = by_attack["rogue"]
    assert bad["status"] == "failed" and "BudgetError" in bad["error"] and needle in bad["error"], bad["error"]
    assert not (tmp_path / "errors").exists()  # a clear error, not a traceback file


def test_an_over_budget_attack_is_clipped_to_exactly_its_budget(tmp_path):
    summary = _rogue_run(tmp_path, mode="big", eps=5.5)
    rec = {r["attack"]: r for r in summary.records}["rogue"]
    assert rec["status"] == "ok"
    import json

    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "store" / "protect").glob("*/*/_done.json")
               if json.loads(p.read_text())["parts"]["attack"]["name"] == "rogue"]
    assert meta["info"]["linf_levels"] == 5.0


def test_assert_budget_refuses_what_the_quantiser_must_never_produce():
    clean = torch.rand(2, 3, 16, 16)
    clean = torch.floor(clean * 255 + 0.5) / 255
    ok = quantize_to_budget(clean + 4 / 255, clean, 4)
    assert assert_budget(ok, clean, 4, "t") == 4
    assert assert_budget(ok, clean, 4.9, "t") == 4
    with pytest.raises(BudgetError, match="exceeds the budget"):
        assert_budget(ok, clean, 3.5, "t")  # ⌊3.5⌋ = 3 < 4
    for eps in (math.nan, math.inf, -1):
        with pytest.raises(BudgetError, match="not a budget"):
            assert_budget(ok, clean, eps, "t")
    broken = ok.clone()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(BudgetError, match="NaN"):
        check_images(broken, clean, "t")


# -- devices -----------------------------------------------------------------------------------


def test_device_names_and_availability():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for name in ("tpu9", "cuda 0", "gpu", ""):
        with pytest.raises(ConfigError, match="is not a device name"):
            resolve_device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        with pytest.raises(ConfigError, match="CUDA|cuda"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda").type == "cuda"
    with pytest.raises(ConfigError, match="this machine has|not available|no CUDA"):
        resolve_device(f"cuda:{max(count, 1) + 2}")
    assert parse_device("cuda:3") == torch.device("cuda", 3)  # a driver may name its workers' device


def test_a_driver_may_name_a_device_only_workers_have(tmp_path):
    suite = parse_suite({**BASE, "device": "cuda:99"}, "ray.toml")
    runner = Runner(suite, tmp_path, progress=False, in_process=False)
    assert runner.device == torch.device("cuda", 99)
    with pytest.raises(ConfigError, match="ray.toml: device 'cuda:99'"):
        Runner(suite, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--device: device 'tpu9' is not a device name"):
        Runner(suite, tmp_path, progress=False, device="tpu9", in_process=False)
