"""The stage builders: for each stage of a cell, its key parts and the function that computes
it into a folder.

A key hashes the stage, the component name + version, its parameters, the upstream keys and
the seed, so a stage is computed once for every cell that shares it (one protection per
identity × attack for every purifier; a ``psnr`` of the protection shared by every purifier
and personalizer). The compute functions read their upstream stages from the store through
``read`` (they are complete by then: every executor computes a stage after its ``deps``).
"""

from __future__ import annotations

import json
import re
import threading
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from benchbase.components import Context, IdentityData, MetricInputs, MetricValue, Prompts, SharedStages, Threat
from benchbase.errors import ConfigError
from benchbase.graph import Cell, Identity, Node, NodeAddress
from benchbase.images import (
    assert_budget,
    check_images,
    l2_levels,
    load_pngs,
    quantize,
    quantize_to_budget,
    save_pngs,
)
from benchbase.records import Stage
from benchbase.seeds import SCHEME, derive_seed, generator, stage_seed  # noqa: F401  (derive_seed: public here too)
from benchbase.suite import Spec, Suite


def image_names(data: IdentityData) -> list[str]:
    """PNG names of set_B: an index prefix keeps load order equal to dataset order (files are
    read back sorted), the original stem keeps them recognisable. A file name is data: only
    letters, digits, '.', '_' and '-' of it reach the store (no separator, no control character)."""
    stems = data.files.get("set_B") or [""] * len(data.set_B)
    return [f"{i:03d}_{safe_stem(stem)}".rstrip("_") for i, stem in enumerate(stems)]


def safe_stem(name: str, limit: int = 60) -> str:
    """A file name from data reduced to a safe path component (may be empty)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).stem).strip("._-")[:limit]


def component_id(component) -> dict:
    return {"name": component.name, "version": component.version, "params": component.config()}


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:60] or "prompt"


def load_generated(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "prompts.json").read_text())
    return {prompt: load_pngs(folder / sub) for prompt, sub in index.items()}


class StageBuilder:
    """Builds every node of a suite's grid from its components.

    ``component(spec)`` gives the component a suite entry names; ``context(seed, identity,
    *stage, threat=)`` the ``Context`` a stage hands its component; ``read(node)`` the folder of
    a complete upstream stage."""

    def __init__(self, suite: Suite, component: Callable[[Spec], Any], backend, backend_fp: str,
                 prompts: Prompts, device: torch.device, dtype: torch.dtype, progress: Callable,
                 shared: Callable[[str, dict, Callable[[Path], None]], Path], workdir: Path,
                 read: Callable[[Node], Path], plugins: Any = None):
        self.suite, self.component, self.backend, self.backend_fp = suite, component, backend, backend_fp
        self.plugins = plugins  # the run's plugin manager: components find models by role through it
        self.prompts, self.device, self.dtype, self.progress = prompts, device, dtype, progress
        self.shared, self.workdir, self.read = shared, workdir, read
        self._local = threading.local()  # the nodes of the cell being addressed (``_memo``)

    def _memo(self, stage: str, ident: Identity, cell: Cell, build: Callable[[Identity, Cell], Node]) -> Node:
        """The cell's ``stage`` node, built once while the same cell is being addressed: its stage
        keys and every score of it read the same upstream nodes, and hashing them again for each
        metric made planning a large grid several times slower. Only the last cell is kept."""
        memo = self._local.__dict__
        cell_key = (ident.name, ident.fingerprint, cell.seed, cell.at, id(cell.attack),
                    tuple(id(s) for s in cell.purifiers), id(cell.defense), id(cell.personalizer))
        if memo.get("cell") != cell_key:
            memo["cell"], memo["nodes"] = cell_key, {}
        node = memo["nodes"].get(stage)
        if node is None:
            node = memo["nodes"][stage] = build(ident, cell)
        return node

    def context(self, seed: int, identity: Identity | None, *stage: Any, threat: Threat | None = None,
                backend: Any = None) -> Context:
        """The context of one stage: ``stage`` is the stage and the names that make its stream
        (``benchbase.seeds``: the stage seed includes the identity, never the upstream choices);
        ``backend``: the protect stage's surrogate when the attack names one (transfer)."""
        stream = stage_seed(seed, identity.fingerprint if identity else None, *stage)
        return Context(
            device=self.device, dtype=self.dtype, seed=seed, generator=generator(stream), stream=stream,
            backend=backend or self.backend, identity=identity.data if identity else None, prompts=deepcopy(self.prompts),
            shared=SharedStages(self.shared), threat=threat, workdir=self.workdir,
            progress=partial(self.progress), plugins=self.plugins,
        )

    def _threat(self, cell: Cell) -> Threat | None:
        if not cell.attack.adaptive:
            return None
        defense = self.component(cell.defense)
        return Threat(purifiers=[self.component(s) for s in cell.purifiers], defense=defense,
                      training_prompts=defense.training_prompts(self.prompts))

    # -- the stages, in data-path order ------------------------------------------------------
    def clean(self, ident: Identity, cell: Cell) -> Node:
        return self._memo("clean", ident, cell, self._clean)

    def _clean(self, ident: Identity, cell: Cell) -> Node:
        """The identity's clean set_B as the 8-bit PNGs every image stage is compared with (the
        report shows them without loading the dataset)."""
        parts = {"identity": ident.fingerprint, "resolution": self.backend.resolution}

        def compute(folder: Path) -> dict:
            save_pngs(ident.data.set_B, folder / "images", image_names(ident.data))
            return {"identity": ident.name, "files": ident.data.files.get("set_B", [])}

        return Node(Stage.CLEAN, parts, compute, address=cell.address(Stage.CLEAN))

    def protect(self, ident: Identity, cell: Cell) -> Node:
        return self._memo("protect", ident, cell, self._protect)

    def attack_backend(self, spec: Spec) -> tuple[Any, str]:
        """The backend an attack optimises against and its fingerprint: its own ``surrogate``
        (transfer: the protector does not know the victim's model), else the suite's."""
        if spec.surrogate is None:
            return self.backend, self.backend_fp
        backend = self.component(spec.surrogate)
        fps = self.__dict__.setdefault("surrogate_fps", {})  # hash each surrogate's weights once
        if id(spec.surrogate) not in fps:
            fps[id(spec.surrogate)] = backend.fingerprint()
        return backend, fps[id(spec.surrogate)]

    def _protect(self, ident: Identity, cell: Cell) -> Node:
        attack = self.component(cell.attack)
        backend, backend_fp = self.attack_backend(cell.attack)
        # the same parts with or without `surrogate`: a protection made on A is one stage whichever
        # suite (victim) asks for it, and several victims' runs sharing a store compute it once
        parts = {"attack": component_id(attack), "identity": ident.fingerprint,
                 "backend": backend_fp, "resolution": self.backend.resolution,
                 "seed": cell.seed, "seeds": SCHEME, "prompts": vars(self.prompts)}
        threat = self._threat(cell)
        if threat is not None:  # an adaptive protection depends on the threat it optimises against
            parts["threat"] = {"purifiers": [component_id(p) for p in threat.purifiers],
                               "defense": component_id(threat.defense)}

        def compute(folder: Path) -> dict:
            # the attack's name, not its label: the key hashes names (a stored stage drew this
            # stream), and a swept value or a surrogate variant of it draws the same stream as the
            # plain entry (common random numbers along a budget curve and across surrogates)
            ctx = self.context(cell.seed, ident, Stage.PROTECT, cell.attack.name, threat=threat, backend=backend)
            clean = ident.data.set_B
            adv = attack.protect(clean.to(self.device), ctx)
            what, eps = f"attack {cell.attack.label!r}", attack.eps
            check_images(adv, clean, what)  # NaN/inf or a wrong shape: the stage fails, never "ok"
            protected = quantize_to_budget(adv, clean, eps, mode=getattr(attack.params, "quantization", "round"))
            linf = assert_budget(protected, clean, eps, what)  # whatever the plugin did
            save_pngs(protected, folder / "images", image_names(ident.data))
            return {"eps_levels": eps, "linf_levels": linf, "l2_levels": l2_levels(protected, clean), **ctx.info}

        return Node(Stage.PROTECT, parts, compute, address=cell.address(Stage.PROTECT))

    def purify(self, ident: Identity, cell: Cell) -> Node:
        return self._memo("purify", ident, cell, self._purify)

    def _purify(self, ident: Identity, cell: Cell) -> Node:
        up = self.protect(ident, cell)
        chain = [self.component(s) for s in cell.purifiers]
        parts = {"purifiers": [component_id(p) for p in chain], "protect": up.key, "seed": cell.seed,
                 "seeds": SCHEME, "backend": self.backend_fp}

        def compute(folder: Path) -> dict:
            images = load_pngs(self.read(up) / "images").to(self.device)
            info = {}
            try:
                for i, (spec, purifier) in enumerate(zip(cell.purifiers, chain)):
                    ctx = self.context(cell.seed, ident, Stage.PURIFY, i, spec.name)
                    before, images = images, purifier.purify(images, ctx)
                    check_images(images, before, f"purifier {spec.label!r}")
                    images = quantize(images)  # each stage's output is what a file would hold
                    info[spec.label] = ctx.info
            finally:  # free purifier models before the next stage (fine-tuning) needs the memory
                for purifier in chain:
                    purifier.release()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            save_pngs(images, folder / "images", image_names(ident.data))
            return {"purifiers": info}

        return Node(Stage.PURIFY, parts, compute, ups=[up], address=cell.address(Stage.PURIFY))

    def personalize(self, ident: Identity, cell: Cell) -> Node:
        return self._memo("personalize", ident, cell, self._personalize)

    def _personalize(self, ident: Identity, cell: Cell) -> Node:
        up = self.purify(ident, cell)
        personalizer, defense = self.component(cell.personalizer), self.component(cell.defense)
        parts = {"personalizer": {**component_id(personalizer), "params": personalizer.train_config()},
                 "defense": component_id(defense), "purify": up.key, "seed": cell.seed, "seeds": SCHEME,
                 "backend": self.backend_fp, "prompts": vars(self.prompts)}

        def compute(folder: Path) -> dict:
            images = load_pngs(self.read(up) / "images").to(self.device)
            # the victim's stream names no attack, purifier, defense or personalizer: every victim of
            # this identity and seed draws the same noise (common random numbers, benchbase.seeds)
            ctx = self.context(cell.seed, ident, Stage.PERSONALIZE)
            personalizer.train(images, ctx, defense, folder)
            return ctx.info

        return Node(Stage.PERSONALIZE, parts, compute, ups=[up], address=cell.address(Stage.PERSONALIZE))

    def generate(self, ident: Identity, cell: Cell) -> Node:
        return self._memo("generate", ident, cell, self._generate)

    def _generate(self, ident: Identity, cell: Cell) -> Node:
        up = self.personalize(ident, cell)
        personalizer, defense = self.component(cell.personalizer), self.component(cell.defense)
        parts = {"personalizer": component_id(personalizer), "personalize": up.key, "seed": cell.seed,
                 "seeds": SCHEME, "eval": self.prompts.eval, "negative": self.prompts.negative}

        def compute(folder: Path) -> dict:
            model_dir = self.read(up)
            ctx = self.context(cell.seed, ident, Stage.GENERATE)  # common random numbers, as personalize
            outputs = personalizer.generate(model_dir, ctx, defense)
            index = {}
            for i, (prompt, images) in enumerate(outputs.items()):
                sub = f"{i:02d}_{slug(prompt)}"
                save_pngs(images, folder / sub)
                index[prompt] = sub
            (folder / "prompts.json").write_text(json.dumps(index, indent=1))
            return ctx.info

        return Node(Stage.GENERATE, parts, compute, ups=[up], address=cell.address(Stage.GENERATE))

    def score(self, ident: Identity, cell: Cell, spec: Spec) -> Node:
        metric = self.component(spec)
        reads = set(metric.reads)
        ups: dict[str, Node] = {}
        if "protected" in reads:
            ups["protected"] = self.protect(ident, cell)
        if "purified" in reads:
            ups["purified"] = self.purify(ident, cell)
        if "generated" in reads:
            ups["generated"] = self.generate(ident, cell)
        parts = {"metric": component_id(metric), "identity": ident.fingerprint, "seed": cell.seed, "seeds": SCHEME,
                 "inputs": {k: n.key for k, n in sorted(ups.items())}, "reads": sorted(reads),
                 "resolution": self.backend.resolution, "prompts": vars(self.prompts)}

        def compute(folder: Path) -> dict:
            inputs = MetricInputs()
            for name, node in ups.items():
                path = self.read(node)
                setattr(inputs, name, load_generated(path) if name == "generated" else load_pngs(path / "images"))
            data = ident.data
            if "clean" in reads:
                inputs.clean = data.set_B
            if "references" in reads:
                inputs.references = data.set_C
            if "set_A" in reads:
                inputs.set_A = data.set_A
            ctx = self.context(cell.seed, ident, Stage.SCORE, spec.name)
            value = metric.score(inputs, ctx)
            if not isinstance(value, MetricValue):
                raise TypeError(f"metric {spec.label!r} returned {type(value).__name__}, not MetricValue")
            (folder / "score.json").write_text(json.dumps(vars(value), default=float))
            return ctx.info

        index = next(i for i, s in enumerate(self.suite.metrics) if s is spec)
        return Node(Stage.SCORE, parts, compute, ups=list(ups.values()), address=cell.address(Stage.SCORE, index))

    # -- addressing ------------------------------------------------------------------------
    def stage_keys(self, ident: Identity, cell: Cell) -> dict[str, str]:
        """The keys of a cell's stages (hashing only: nothing is computed)."""
        return {str(s): getattr(self, str(s))(ident, cell).key
                for s in (Stage.CLEAN, Stage.PROTECT, Stage.PURIFY, Stage.PERSONALIZE, Stage.GENERATE)}

    def cell_at(self, address: NodeAddress) -> Cell:
        s = self.suite
        return Cell(address.identity, address.seed, s.attacks[address.attack], s.purifiers[address.purifier],
                    s.defenses[address.defense], s.personalizers[address.personalizer],
                    at=(address.attack, address.purifier, address.defense, address.personalizer))

    def node_at(self, address: NodeAddress, ident: Identity) -> Node:
        """Rebuild the node at ``address`` (a pure function of the suite and the address)."""
        cell = self.cell_at(address)
        stage = Stage(address.stage)
        node = (self.score(ident, cell, self.suite.metrics[address.metric]) if stage is Stage.SCORE
                else getattr(self, stage.value)(ident, cell))
        if address.key and node.key != address.key:
            raise ConfigError(f"{address.stage} stage of {address.identity} hashes to {node.key} here but "
                              f"{address.key} on the driver: the worker runs other plugin versions or data")
        return node
