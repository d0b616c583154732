"""Model loading: the diffusers Stable Diffusion loader and the offline tiny builder."""
