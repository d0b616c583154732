"""Protective perturbations (attacks on fine-tuning). One module per method."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_attacks(register):
    register("none", "benchbase_plugins.attacks.baseline:NoAttack", version="1",
             description="no protection: set_B as is")
    register("noise", "benchbase_plugins.attacks.baseline:UniformNoise", version="1",
             description="uniform random noise in [-eps, eps] (the baseline every attack must beat)")
