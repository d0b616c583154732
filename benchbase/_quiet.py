"""Third-party log lines that read as failures on a normal run, filtered before anything imports
the library that logs them (``benchbase/__init__`` imports this module first).

- bitsandbytes (installed with pyiqa) is imported by diffusers' quantizer support whenever
  diffusers is; on CPUs with AVX512-BF16 it logs "Failed to load CPU gemm_4bit_forward from
  kernels-community: No module named 'kernels'" — an optional 4-bit kernel benchbase never
  uses. Only that message is dropped; the logger's other warnings still show.
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
