"""The ``none`` defense: the Defense base class already changes nothing."""

from benchbase.components import Defense


class NoDefense(Defense):
    """Plain fine-tuning (unlike DiffShortcut's released code, no inference suffix is appended)."""
