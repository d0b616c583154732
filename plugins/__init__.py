"""Bundled benchbase plugins (installed under the import name ``benchbase_plugins``).

One package per method family; each package's ``__init__`` registers its components
lazily (``"module:Class"`` strings) so listing plugins never imports torch.
"""
