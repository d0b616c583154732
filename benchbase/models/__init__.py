"""Model loading: the diffusers Stable Diffusion loader (``sd``) and the building blocks of offline
models (``offline``: cache folder, build-once folders, the real CLIP tokenizer)."""
