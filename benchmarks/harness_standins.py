"""The plugin module of ``benchmarks/harness.py``'s stand-in components: load it with
``BENCHBASE_PLUGIN_MODULES=harness_standins`` and ``benchmarks/`` on ``PYTHONPATH``. Targets are
lazy ``"module:Class"`` strings, as a real plugin's are, so commands that only list or read
(``benchbase status``, ``leaderboard``) do not import torch for it."""

from benchbase.hookspecs import hookimpl

_M = "harness_components"


@hookimpl
def register_backends(register):
    register("stub", f"{_M}:StubBackend", version="1", description="harness benchmark stand-in")


@hookimpl
def register_datasets(register):
    register("stub", f"{_M}:StubDataset", version="1", description="harness benchmark stand-in")


@hookimpl
def register_attacks(register):
    register("stub-attack", f"{_M}:StubAttack", version="1", description="harness benchmark stand-in")


@hookimpl
def register_purifiers(register):
    register("stub-purifier", f"{_M}:StubPurifier", version="1", description="harness benchmark stand-in")


@hookimpl
def register_personalizers(register):
    register("stub-personalizer", f"{_M}:StubPersonalizer", version="1", description="harness benchmark stand-in")


@hookimpl
def register_metrics(register):
    register("stub-metric", f"{_M}:StubMetric", version="1", description="harness benchmark stand-in")
