"""Lets ``pytest`` run these tests from a source checkout before ``pip install -e .``."""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny backend needs no hub
if importlib.util.find_spec("benchbase_example") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
