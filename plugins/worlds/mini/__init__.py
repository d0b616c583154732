"""benchbase-mini: a trained miniature Stable-Diffusion world (docs/mini.md), one plugin.

``portraits`` (procedural identities; protocol and selection identities), ``models``
(architectures, shipped weights per version, diffusers folders built from them), ``organs``
(world v3's face restorer, pixel diffusion model, degradations and noise overlays), ``train``
and ``train_v3`` (``benchbase train-mini [--version v3]``), ``checks`` (``benchbase
mini-checks``: v3's clean checks), ``backend`` and ``dataset`` (the ``mini`` backend, with its
``version``, and dataset), ``roles`` (its models in the shape each role asks for: ``mini`` for
v2, ``mini-v3`` for v3); ``weights/`` holds v2's shipped weights and model card, ``weights/v3/``
v3's once trained.
Everything is registered below; nothing outside this package names the world.
"""

from benchbase.hookspecs import hookimpl

_W = "benchbase_plugins.worlds.mini"


@hookimpl
def register_backends(register):
    register("mini", f"{_W}.backend:MiniBackend", version="1",
             description="benchbase-mini: trained 64-px miniature SD world shipped with benchbase (CPU, minutes)")


@hookimpl
def register_datasets(register):
    register("mini", f"{_W}.dataset:MiniDataset", version="1",
             description="held-out procedural identities of the benchbase-mini world (pairs with the mini backend)")


@hookimpl
def register_models(register):
    register("face-detector", "mini", f"{_W}.roles:MiniDetector",
             description="the mini world's portrait detector (its RetinaFace), 64 px")
    register("face-embedder", "mini", f"{_W}.roles:MiniEmbedder",
             description="the mini world's identity embedder (its ArcFace), 128-d")
    register("clip", "mini", f"{_W}.roles:MiniClip",
             description="the mini world's open_clip CLIP, trained on its portraits and captions")
    register("x4-upscaler", "mini", f"{_W}.roles:upscaler_folder",
             description="the mini world's x4 upscaler (16 px -> 64 px)")
    # world v3 (backend `mini` with version = "v3"): its own detector and CLIP, v2's embedder and
    # upscaler, and the organs v2 lacks
    register("face-detector", "mini-v3", f"{_W}.roles:MiniDetectorV3",
             description="mini world v3's detector (trained with CodeFormer's degradations), 64 px")
    register("face-embedder", "mini-v3", f"{_W}.roles:MiniEmbedderV3",
             description="mini world v3's identity embedder (v2's), 128-d")
    register("clip", "mini-v3", f"{_W}.roles:MiniClipV3",
             description="mini world v3's CLIP (knows the class prompt and noisy photos)")
    register("x4-upscaler", "mini-v3", f"{_W}.roles:upscaler_folder_v3",
             description="mini world v3's x4 upscaler (v2's, with its own text encoder)")
    register("face-restorer", "mini-v3", f"{_W}.roles:MiniRestorer",
             description="mini world v3's CodeFormer (64 px, fidelity w)")
    register("pixel-diffusion", "mini-v3", f"{_W}.roles:pixel_model_folder_v3",
             description="mini world v3's unconditional pixel DDPM (64 px)")


@hookimpl
def register_commands(cli):
    import click

    @cli.command("train-mini", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                                  "help_option_names": []})
    @click.pass_context
    def train_mini(ctx):
        """Retrain the mini world's models (about an hour on 2 CPU cores; train-mini --help)."""
        from .train import main

        raise SystemExit(main(list(ctx.args)))

    @cli.command("mini-checks", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                                   "help_option_names": []})
    @click.pass_context
    def mini_checks(ctx):
        """World v3's clean checks from a mini-v3-select run (mini-checks --help)."""
        from .checks import main

        raise SystemExit(main(list(ctx.args)))
