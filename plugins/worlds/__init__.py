"""Worlds: a backend with the dataset, auxiliary models and training command made for it.

Each world is one package here (``mini``: the trained benchbase-mini world), as a third-party
world would be one plugin distribution.
"""
