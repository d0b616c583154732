"""The ``mini`` dataset: held-out identities of the benchbase-mini world.

Identities ``heldout-000``, ``heldout-001``, … are procedural portraits
(``benchbase_plugins.worlds.mini.portraits``) whose attributes were never in the world's training data.
set_A, set_B and set_C are 4 photographs each (by default) of the same person with
different nuisances (pose, scale, lighting, background, clothing, expression), rendered
with disjoint seeds, as the real protocol's three disjoint photo sets. Prompts use the
class noun the world was trained with: "a photo of sks person" / "a photo of person".
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import Field

from benchbase.components import Dataset, IdentityData, Params, Prompts
from benchbase.errors import DataError
from benchbase.images import pil_to_tensor

SETS = ("set_A", "set_B", "set_C")


class MiniDataset(Dataset):
    class Params(Params):
        identities: Annotated[int, Field(ge=1)] | list[str] = Field(
            8, description="how many held-out identities, or their names")
        images_per_set: int = Field(4, ge=1)
        seed: int = Field(0, ge=0)
        identifier: str = "sks"
        #: which people a number of identities draws: "protocol" (heldout-000 …, for measuring)
        #: or "selection" (heldout-500 …, for choosing a world, a recipe or a threshold on clean
        #: data: never the people a protocol measures on)
        split: Literal["protocol", "selection"] = "protocol"

    def identities(self) -> list[str]:
        from .portraits import heldout_names, selection_names

        ids = self.params.identities
        if isinstance(ids, int):
            if ids < 1:
                raise DataError("mini dataset: identities must be at least 1")
            return selection_names(ids) if self.params.split == "selection" else heldout_names(ids)
        bad = [i for i in ids if not i.startswith("heldout-")]
        if bad:
            raise DataError(f"mini dataset: {bad} are not held-out identities (names look like heldout-000); "
                            "training identities would measure memorisation, not protection")
        return list(ids)

    def load(self, identity: str, resolution: int) -> IdentityData:
        from .portraits import SIZE, render
        from .portraits import identity as make_identity

        if resolution != SIZE:
            raise DataError(f"mini dataset: portraits are {SIZE} px; the backend wants {resolution} px "
                            "(use the mini backend)")
        ident = make_identity(identity)
        n = self.params.images_per_set
        import torch

        sets, files = {}, {}
        for k, name in enumerate(SETS):
            seeds = [1000 * (self.params.seed + 1) + k * n + i for i in range(n)]
            sets[name] = torch.stack([pil_to_tensor(render(ident, s).image) for s in seeds])
            files[name] = [f"{identity}_{name}_{i:03d}" for i in range(n)]
        return IdentityData(name=identity, files=files, **sets)

    def fingerprint(self, identity: str) -> str:
        from .portraits import GENERATOR_VERSION

        p = self.params
        return hashlib.sha256(f"mini|{identity}|{p.images_per_set}|{p.seed}|{GENERATOR_VERSION}".encode()).hexdigest()[:16]

    def prompts(self) -> Prompts:
        i = self.params.identifier
        return Prompts(instance=f"a photo of {i} person", class_="a photo of person",
                       eval=[f"a photo of {i} person"], identifier=i, class_noun="person")
