"""Personalizers: the fine-tuning methods that protections attack."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_personalizers(register):
    register("dreambooth", "benchbase_plugins.personalizers.dreambooth:DreamBooth", version="1",
             description="DreamBooth full fine-tuning with prior preservation (DiffShortcut/MetaCloak victim recipe)")
    # version 2: peft adapters (same init and scale; float rounding differs), diffusers' file layout
    register("lora", "benchbase_plugins.personalizers.lora:DreamBoothLoRA", version="2",
             description="DreamBooth-LoRA: rank-4 adapters on the UNet attention (diffusers recipe), prior preservation")
