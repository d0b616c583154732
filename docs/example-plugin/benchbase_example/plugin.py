"""Hook implementations: register components lazily, by "module:Class" string."""

from benchbase import hookimpl


@hookimpl
def register_attacks(register):
    register("checkerboard", "benchbase_example.components:Checkerboard", version="1",
             description="a fixed ±eps checkerboard pattern (a toy protection)")
    register("denoise-pgd", "benchbase_example.components:DenoisePGD", version="1",
             description="PGD on the frozen model's denoising loss (toolkit example), eps 8")


@hookimpl
def register_purifiers(register):
    register("median", "benchbase_example.components:Median", version="1",
             description="median filter of odd size (default 3x3)")
