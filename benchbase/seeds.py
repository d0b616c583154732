"""The one seed scheme: every random draw of a run comes from a named derivation of the suite seed.

A *stream* is a seed derived by hashing a parent seed with labels (``derive_seed``). The core
hands each stage a stream (``stage_seed``) as ``ctx.generator``; a component that needs several
independent draws names them (``ctx.rng("generation", prompt, j)``), and a stage shared on
purpose across identities or seeds takes its stream from ``shared_seed`` with the labels that say
what it is. No component seeds a generator any other way.

The rule (``stage_seed``): a stage's stream is named by the seed, the **identity** (its
fingerprint, the hash of its images already in every stage key) and what the stage itself is —
never by the upstream choices that produced its input:

========================  ==============================================================
stage                     stream labels besides (seed, identity)
========================  ==============================================================
``protect``               the attack's name: attacks draw independently of each other
``purify``                the position in the chain and the purifier's name
``personalize``           nothing else: the victim of every attack, purifier chain, defense
``generate``              and personalizer of one identity and seed draws the same training
                          noise, timesteps and generation noise (common random numbers)
``score``                 the metric's name: every cell of one identity and seed is scored
                          with the same draws (e.g. SER-FIQ's dropout masks)
========================  ==============================================================

So two identities never share a draw (before 2026-12-08 the identity was missing from the
labels and every identity of a run drew the same noise), while the clean, noise and attacked
victims of one identity differ only by their training photos: a paired contrast between them
over identities measures the protection, not a different draw of the victim's noise. Names,
not suite labels, enter the labels, because stage keys hash names and parameters, not labels:
a stage found in the store was computed with the stream its key implies.
"""

from __future__ import annotations

from typing import Any

from benchbase.store import hash_key

#: the version of this scheme, in every key of a stage that draws: a store filled under another
#: scheme (version 1: no identity in the stream) is not reused for results it would not give now
SCHEME = 2
#: the root of streams shared on purpose across identities and seeds (see ``shared_seed``)
SHARED = "shared"


def derive_seed(seed: int, *parts: Any) -> int:
    """A seed derived from ``seed`` and the labels ``parts`` (hashed; stable across processes)."""
    return int(hash_key("seed", {"seed": seed, "parts": [str(p) for p in parts]})[:12], 16) % (2**63)


def stage_seed(seed: int, identity: str | None, stage: Any, *labels: Any) -> int:
    """The stream of one stage of one identity (the rule in the module docstring)."""
    return derive_seed(seed, "identity", identity or "", str(stage), *labels)


def shared_seed(*labels: Any) -> int:
    """The stream of a stage shared on purpose across cells, not derived from any cell's seed:
    the class images of the prior term (one set per base model, for every identity and seed),
    FSMG's surrogate (one per identity, for every seed). Its labels name what the stage is (the
    distinguishing parts of its key, the identity's among them when it is per identity), so two
    shared stages never draw alike and a cache hit equals a miss; the caller says why it is shared."""
    return derive_seed(0, SHARED, *labels)


def generator(seed: int):
    """A CPU ``torch.Generator`` seeded with ``seed`` (draw on CPU, move to the device)."""
    import torch

    return torch.Generator().manual_seed(int(seed))
