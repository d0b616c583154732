"""Purifiers: transforms applied to protected images before the victim fine-tunes."""

from benchbase.hookspecs import hookimpl

_M = "benchbase_plugins.purifiers"


@hookimpl
def register_purifiers(register):
    register("none", f"{_M}.classic:NoPurifier", version="1",
             description="identity: the victim trains on the protected images (lower bound)")
    register("oracle", f"{_M}.classic:Oracle", version="1",
             description="the clean set_B originals (upper bound)")
    register("jpeg", f"{_M}.classic:JPEG", version="1",
             description="JPEG re-compression (quality 75, the Anti-DreamBooth scripts' setting)")
    register("blur", f"{_M}.classic:GaussianBlur", version="1",
             description="PIL Gaussian blur, radius 5 at 512 px (DiffShortcut gau)")
    register("resize", f"{_M}.classic:Resize", version="1",
             description="bicubic 512 -> 128 -> 512 (suite-defined)")
    register("diffpure", f"{_M}.diffusion:LatentDiffPure", version="2",
             description="latent DiffPure on SD-1.4 as DiffShortcut ldiffp (model = \"backend\": the backend's SD): t = 300, DDPM, CFG 7.5 quality prompt")
    register("pixel-diffpure", f"{_M}.diffusion:PixelDiffPure", version="2",
             description="pixel DiffPure, guided-diffusion ImageNet 256 uncond model, t* = 0.1 (GrIDPure diffpure.py)")
    register("gridpure", f"{_M}.diffusion:GrIDPure", version="2",
             description="GrIDPure: ImageNet 256 uncond model, 256 windows stride 128 + corner mosaic, t = 10, "
                         "gamma 0.1, 20 iterations")
    register("gridpure-ds", f"{_M}.diffusion:GrIDPureDS", version="1",
             description="GrIDPure as DiffShortcut re-implemented it: 250-step respacing, t = 40/1000, "
                         "no mosaic, 10 iterations, [0,1] input")
    register("pixel-diffpure-ds", f"{_M}.diffusion:PixelDiffPureDS", version="1",
             description="DiffShortcut's pixel DiffPure (pdiffp): its grid at t = 401/1000, one pass")
    register("sr", f"{_M}.upscale:SuperResolution", version="1",
             description="128 px then the SD x4 upscaler, 75 steps, CFG 9, noise_level 20 (DiffShortcut sr)")
    register("noisy-upscale", f"{_M}.upscale:NoisyUpscale", version="2",
             description="Gaussian noise sigma 0.1 then the SD x4 upscaler at noise level 320 (Noisy Upscaling)")
    register("impress", f"{_M}.impress:IMPRESS", version="2",
             description="IMPRESS VAE-consistency purification as released: one image at a time, float16, "
                         "3000 Adam steps, LPIPS bound 0.1")
    register("realign", f"{_M}.realign:Realign", version="2",
             description="DiffShortcut code-sr as released: CodeFormer w 0.5 on every image, 128 px, x4 upscaler "
                         "(CLIP-guided strength as an option)")


@hookimpl
def register_models(register):
    """The real models the purifiers load, by role (benchbase.roles); worlds add their own."""
    register("x4-upscaler", "stabilityai/stable-diffusion-x4-upscaler", f"{_M}._common:as_given", default=True,
             any_name=True, description="any local StableDiffusionUpscalePipeline folder or hub id "
                                        "(default: the SD x4 upscaler)")
    register("pixel-diffusion", "imagenet-256-uncond", f"{_M}.diffusion:imagenet_checkpoint", default=True,
             description="guided-diffusion's ImageNet 256x256 unconditional checkpoint (user-provided), GrIDPure's")
    register("pixel-diffusion", "google/ddpm-ema-celebahq-256", f"{_M}._common:as_given", any_name=True,
             description="any local unconditional diffusers pixel model folder or hub id (e.g. the CelebA-HQ "
                         "DDPM), or a guided-diffusion .pt checkpoint")
    register("lpips", "vgg", f"{_M}.impress:load_lpips", default=True,
             description="LPIPS-VGG v0.1 (lpips or pyiqa package; needs weights), IMPRESS's")
    register("lpips", "alex", f"{_M}.impress:load_lpips", description="LPIPS-AlexNet v0.1 (needs weights)")
