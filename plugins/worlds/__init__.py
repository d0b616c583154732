"""Worlds: a backend with the dataset, auxiliary models and training command made for it.

Each world is one package here, as a third-party world would be one plugin distribution:
``mini`` (the trained benchbase-mini world) and ``tiny`` (random-weight stand-ins for tests).
"""
