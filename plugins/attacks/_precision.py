"""Surrogate precision: the weight dtype in which a surrogate-training attack trains and attacks.

The released ASPL / T-ASPL / E-ASPL, SimAC and MetaCloak loops cast UNet, text encoder and
VAE to *pure* bf16 weights (no fp32 master copy) and then train them with AdamW at lr 5e-7:

- Anti-DreamBooth ``attacks/aspl.py``: ``train_one_epoch`` (``weight_dtype = torch.bfloat16``,
  ``vae/text_encoder/unet.to(device, dtype=weight_dtype)``) and ``pgd_attack`` (the same cast);
  ``attacks/ensemble_aspl.py`` identically;
- SimAC ``attacks/time_feature.py``: ``train_one_epoch``, ``pgd_attack`` and ``select_timestep``;
- MetaCloak ``robust_facecloak/attacks/algs/metacloak.py``: ``train_few_step`` trains in bf16;
  its PGD (``attacks/worker/robust_pgd_worker.py`` ``perturb``) casts the same modules to the
  script's ``--mixed_precision=fp16`` (``script/sub/gen/metacloak.sh``) and back.

At lr 5e-7 an AdamW update (≈ lr in size) is below half a bf16 ulp for every weight larger than
about 1e-4 in magnitude, so it rounds away: the released surrogate stays ≈ the base model
(docs/attacks-surrogate.md gives the measured fractions). ``precision = "release"`` (the default of
every surrogate attack) reproduces what each method's release does; ``"fp32"`` keeps a real
fp32 fine-tune (a different attack, named as such); ``"bf16"`` casts everything to bf16;
``"context"`` uses the run's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch

Precision = Literal["release", "fp32", "bf16", "context"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_precision(precision: str, release: str) -> str:
    """The precision ``load_models`` gets: the method's released one for ``"release"``."""
    return release if precision == "release" else precision


def cast_models(models, dtype: torch.dtype) -> None:
    """Cast UNet, VAE and text encoder in place (parameters keep their identity, so optimizers and
    trainable-parameter lists stay valid), as the released loops' ``module.to(dtype)`` do."""
    for module in (models.unet, models.vae, models.text_encoder):
        module.to(dtype)
    models.dtype = dtype


@contextmanager
def cast_for(models, dtype: torch.dtype | None):
    """Run a block with the bundle in ``dtype`` and cast it back afterwards (MetaCloak's release
    attacks in fp16 between bf16 training calls; the round trip bf16 → fp16 → bf16 is the
    release's too). ``None``: no cast."""
    if dtype is None or dtype == models.dtype:
        yield models
        return
    before = models.dtype
    cast_models(models, dtype)
    try:
        yield models
    finally:
        cast_models(models, before)
