"""The core's structure: one family table, the stage enum, ``python -m benchbase``, executor
options reaching the executor's own parameters, a third executor built on the session interface
alone, and a normal run printing nothing that reads as an error."""

import importlib.util
import subprocess
import sys

import pytest

from benchbase import hookimpl, hookspecs
from benchbase.components import FAMILY_BASES, Executor
from benchbase.families import CELL_KEYS, FAMILIES, GRID_FAMILIES
from benchbase.plugins import PluginManager
from benchbase.records import CELL_STAGES, Record, Stage
from benchbase.suite import parse_suite

FAST_DREAMBOOTH = {"name": "dreambooth", "max_train_steps": 1, "num_class_images": 1, "class_inference_steps": 2,
                   "num_images_per_prompt": 1, "num_inference_steps": 2}


def small_suite(**over):
    data = {"name": "core-test", "backend": {"name": "tiny"},
            "dataset": {"name": "sample", "identities": ["astronaut"], "images_per_set": 2},
            "attacks": ["none", {"name": "noise", "eps": 8}], "purifiers": ["none", "jpeg"],
            "personalizers": [FAST_DREAMBOOTH], "metrics": ["psnr", "ref-rmse"]}
    data.update(over)
    return parse_suite(data)


def test_one_family_table_drives_registry_hooks_suites_and_cells():
    assert set(FAMILY_BASES) == set(FAMILIES)
    for family in FAMILIES:  # every family has its registration hook
        assert callable(getattr(hookspecs, f"register_{family}"))
    assert GRID_FAMILIES == ("attacks", "purifiers", "defenses", "personalizers", "metrics")
    assert set(CELL_KEYS) | {"identity", "seed"} == set(Record.CELL)
    assert [s.value for s in CELL_STAGES] == ["clean", "protect", "purify", "personalize", "generate"]
    assert f"{Stage.PROTECT}" == str(Stage.PROTECT) == "protect"  # paths and messages read as the name


def test_records_keep_their_field_order_and_read_older_files():
    import dataclasses

    assert set(Record.ORDER) == {f.name for f in dataclasses.fields(Record)}
    old = {"identity": "a", "seed": 0, "attack": "none", "purifier": "none", "defense": "none",
           "personalizer": "db", "metric": "psnr", "direction": "higher", "status": "ok", "value": 3.0,
           "unknown_field": 1}  # a hand-written or older record: missing fields read as their defaults
    rec = Record.from_json(old)
    assert rec.value == 3.0 and rec.stages == {} and rec.key is None
    assert list(rec.to_json()) == list(Record.ORDER)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "benchbase", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_python_m_benchbase_offers_every_command():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("run", "status", "leaderboard", "report", "ls", "plugins", "train-mini"):
        assert f"  {command}" in out.stdout, command
    assert "Usage: benchbase" in out.stdout


def test_executor_options_reach_the_executors_own_parameters():
    from benchbase.cli import executor_for
    from benchbase.errors import ConfigError

    suite = small_suite(executor={"name": "ray", "max_retries": 5})
    if importlib.util.find_spec("ray") is not None:
        ex = executor_for(suite, None, ("num_cpus=2", "address=auto", "gpu_stages=[\"protect\"]"))
        assert ex.name == "ray" and ex.params.max_retries == 5 and ex.params.num_cpus == 2
        assert ex.params.address == "auto" and ex.params.gpu_stages == ["protect"]
    with pytest.raises(ConfigError, match="address"):  # the local executor has no such parameter
        executor_for(small_suite(), "local", ("address=auto",))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        executor_for(small_suite(), None, ("oops",))


class ReverseExecutor(Executor):
    """A third executor written against the session interface only: it runs each stage in a worker
    session opened from ``worker_job`` (as a cluster worker would) and, among the stages whose
    inputs are done, always takes the last planned one (another order than ``local``)."""

    def execute(self, session):
        from benchbase.pipeline import open_session

        plan = session.plan()
        worker = open_session(session.worker_job(), manager=session.pm)
        outcomes, left = {}, dict(plan.nodes)
        while left:
            key = [k for k, n in left.items() if all(d in outcomes for d in n.deps)][-1]
            node = left.pop(key)
            outcomes[key] = worker.run_stage(node.address, [outcomes[d] for d in node.deps])
            session.progress(running=1)
            session.stage_done(outcomes[key])


@hookimpl
def register_executors(register):
    register("reverse", ReverseExecutor)


def test_a_third_executor_needs_no_core_change(tmp_path):
    from benchbase.pipeline import Runner

    pm = PluginManager()
    pm.register(sys.modules[__name__])
    suite = small_suite()
    local = Runner(suite, tmp_path / "local", manager=pm, progress=False).run()
    other = Runner(suite, tmp_path / "other", manager=pm, progress=False,
                   executor=pm.create("executors", "reverse", {})).run()
    assert not local.failed and other.records == local.records
    assert other.executed == local.executed
    assert (tmp_path / "other" / "results.jsonl").read_text() == (tmp_path / "local" / "results.jsonl").read_text()


BITSANDBYTES_ON_AVX512BF16 = """
import importlib.abc, importlib.machinery, sys

class Pretend(importlib.abc.MetaPathFinder):
    # make bitsandbytes believe the CPU has AVX512-BF16 (where it logs the kernels warning)
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Pretend())
if sys.argv[1] == "benchbase":
    import benchbase
import diffusers
from diffusers import UNet2DConditionModel
"""


def test_a_normal_run_does_not_print_the_bitsandbytes_kernel_warning():
    pytest.importorskip("bitsandbytes")

    def stderr(first):
        return subprocess.run([sys.executable, "-c", BITSANDBYTES_ON_AVX512BF16, first], capture_output=True,
                              text=True, timeout=300).stderr

    assert "Failed to load CPU gemm_4bit_forward" in stderr("diffusers")  # what users saw
    assert "Failed to load CPU gemm_4bit_forward" not in stderr("benchbase")
