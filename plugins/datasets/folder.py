"""The Anti-DreamBooth layout: ``<root>/<identity>/set_A|set_B|set_C/*.{png,jpg}``.

set_A: clean images the protector may use (ASPL/FSMG surrogate training); set_B: the
images that get protected, purified and fine-tuned on; set_C: clean references for
metrics. Images are resized (short side, bilinear) and center-cropped to the backend's
resolution, then rounded to 8 bits. Grayscale/palette images are converted to RGB and
RGBA images composited on white (documented conversions); anything unreadable is an
error naming the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import ValidationInfo, field_validator

from benchbase.components import Dataset, IdentityData, Params, Prompts
from benchbase.errors import DataError
from benchbase.images import image_files, load_images

SETS = ("set_A", "set_B", "set_C")


class FolderDataset(Dataset):
    class Params(Params):
        root: str
        identities: list[str] | None = None  # default: every sub-folder of root
        class_noun: str = "person"
        identifier: str = "sks"
        instance_prompt: str = "a photo of {identifier} {class_noun}"
        class_prompt: str = "a photo of {class_noun}"
        eval_prompts: list[str] = ["a photo of {identifier} {class_noun}", "a dslr portrait of {identifier} {class_noun}"]

        @field_validator("identities")
        @classmethod
        def _names(cls, names: list[str] | None) -> list[str] | None:
            # an identity is a folder directly under root: a path would read outside the dataset
            for name in names or []:
                if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
                    raise ValueError(f"{name!r} is not an identity folder name (a name under root, not a path)")
            return names

        @field_validator("instance_prompt", "class_prompt", "eval_prompts")
        @classmethod
        def _template(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
            # prompts are filled with str.format: any other placeholder or a stray brace is a typo
            fill = {k: info.data.get(k, "") for k in ("identifier", "class_noun")}
            for text in value if isinstance(value, list) else [value]:
                try:
                    text.format(**fill)
                except (KeyError, IndexError, ValueError) as exc:
                    raise ValueError(f"{text!r} cannot be filled ({type(exc).__name__}: {exc}); "
                                     "the placeholders are {identifier} and {class_noun}") from None
            return value

    @property
    def root(self) -> Path:
        root = Path(self.params.root).expanduser()
        if root.exists() and not root.is_dir():
            raise DataError(f"dataset folder {root} is not a folder")
        if not root.is_dir():
            raise DataError(f"dataset folder {root} does not exist")
        return root

    def identities(self) -> list[str]:
        root = self.root
        if self.params.identities is not None:
            missing = [i for i in self.params.identities if not (root / i).is_dir()]
            if missing:
                raise DataError(f"identity folder(s) missing under {root}: {', '.join(missing)}")
            return list(self.params.identities)
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DataError(f"{root} has no identity folders (expected <root>/<identity>/set_A|set_B|set_C)")
        return found

    def _files(self, identity: str) -> dict[str, list[Path]]:
        folder = self.root / identity
        files = {}
        for name in SETS:
            sub = folder / name
            if not sub.is_dir():
                raise DataError(f"{sub} is missing (expected {', '.join(SETS)} under {folder})")
            found = image_files(sub)
            if not found:
                raise DataError(f"{sub} contains no images (.png, .jpg, .jpeg, .webp, .bmp)")
            files[name] = found
        return files

    def load(self, identity: str, resolution: int) -> IdentityData:
        files = self._files(identity)
        sets = {name: load_images(paths, resolution) for name, paths in files.items()}
        return IdentityData(name=identity, **sets, files={k: [p.name for p in v] for k, v in files.items()})

    def fingerprint(self, identity: str) -> str:
        h = hashlib.sha256()
        for name, paths in self._files(identity).items():
            for p in paths:
                h.update(f"{name}/{p.name}".encode())
                h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def prompts(self) -> Prompts:
        p = self.params
        fill = dict(identifier=p.identifier, class_noun=p.class_noun)
        return Prompts(instance=p.instance_prompt.format(**fill), class_=p.class_prompt.format(**fill),
                       eval=[e.format(**fill) for e in p.eval_prompts], identifier=p.identifier,
                       class_noun=p.class_noun)
