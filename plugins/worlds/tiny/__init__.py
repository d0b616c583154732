"""The tiny world: random-weight stand-ins built offline, for tests and machinery checks.

``models`` builds the Stable-Diffusion-shaped pipeline of the ``tiny`` backend (``backend``);
``standins`` the purifiers' models (x4 upscaler, pixel diffusion model, LPIPS) and ``clip`` an
open_clip CLIP, each with seeded random weights. Their numbers test code paths, not science.
"""
