"""``python -m benchbase``: the ``benchbase`` command, plugin commands included."""

from benchbase.cli import main

if __name__ == "__main__":
    main(prog_name="benchbase")
