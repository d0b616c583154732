"""benchbase: a benchmark harness for protective perturbations, purifiers and training-time
defenses around personalized diffusion models (DreamBooth, LoRA).

The public API a plugin needs is importable from here::

    from benchbase import Attack, Context, Params, hookimpl

the component base classes, ``Params``, ``Context`` and the data handed to components
(``Prompts``, ``IdentityData``, ``MetricInputs``, ``MetricValue``, ``Threat``), the errors,
and ``hookimpl``. Helpers for writing components (PGD, the threat view, LoRA, the DreamBooth
loop, class images, the noising path) are in :mod:`benchbase.toolkit`; test fixtures in
:mod:`benchbase.testing`. Names are resolved on first use: ``import benchbase`` imports
neither torch nor pydantic (the CLI starts fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from benchbase import _quiet  # noqa: F401  (first: filters third-party log lines that read as errors)
from benchbase.errors import (
    BenchbaseError,
    BudgetError,
    ConfigError,
    DataError,
    DiskError,
    PluginError,
    RunInProgressError,
    Unavailable,
    UnknownComponentError,
    WeightsUnavailableError,
)
from benchbase.hookspecs import hookimpl

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first attribute access)
_LAZY = {name: "benchbase.components" for name in (
    "Attack", "Purifier", "Defense", "Personalizer", "Metric", "Backend", "Dataset", "Executor",
    "Params", "Context", "Prompts", "IdentityData", "MetricInputs", "MetricValue", "Threat",
)}

__all__ = [
    # component bases and their data
    "Attack", "Purifier", "Defense", "Personalizer", "Metric", "Backend", "Dataset", "Executor",
    "Params", "Context", "Prompts", "IdentityData", "MetricInputs", "MetricValue", "Threat",
    # errors
    "BenchbaseError", "BudgetError", "ConfigError", "DataError", "DiskError", "PluginError",
    "RunInProgressError", "Unavailable", "UnknownComponentError", "WeightsUnavailableError",
    # plugin registration
    "hookimpl",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these resolve lazily
    from benchbase.components import (  # noqa: F401
        Attack,
        Backend,
        Context,
        Dataset,
        Defense,
        Executor,
        IdentityData,
        Metric,
        MetricInputs,
        MetricValue,
        Params,
        Personalizer,
        Prompts,
        Purifier,
        Threat,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'benchbase' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
