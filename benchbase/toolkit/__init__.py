"""The public toolkit for writing components: what the bundled plugins use, for yours too.

- :mod:`~benchbase.toolkit.pgd` — projected sign-gradient ascent/descent in the benchmark's
  image convention: ``pgd``, ``project``, ``random_start``, ``sign_step``, ``eot_grad``;
- :mod:`~benchbase.toolkit.threat` — ``threat_view(ctx)``: the purifier chain and training
  prompts an adaptive attack optimises through;
- :mod:`~benchbase.toolkit.diffusion` — the one noising path: ``denoise`` (noise + UNet
  prediction + target) and ``diffusion_loss``;
- :mod:`~benchbase.toolkit.lora` — LoRA adapters through peft (``add_lora``, ``lora_parameters``,
  ``save_lora``, ``merge_lora``);
- :mod:`~benchbase.toolkit.dreambooth` — the DreamBooth step loop with prior preservation
  (``dreambooth_steps``, ``ClassPrior``), the shared ``class_images`` stage, ``generate_images``,
  ``adamw``;
- :mod:`~benchbase.toolkit.trace` — the diagnostics a stage records: an attack's objective
  trajectory (``ObjectiveTrace``), a victim's loss on its instance images (``TrainingTrace``).

Importing this package imports torch; ``import benchbase`` does not. See docs/toolkit.md.
"""

from benchbase.toolkit.diffusion import Denoised, denoise, diffusion_loss
from benchbase.toolkit.dreambooth import (
    ClassPrior,
    PosteriorCache,
    adamw,
    class_images,
    dreambooth_steps,
    fused_kwargs,
    generate_images,
)
from benchbase.toolkit.lora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_lora,
    split_lora_state,
)
from benchbase.toolkit.pgd import eot_grad, pgd, project, random_start, sign_step
from benchbase.toolkit.threat import ThreatView, threat_view
from benchbase.toolkit.trace import ObjectiveTrace, TrainingTrace

__all__ = [
    "TEXT_ENCODER_TARGETS",
    "UNET_TARGETS",
    "ClassPrior",
    "Denoised",
    "ObjectiveTrace",
    "PosteriorCache",
    "ThreatView",
    "TrainingTrace",
    "adamw",
    "add_lora",
    "class_images",
    "denoise",
    "diffusion_loss",
    "dreambooth_steps",
    "eot_grad",
    "fused_kwargs",
    "generate_images",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "pgd",
    "project",
    "random_start",
    "save_lora",
    "sign_step",
    "split_lora_state",
    "threat_view",
]
