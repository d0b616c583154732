"""Base classes of the component families and the contexts the core hands them.

Conventions at every boundary (see docs/architecture.md):
- images are ``torch.float32`` tensors, NCHW, RGB, range [0, 1];
- budgets are in 8-bit levels (``eps = 8`` means 8/255 in [0, 1]);
- every random choice uses ``ctx.generator`` (a CPU ``torch.Generator`` seeded with the stage's
  stream, derived from the seed, the identity and the stage: ``benchbase.seeds``) or a named
  derivation of that stream (``ctx.rng("generation", prompt, j)``); draw on CPU and move to
  ``ctx.device``;
- device and dtype are explicit in ``ctx``.

Each component has a ``name`` and ``version`` (set by the plugin registry from the
registration) and validated parameters in a nested pydantic ``Params`` model whose
defaults are the method's official defaults. Unknown parameters are an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from benchbase.errors import ConfigError, validation_problems
from benchbase.records import FigureSpec

if TYPE_CHECKING:  # torch is imported only by code that runs components
    import torch

    from benchbase.models.sd import SDModels
    from benchbase.plugins import PluginManager
    from benchbase.roles import ModelEntry


class Params(BaseModel):
    """Parameters of a component; subclass and add fields with the official defaults.

    Every float must be finite (NaN and ±inf are rejected for all components here). Give each
    numeric field its bounds explicitly, e.g. ``Field(8.0, ge=0)`` for a budget, ``Field(1e-4,
    gt=0)`` for a learning rate, ``Field(100, ge=1)`` for a step count; a subclass that
    redefines a field must repeat them (pydantic replaces the whole field).
    ``tests/test_values.py`` checks every registered component for this.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int or float field: a typo in a suite, never a count
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            kinds = _number_kinds(cls.model_fields[info.field_name].annotation)
            if kinds and bool not in kinds:
                raise ValueError("must be a number, not true/false")
        return value


def _number_kinds(annotation: Any) -> set:
    """The scalar types an annotation accepts among bool, int, float (through unions/Annotated)."""
    if annotation in (bool, int, float):
        return {annotation}
    if get_origin(annotation) in (list, dict, tuple, set):
        return set()
    out: set = set()
    for arg in get_args(annotation):
        out |= _number_kinds(arg)
    return out


class Component:
    """Common behaviour: name, version, validated parameters."""

    name: str = ""
    version: str = "0"
    Params: ClassVar[type[Params]] = Params
    #: plots the report draws from what this component records (see ``FigureSpec``); the run
    #: writes them into run.json, so the report needs neither the plugin nor its name
    report_figures: ClassVar[tuple[FigureSpec, ...]] = ()
    #: parameters that name an auxiliary model, and its role (``{"detector": "face-detector"}``):
    #: the plugin manager checks such names when it builds the component (``benchbase.roles``)
    model_roles: ClassVar[dict[str, str]] = {}

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            # one line per problem; the runner prefixes each with the suite file and entry
            raise ConfigError("\n".join(validation_problems(exc, list(self.Params.model_fields)))) from None

    def config(self) -> dict:
        """Parameters as plain JSON values (part of cache keys and provenance)."""
        return self.params.model_dump(mode="json")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, {self.config()})"


# ---------------------------------------------------------------------------------------
# Data handed to components
# ---------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """The prompts of the DreamBooth protocol for one identity."""

    instance: str = "a photo of sks person"
    class_: str = "a photo of person"
    eval: list[str] = field(default_factory=lambda: ["a photo of sks person", "a dslr portrait of sks person"])
    negative: str = ""
    identifier: str = "sks"
    class_noun: str = "person"


@dataclass
class IdentityData:
    """One identity in the Anti-DreamBooth layout, preprocessed to the run resolution.

    ``set_A``: clean images the protector may use; ``set_B``: the images that get
    protected and fine-tuned on; ``set_C``: clean references for metrics. Each is an
    (N, 3, H, W) float tensor in [0, 1] on the 8-bit grid (so budgets are checked against
    exactly what a PNG holds).
    """

    name: str
    set_A: "torch.Tensor"
    set_B: "torch.Tensor"
    set_C: "torch.Tensor"
    files: dict[str, list[str]] = field(default_factory=dict)


class SharedStages:
    """Access to cached stages shared across cells (class images, FSMG surrogates...).

    ``get_or_compute(stage, key, compute)`` returns the folder of the stage whose key
    hashes ``key``; ``compute(folder)`` fills it the first time only (atomically).
    """

    def __init__(self, fn: Callable[[str, dict, Callable[[Path], None]], Path]):
        self._fn = fn

    def get_or_compute(self, stage: str, key: dict, compute: Callable[[Path], None]) -> Path:
        return self._fn(stage, key, compute)


@dataclass
class Threat:
    """What an adaptive attack will face (filled by the core when ``adaptive = true``)."""

    purifiers: list["Purifier"] = field(default_factory=list)
    defense: "Defense | None" = None
    training_prompts: Prompts | None = None

    def purify_differentiable(self, images: "torch.Tensor", ctx: "Context") -> "torch.Tensor":
        for purifier in self.purifiers:
            images = purifier.differentiable_view(images, ctx)
        return images


def _no_progress(iterable: Iterable, **_: Any) -> Iterable:
    return iterable


@dataclass
class Context:
    """Everything a component may use besides its input images.

    ``seed``: the cell's seed (a label of the replicate; draw nothing from it directly);
    ``stream``: the stage's seed (``benchbase.seeds.stage_seed``), ``generator`` the generator
    seeded with it; ``rng(*labels)`` / ``seed_of(*labels)``: independent named sub-streams."""

    device: "torch.device"
    dtype: "torch.dtype"
    seed: int
    generator: "torch.Generator"
    backend: "Backend | None" = None
    identity: IdentityData | None = None
    prompts: Prompts = field(default_factory=Prompts)
    shared: SharedStages | None = None
    threat: Threat | None = None
    workdir: Path | None = None
    progress: Callable[..., Iterable] = _no_progress
    info: dict = field(default_factory=dict)  # JSON-able facts a stage records (shown in reports)
    plugins: "PluginManager | None" = None  # the run's registry (None: the process-wide one)
    stream: int | None = None  # the stage's stream (None: ``seed``, for contexts made by hand)

    def __post_init__(self):
        if self.stream is None:
            self.stream = int(self.seed)

    def seed_of(self, *labels: Any) -> int:
        """The seed of the sub-stream ``labels`` of this stage's stream: a draw that must not depend
        on how many draws ``generator`` gave before it (image j of an eval prompt, one per image
        so the batch size changes nothing)."""
        from benchbase.seeds import derive_seed

        return derive_seed(self.stream, *labels)

    def rng(self, *labels: Any) -> "torch.Generator":
        """A fresh CPU generator on the sub-stream ``labels`` (see ``seed_of``)."""
        from benchbase.seeds import generator

        return generator(self.seed_of(*labels))

    def models(self) -> "SDModels":
        """A fresh copy of the backend's models (each call loads new module instances)."""
        if self.backend is None:
            raise ConfigError("this stage needs a backend, but the suite defines none")
        return self.backend.load(self.device, self.dtype)

    def find_model(self, role: str, name: str = "auto") -> "ModelEntry":
        """The auxiliary model registered for ``role`` under ``name`` (``benchbase.roles``);
        ``"auto"``: the backend's default for the role, else the role's default. Loads nothing."""
        from benchbase.plugins import find_model

        return find_model(role, name, self)

    def create(self, family: str, name: str, params: dict | None = None) -> Any:
        """A component of ``family`` (e.g. ``"backends"``) by registered name, with validated
        parameters, from the same plugin registry as the run (a Runner given its own
        ``PluginManager`` resolves names there, not in the process-wide one). E-ASPL builds its
        extra surrogate backends this way."""
        from benchbase.plugins import get_plugin_manager

        return (self.plugins or get_plugin_manager()).create(family, name, params or {})

    def with_(self, **changes: Any) -> "Context":
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------


class Attack(Component):
    """A protective perturbation. ``protect`` maps clean set_B images to protected ones.

    The returned images may be float; the core quantises them to 8 bits (round half up,
    then clips the integer difference to ±floor(eps) against the clean PNG, or truncates
    when ``quantization = "truncate"``), so the saved PNG always satisfies the budget.
    Subclass ``Attack.Params`` keeping ``eps`` (levels) with the method's native default.
    """

    class Params(Params):
        eps: float = Field(8.0, ge=0)
        quantization: Literal["round", "truncate"] = "round"

    #: set True by attacks that use ``ctx.threat`` when the suite marks them adaptive
    supports_adaptive: ClassVar[bool] = False

    @property
    def eps(self) -> float:
        return float(self.params.eps)

    def protect(self, images: "torch.Tensor", ctx: Context) -> "torch.Tensor":
        raise NotImplementedError


class Purifier(Component):
    """Maps (possibly protected) images to the images the victim fine-tunes on.

    It sees only the images and ``ctx`` (prompts, backend), never the clean originals
    (``oracle`` is the documented exception and reads ``ctx.identity``).
    """

    #: True when ``purify`` itself is differentiable w.r.t. its input
    differentiable: ClassVar[bool] = False

    def purify(self, images: "torch.Tensor", ctx: Context) -> "torch.Tensor":
        raise NotImplementedError

    def release(self) -> None:
        """Drop models kept between batches. The runner calls it after each purify stage, so a
        purifier's GPU memory is free again for fine-tuning. Default: nothing is kept."""

    def differentiable_view(self, images: "torch.Tensor", ctx: Context) -> "torch.Tensor":
        """Output with a gradient for adaptive attacks: the real one, else straight-through (BPDA)."""
        if self.differentiable:
            return self.purify(images, ctx)
        purified = self.purify(images.detach(), ctx)
        return images + (purified - images).detach()


class Defense(Component):
    """A training-time counter-measure applied by the personalizer.

    It may change the training prompts, the generation prompts and negative prompt,
    transform each training batch, and add a loss term. The defaults change nothing.
    """

    def training_prompts(self, prompts: Prompts) -> Prompts:
        return prompts

    def generation_prompt(self, prompt: str) -> str:
        return prompt

    def negative_prompt(self, negative: str) -> str:
        return negative

    def transform_batch(self, batch: dict, ctx: Context) -> dict:
        return batch

    def extra_loss(self, batch: dict, outputs: dict, ctx: Context) -> "torch.Tensor | None":
        return None


class Personalizer(Component):
    """The fine-tuning method under attack (DreamBooth, LoRA...).

    ``train`` writes whatever it needs into ``out_dir``; ``generate`` reads it back and
    returns ``{eval prompt: (N, 3, H, W) images}`` keyed by the *undefended* prompt so
    that results are comparable across defenses. Parameters named in
    ``generation_fields`` only affect generation, so changing them does not retrain.
    """

    generation_fields: ClassVar[frozenset[str]] = frozenset()

    def train(self, images: "torch.Tensor", ctx: Context, defense: Defense, out_dir: Path) -> None:
        raise NotImplementedError

    def generate(self, model_dir: Path, ctx: Context, defense: Defense) -> dict[str, "torch.Tensor"]:
        raise NotImplementedError

    def train_config(self) -> dict:
        return {k: v for k, v in self.config().items() if k not in self.generation_fields}


@dataclass
class MetricInputs:
    """The images a metric may read; which ones are filled follows ``Metric.reads``."""

    clean: "torch.Tensor | None" = None  # set_B before protection
    protected: "torch.Tensor | None" = None
    purified: "torch.Tensor | None" = None
    generated: dict[str, "torch.Tensor"] | None = None
    references: "torch.Tensor | None" = None  # set_C
    set_A: "torch.Tensor | None" = None


METRIC_INPUTS = ("clean", "protected", "purified", "generated", "references", "set_A")


@dataclass
class MetricValue:
    """A score for one identity and cell. ``value`` is what leaderboards average."""

    value: float
    per_prompt: dict[str, float] = field(default_factory=dict)
    count: int | None = None
    details: dict = field(default_factory=dict)


class Metric(Component):
    """A score. ``direction`` says which way favours the *protector*.

    ``reads`` names the inputs it needs (clean, protected, purified, generated,
    references, set_A); the core fills only those. When weights or a package are missing, raise
    ``benchbase.Unavailable("unavailable: <model> — how to provide it")`` (any component may: an
    attack, purifier, defense or personalizer too): the run records the cells that need it as
    unavailable instead of failed, and leaderboards show it as such.
    """

    direction: ClassVar[Literal["higher", "lower"]] = "higher"
    reads: ClassVar[tuple[str, ...]] = ("generated",)
    #: inputs read whatever the ``of`` parameter says (e.g. ``clean`` for full-reference metrics)
    always_reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        super().__init__(**params)
        of = getattr(self.params, "of", None)
        if of in METRIC_INPUTS:
            # a metric that scores one chosen image set depends only on that set (plus what it
            # always reads): a BRISQUE of the protected images must not wait for fine-tuning
            self.reads = tuple(dict.fromkeys((of, *self.always_reads)))

    def score(self, inputs: MetricInputs, ctx: Context) -> MetricValue:
        raise NotImplementedError


class Backend(Component):
    """Loads the diffusion model every stage uses (surrogate and victim)."""

    #: role -> name of the registered model made for this backend's world (its face detector,
    #: CLIP, x4 upscaler...): what a metric or purifier asking for ``"auto"`` gets. Roles not
    #: listed fall back to the role's default (MTCNN, dlib, OpenAI CLIP...); see benchbase.roles
    default_models: ClassVar[dict[str, str]] = {}
    #: True for a model with random weights (a machinery check): reports and leaderboards say
    #: that its numbers test the machinery, not protection
    random_weights: ClassVar[bool] = False

    def fingerprint(self) -> str:
        """A stable id of the weights (part of every cache key)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the model, for leaderboards and provenance."""
        return self.fingerprint()

    @property
    def resolution(self) -> int:
        """Image side every stage works at (the model's training resolution)."""
        return int(getattr(self.params, "resolution", 512))

    def load(self, device: "torch.device", dtype: "torch.dtype") -> "SDModels":
        raise NotImplementedError


class Dataset(Component):
    """Identities with set_A / set_B / set_C images and their prompts."""

    def identities(self) -> list[str]:
        raise NotImplementedError

    def load(self, identity: str, resolution: int) -> IdentityData:
        raise NotImplementedError

    def fingerprint(self, identity: str) -> str:
        """A hash of the identity's image bytes (part of cache keys)."""
        raise NotImplementedError

    def prompts(self) -> Prompts:
        return Prompts()


class Executor(Component):
    """Runs a suite's stage graph: ``local`` (in-process, the default) or on an engine such as Ray.

    ``execute(session)`` computes the stages of ``session.plan()`` and hands each outcome back
    (``session.stage_done``); the session (``benchbase.pipeline.Runner``) owns everything else:
    the plan, the records, run.json, results.jsonl, resuming. The whole interface an executor
    uses::

        plan = session.plan()                          # stages not in the store, dependency order
        out = session.run_stage(node.address, ups)     # compute one here (ups: the deps' outcomes)
        session.stage_done(out)                        # records of the cells it completes
        session.progress(running=n)                    # what is in flight
        session.worker_job(device)                     # JSON-able: open_session(job) in a worker
        session.plugin_modules(), session.device_request, session.executor_info(**facts),
        session.use_device_label(label)

    A third engine (Dask, SLURM arrays) is another plugin with this method; no core change.
    """

    #: False when stages run in other processes (the driver plans and records only, and the
    #: suite's device need not exist where it runs)
    in_process: ClassVar[bool] = True

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this executor cannot run here (e.g. its engine is not installed), or None."""
        return None

    def execute(self, session: Any) -> None:
        raise NotImplementedError


from benchbase.families import TABLE as _FAMILY_TABLE  # noqa: E402

#: family name -> base class, from the one family table (benchbase.families)
FAMILY_BASES = {f.name: globals()[f.base] for f in _FAMILY_TABLE}
