"""``python -m benchbase``: the ``benchbase`` command."""

from benchbase.cli import main

if __name__ == "__main__":
    main(prog_name="benchbase")
