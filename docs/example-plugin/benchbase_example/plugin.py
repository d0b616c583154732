"""Hook implementations: register components lazily, by "module:Class" string."""

from benchbase import hookimpl


@hookimpl
def register_attacks(register):
    register("checkerboard", "benchbase_example.components:Checkerboard", version="1",
             description="a fixed ±eps checkerboard pattern (a toy protection)")


@hookimpl
def register_purifiers(register):
    register("median", "benchbase_example.components:Median", version="1",
             description="3x3 median filter")
