"""Third-party log lines that read as failures on a normal run, filtered before anything imports
the library that logs them (``benchbase/__init__`` imports this module first).

- bitsandbytes (installed with pyiqa) is imported by diffusers' quantizer support whenever
  diffusers is; on CPUs with AVX512-BF16 it logs "Failed to load CPU gemm_4bit_forward from
  kernels-community: No module named 'kernels'" — an optional 4-bit kernel benchbase never
  uses. Only that message is dropped; the logger's other warnings still show.
- Before failing, that import asks the ``kernels`` package for the kernel, which, with the hub
  offline (HF_HUB_OFFLINE=1, as benchbase runs), logs "Skipping publisher trust check for
  'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode" —
  once per process, so once per Ray worker. No kernel is loaded (it is not in the cache, and the
  import falls back to bitsandbytes' own code), so there is no trust to check: only that message of
  that logger is dropped.

Every process that computes a stage imports ``benchbase`` before any of these libraries (a Ray
worker imports it to unpickle its task), so the filters are in place in workers too.
"""

from __future__ import annotations

import logging


class DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
logging.getLogger("kernels._internals.hf_hub").addFilter(
    DropMessages("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"))
