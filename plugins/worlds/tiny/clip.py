"""A tiny random-weight open_clip model for offline tests (offline-stack.md §5).

Registers the config ``benchbase-tiny-clip`` (64-d embedding, 64-px input, two-layer
towers, open_clip's bundled BPE tokenizer) and builds it with a fixed seed, so CLIP metrics
can be exercised end to end without any download. Its numbers mean nothing.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

NAME = "benchbase-tiny-clip"
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@lru_cache(maxsize=1)
def register() -> str:
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="benchbase-tiny-clip-"))
    (folder / f"{NAME}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    return NAME


def build(seed: int = 0):
    """(model, preprocess, tokenizer) of the tiny model with seeded random weights."""
    import open_clip

    register()
    with torch.random.fork_rng(devices=[]):  # leave the global RNG untouched
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(NAME)
