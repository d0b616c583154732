"""``python -m benchbase``: the ``benchbase`` command, plugin commands included."""

from benchbase.cli import main

main(prog_name="benchbase")
