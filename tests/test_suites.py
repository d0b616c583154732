"""Suite files: every built-in suite resolves against the installed plugins; bad suites fail clearly."""

import pytest

from benchbase.errors import ConfigError
from benchbase.plugins import get_plugin_manager
from benchbase.suite import builtin_suites, load_suite, parse_suite

BASE = {"backend": {"name": "tiny"}, "dataset": {"name": "sample"}, "attacks": ["none"],
        "personalizers": ["dreambooth"], "metrics": ["psnr"]}


@pytest.mark.parametrize("name", sorted(builtin_suites()))
def test_builtin_suite_builds_every_component(name):
    suite = load_suite(name)
    pm = get_plugin_manager()
    specs = [suite.backend, suite.dataset, *suite.attacks, *(s for c in suite.purifiers for s in c),
             *suite.defenses, *suite.personalizers, *suite.metrics]
    for spec in specs:
        pm.create(spec.family, spec.name, spec.params)


def test_labels_for_repeated_components():
    suite = parse_suite({**BASE, "attacks": ["aspl", {"name": "aspl", "adaptive": True},
                                             {"name": "noise", "eps": 4}, {"name": "noise", "eps": 8}]})
    labels = [a.label for a in suite.attacks]
    assert labels[:2] == ["aspl", "aspl-adaptive"]
    assert labels[2].startswith("noise-") and labels[3].startswith("noise-") and labels[2] != labels[3]


@pytest.mark.parametrize("change,message", [
    ({"atacks": ["none"]}, "unknown suite keys"),
    ({"seeds": "zero"}, "seeds"),
    ({"attacks": []}, "non-empty"),
    ({"attacks": [{"eps": 3}]}, "needs a string `name`"),
    ({"attacks": ["none", "none"]}, "appears twice"),
    ({"purifiers": [[]]}, "empty chain"),
    ({"prompts": {"instance": "x", "bogus": 1}}, "prompts"),
])
def test_bad_suites_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_suite({**BASE, **change})


def test_missing_backend_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="missing `backend`"):
        parse_suite({k: v for k, v in BASE.items() if k != "backend"})
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_suite(str(bad))


def test_executor_table_is_parsed_and_not_hashed():
    plain = parse_suite(BASE)
    with_ray = parse_suite({**BASE, "executor": {"name": "ray", "max_retries": 5}})
    assert plain.hash == with_ray.hash  # how a grid runs does not change its results
    assert with_ray.executor.name == "ray" and with_ray.executor.params == {"max_retries": 5}
    get_plugin_manager().create("executors", "ray", with_ray.executor.params)


def test_cells_filter_restricts_the_grid():
    suite = parse_suite({**BASE, "attacks": ["none", "noise"], "purifiers": ["none", "jpeg"],
                         "cells": [{"attack": "none"}, {"attack": "noise", "purifier": "jpeg"}]})
    assert suite.n_cells == 3
    kept = [(a.label, suite.purifier_label(c)) for a in suite.attacks for c in suite.purifiers
            if suite.keeps(a, c, suite.defenses[0], suite.personalizers[0])]
    assert kept == [("none", "none"), ("none", "jpeg"), ("noise", "jpeg")]
    with pytest.raises(ConfigError, match="'aspl' is not in the suite"):
        parse_suite({**BASE, "cells": [{"attack": "aspl"}]})
    with pytest.raises(ConfigError, match="unknown key 'attacks'"):
        parse_suite({**BASE, "cells": [{"attacks": "none"}]})


def test_contrasts_are_validated_and_completed():
    from benchbase.suite import contrasts_of

    data = {**BASE, "attacks": ["none", "noise"],
            "contrasts": [{"metric": "psnr", "a": {"attack": "none"}, "b": {"attack": "noise"}}]}
    parse_suite(data)
    (c,) = contrasts_of(data)
    assert c["b"] == {"attack": "noise", "purifier": "none", "defense": "none", "personalizer": "dreambooth"}
    with pytest.raises(ConfigError, match="needs"):
        parse_suite({**data, "contrasts": [{"metric": "psnr", "a": {}}]})
    with pytest.raises(ConfigError, match="not in the suite"):
        parse_suite({**data, "contrasts": [{"metric": "psnr", "a": {"attack": "x"}, "b": {}}]})
