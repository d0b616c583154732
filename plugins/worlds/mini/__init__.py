"""benchbase-mini: a trained miniature Stable-Diffusion world (docs/mini.md).

``portraits`` (procedural identities), ``models`` (architectures, shipped weights, diffusers
folders built from them), ``train`` (``benchbase train-mini``), ``backend`` and ``dataset``
(the ``mini`` backend and dataset); ``weights/`` holds the shipped weights and model card.
"""
