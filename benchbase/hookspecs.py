"""Hook specifications of benchbase.

Every family of components is contributed through one hook that receives a
``register(name, target, **meta)`` callback (the style of Simon Willison's ``llm``).
``target`` is either the component class or a lazy ``"module:Class"`` string; lazy
strings let ``benchbase plugins`` list everything without importing torch.
Useful ``meta`` keys: ``version`` (part of every cache key: bump it when the
algorithm's output changes) and ``description`` (one line shown by ``benchbase ls``).

Two more hooks are not component families: ``register_models`` (auxiliary models by role,
``register(role, name, target, **meta)``; see ``benchbase.roles``) and ``register_commands``
(extra ``benchbase`` subcommands, e.g. a world's training command).
"""

import pluggy

hookspec = pluggy.HookspecMarker("benchbase")
hookimpl = pluggy.HookimplMarker("benchbase")


@hookspec
def register_attacks(register):
    """Protective perturbations (Attack subclasses): clean images -> protected images."""


@hookspec
def register_purifiers(register):
    """Image transforms applied to protected images before fine-tuning (Purifier subclasses)."""


@hookspec
def register_defenses(register):
    """Training-time counter-measures that change prompts, losses or batches (Defense subclasses)."""


@hookspec
def register_personalizers(register):
    """Fine-tuning methods that are attacked, e.g. DreamBooth (Personalizer subclasses)."""


@hookspec
def register_metrics(register):
    """Scores of protected, purified and generated images (Metric subclasses)."""


@hookspec
def register_backends(register):
    """Model loaders: Stable Diffusion folders, offline tiny models (Backend subclasses)."""


@hookspec
def register_datasets(register):
    """Identity image sets with prompts, in the Anti-DreamBooth set_A/B/C layout (Dataset subclasses)."""


@hookspec
def register_executors(register):
    """Where a suite's stage graph runs: in-process (``local``) or on a cluster (``ray``) (Executor subclasses)."""


@hookspec
def register_models(register):
    """Auxiliary models by role, ``register(role, name, target, **meta)``: a face detector, a CLIP,
    an x4 upscaler... (``benchbase.roles`` lists the roles and what a target must be). Metrics and
    purifiers ask for a role and a name (``"auto"``: the backend's default), never for a world."""


@hookspec
def register_commands(cli):
    """Add subcommands to the ``benchbase`` command: ``cli`` is its click group
    (``@cli.command()``), as in Simon Willison's ``llm``. Import heavy modules inside the command."""
