"""Check benchbase's guided-diffusion → diffusers conversion against guided-diffusion's own code.

    python benchmarks/guided_diffusion_check.py /path/to/folder/containing/guided_diffusion

The folder is a checkout of openai/guided-diffusion (or any copy of its ``guided_diffusion``
package, e.g. the one vendored in ZhengyueZhao/GrIDPure). It builds a small random ADM UNet with
the ImageNet model's options (``resblock_updown``, scale-shift norm, legacy multi-head
attention at 3 levels, learned sigma), converts it, and compares (1) the UNet outputs and
(2) one ancestral step of guided-diffusion's ``p_sample`` (1000 steps and 250-respaced) with
diffusers' ``DDPMScheduler`` in learned-range mode. Result when written (float32): outputs agree
to 7e-8, sampler steps to 7e-5 (the schedule is float64 there, float32 here).
"""

from __future__ import annotations

import sys

import torch


def main(path: str) -> None:
    sys.path.insert(0, path)
    from diffusers import UNet2DModel
    from guided_diffusion.script_util import create_gaussian_diffusion, create_model

    from benchbase_plugins.purifiers import _guided_diffusion as gd

    torch.manual_seed(0)
    cfg = dict(model_channels=32, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_ds=(8, 16, 32),
               num_head_channels=16, learn_sigma=True, image_size=64)
    ref = create_model(image_size=64, num_channels=32, num_res_blocks=2, channel_mult="1,1,2,2,4,4", learn_sigma=True,
                       class_cond=False, use_checkpoint=False, attention_resolutions="8,4,2", num_heads=4,
                       num_head_channels=16, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
                       resblock_updown=True, use_fp16=False, use_new_attention_order=False)
    with torch.no_grad():  # guided-diffusion zero-initialises its output convs: randomise everything
        for p in ref.parameters():
            p.normal_(0, 0.05)
    unet = UNet2DModel(**gd.unet_config(**cfg))
    unet.load_state_dict(gd.convert_state_dict(ref.eval().state_dict(), **cfg), strict=True)
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([40, 399])
    with torch.no_grad():
        diff = float((ref(x, t) - unet.eval()(x, t).sample).abs().max())
    print(f"UNet outputs: max |difference| {diff:.2e}")
    for respacing, indices in (("1000", [9, 3, 0]), ("250", [10, 1])):
        diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear", use_kl=False,
                                              predict_xstart=False, rescale_timesteps=False,
                                              rescale_learned_sigmas=False, timestep_respacing=respacing)
        kept = gd.respaced_timesteps(1000, int(respacing))
        for idx in indices:
            x, out = torch.randn(1, 3, 8, 8), torch.randn(1, 6, 8, 8) * 0.5
            pm = diffusion.p_mean_variance(lambda *a, **k: out, x, torch.tensor([idx]), clip_denoised=True)
            sched = gd.scheduler(clip_sample=True)
            sched.set_timesteps(timesteps=[kept[i] for i in range(idx, -1, -1)])
            prev = sched.step(out, kept[idx], x, generator=torch.Generator().manual_seed(1)).prev_sample
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            expect = pm["mean"] + (torch.exp(0.5 * pm["log_variance"]) * noise if idx > 0 else 0)
            print(f"p_sample, respacing {respacing}, index {idx} (timestep {kept[idx]}): "
                  f"max |difference| {float((prev - expect).abs().max()):.2e}")


if __name__ == "__main__":
    main(sys.argv[1])
