"""Backends: real Stable Diffusion from a local folder or hub id (worlds register their own)."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    register("sd", "benchbase_plugins.backends.stable_diffusion:StableDiffusionBackend", version="1",
             description="Stable Diffusion 1.x/2.x from a local diffusers folder or a hub id")
