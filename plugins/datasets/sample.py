"""A small identity dataset that works offline, from portraits shipped in installed packages.

Identities and licences:
- ``astronaut``: Eileen Collins, NASA photograph, public domain
  (``skimage.data.astronaut()``, scikit-image states no known copyright restrictions).
- ``hopper``: Rear Admiral Grace Hopper, official U.S. Navy photograph, a work of the U.S.
  federal government, generally described as public domain (shipped by matplotlib as
  ``grace_hopper.jpg``; the package itself states no licence for the image).

Each identity has one photograph, so set_A / set_B / set_C are made by seeded
augmentation (random crop around the face, horizontal flip, small rotation, brightness
jitter): 4 images per set, no image shared between sets. That is enough to exercise the
protocol; it is not a face-recognition benchmark.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageEnhance
from pydantic import Field

from benchbase.components import Dataset, IdentityData, Params, Prompts
from benchbase.errors import DataError
from benchbase.images import pil_to_tensor, preprocess

AUGMENT_VERSION = 1  # bump when the augmentation below changes
SOURCES = {
    # name: (loader, face box (left, top, right, bottom) in source pixels)
    "astronaut": ("skimage", (130, 20, 330, 230)),
    "hopper": ("matplotlib", (110, 40, 410, 340)),
}


def _source(name: str) -> Image.Image:
    kind, _ = SOURCES[name]
    try:
        if kind == "skimage":
            from skimage import data

            return Image.fromarray(data.astronaut()).convert("RGB")
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            return Image.open(fh).convert("RGB")
    except Exception as exc:
        raise DataError(f"sample identity {name!r} needs its source package ({kind}): {exc}") from None


def _augment(img: Image.Image, box: tuple, rng: np.random.Generator, resolution: int) -> Image.Image:
    left, top, right, bottom = box
    side = right - left
    scale = rng.uniform(1.0, 1.35)  # crop a bit more than the face box
    s = side * scale
    cx = (left + right) / 2 + rng.uniform(-0.08, 0.08) * side
    cy = (top + bottom) / 2 + rng.uniform(-0.08, 0.08) * side
    angle = rng.uniform(-6, 6)
    rotated = img.rotate(angle, resample=Image.BILINEAR, center=(cx, cy), fillcolor=(128, 128, 128))
    crop = rotated.crop((int(cx - s / 2), int(cy - s / 2), int(cx + s / 2), int(cy + s / 2)))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.9, 1.1))
    return preprocess(crop, resolution)


class SampleDataset(Dataset):
    class Params(Params):
        identities: list[str] = list(SOURCES)
        images_per_set: int = Field(4, ge=1)
        seed: int = Field(0, ge=0)
        class_noun: str = "person"
        identifier: str = "sks"

    def identities(self) -> list[str]:
        unknown = [i for i in self.params.identities if i not in SOURCES]
        if unknown:
            raise DataError(f"unknown sample identities {unknown}; available: {', '.join(SOURCES)}")
        return list(self.params.identities)

    def load(self, identity: str, resolution: int) -> IdentityData:
        self.identities()
        img = _source(identity)
        box = SOURCES[identity][1]
        n = self.params.images_per_set
        seed = int(hashlib.sha256(f"{identity}-{self.params.seed}".encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng(seed)
        import torch

        images = [pil_to_tensor(_augment(img, box, rng, resolution)) for _ in range(3 * n)]
        sets = {name: torch.stack(images[i * n:(i + 1) * n]) for i, name in enumerate(("set_A", "set_B", "set_C"))}
        files = {name: [f"{identity}_{name}_{k:03d}" for k in range(n)] for name in sets}
        return IdentityData(name=identity, files=files, **sets)

    def fingerprint(self, identity: str) -> str:
        p = self.params
        return hashlib.sha256(f"{identity}|{p.images_per_set}|{p.seed}|{AUGMENT_VERSION}".encode()).hexdigest()[:16]

    def prompts(self) -> Prompts:
        p = self.params
        return Prompts(instance=f"a photo of {p.identifier} {p.class_noun}", class_=f"a photo of {p.class_noun}",
                       eval=[f"a photo of {p.identifier} {p.class_noun}", f"a dslr portrait of {p.identifier} {p.class_noun}"],
                       identifier=p.identifier, class_noun=p.class_noun)
