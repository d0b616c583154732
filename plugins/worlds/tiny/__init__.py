"""The tiny world: random-weight stand-ins built offline, for tests and machinery checks.

``models`` builds the Stable-Diffusion-shaped pipeline of the ``tiny`` backend (``backend``);
``standins`` the stand-ins registered under the name ``tiny`` for the roles the purifiers and
metrics ask for (CLIP, x4 upscaler, pixel diffusion model, LPIPS), each with seeded random
weights. Their numbers test code paths, not science.
"""

from benchbase.hookspecs import hookimpl

_W = "benchbase_plugins.worlds.tiny"


@hookimpl
def register_backends(register):
    register("tiny", f"{_W}.backend:TinyBackend", version="1",
             description="random-weight SD-shaped model built offline from configs (tests, smoke suite)")


@hookimpl
def register_models(register):
    register("clip", "tiny", f"{_W}.standins:TinyClip", description="RANDOM-weight open_clip CLIP (tests)")
    register("x4-upscaler", "tiny", f"{_W}.standins:upscaler_folder",
             description="RANDOM-weight StableDiffusionUpscalePipeline (tests)")
    register("pixel-diffusion", "tiny", f"{_W}.standins:pixel_model_folder",
             description="RANDOM-weight unconditional DDPM (tests)")
    register("pixel-diffusion", "tiny-adm", f"{_W}.standins:adm_model_folder",
             description="RANDOM-weight guided-diffusion ADM architecture with learned variance (tests)")
    register("lpips", "tiny", f"{_W}.standins:load_lpips", description="RANDOM-weight LPIPS-shaped distance (tests)")
