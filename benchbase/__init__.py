"""benchbase: a benchmark harness for protective perturbations, purifiers and training-time
defenses around personalized diffusion models (DreamBooth, LoRA)."""

from benchbase import _quiet  # noqa: F401  (first: filters third-party log lines that read as errors)
from benchbase.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
