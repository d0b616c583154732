"""Backends: real Stable Diffusion from a local folder or hub id, and the offline tiny model."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    register("sd", "benchbase_plugins.backends.stable_diffusion:StableDiffusionBackend", version="1",
             description="Stable Diffusion 1.x/2.x from a local diffusers folder or a hub id")
    register("tiny", "benchbase_plugins.worlds.tiny.backend:TinyBackend", version="1",
             description="random-weight SD-shaped model built offline from configs (tests, smoke suite)")
    register("mini", "benchbase_plugins.worlds.mini.backend:MiniBackend", version="1",
             description="benchbase-mini: trained 64-px miniature SD world shipped with benchbase (CPU, minutes)")
