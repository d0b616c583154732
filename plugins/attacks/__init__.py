"""Protective perturbations (attacks on fine-tuning). One module per method."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_attacks(register):
    register("none", "benchbase_plugins.attacks.baseline:NoAttack", version="1",
             description="no protection: set_B as is")
    register("noise", "benchbase_plugins.attacks.baseline:UniformNoise", version="1",
             description="uniform random noise in [-eps, eps] (the baseline every attack must beat)")
    register("precomputed", "benchbase_plugins.attacks.precomputed:Precomputed", version="1",
             description="protected set_B read from <root>/<identity>/set_B/*.png (external tools), checked and measured")
    register("advdm", "benchbase_plugins.attacks.advdm:AdvDM", version="1",
             description="AdvDM(+/-): PGD on the frozen model's denoising loss (Liang et al. ICML'23), eps 16")
    register("mist", "benchbase_plugins.attacks.mist:Mist", version="1",
             description="Mist semantic/textural/fused (rate 1e4) on the frozen model, bundled target texture, eps 16")
    register("photoguard", "benchbase_plugins.attacks.photoguard:PhotoGuard", version="2",
             description="PhotoGuard encoder attack (mean latent to zero, decaying step, eps 7.65); mode 'diffusion': the notebook's L-inf call (5 EOT reps); each image its own norm, as the one-image notebooks")
    register("sds", "benchbase_plugins.attacks.sds:SDS", version="1",
             description="SDS(+/-) and SDST: score-distillation protection, UNet without grad (Xue et al. ICLR'24), eps 16")
    register("aspl", "benchbase_plugins.attacks.aspl:ASPL", version="1",
             description="Anti-DreamBooth ASPL: alternating DreamBooth surrogate training + PGD, released pure-bf16 surrogate (precision='fp32': a fine-tuning one; target_image: T-ASPL, ensemble: E-ASPL)")
    register("fsmg", "benchbase_plugins.attacks.fsmg:FSMG", version="1",
             description="Anti-DreamBooth FSMG: 100 PGD steps against a DreamBooth surrogate trained once on clean set_A (shared stage)")
    register("simac", "benchbase_plugins.attacks.simac:SimAC", version="1",
             description="SimAC: ASPL + greedy adaptive timestep selection, released pure-bf16 surrogate (feature_loss='gradient' for the paper objective)")
    register("metacloak", "benchbase_plugins.attacks.metacloak:MetaCloak", version="2",
             description="MetaCloak as released: model pool + meta loop + EOT (blur k7 + flip), 11 levels, bf16 training / fp16 PGD, set_B reshuffled per call, unscaled instance images (paper_quirks)")
    register("caat", "benchbase_plugins.attacks.caat:CAAT", version="2",
             description="CAAT: joint image ascent and cross-attention K/V training (lr 1e-5, 250 steps), the start token's K/V detached as Custom Diffusion's processor does")
