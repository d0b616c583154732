"""Metrics: scores of protected, purified and generated images (docs/metrics.md)."""

from benchbase.hookspecs import hookimpl

_M = "benchbase_plugins.metrics"


@hookimpl
def register_metrics(register):
    register("fdfr", f"{_M}.face_metrics:FaceDetectionFailureRate", version="2",
             description="face detection failure rate of generated images (MTCNN default; retinaface = "
                         "Anti-DreamBooth's RetinaFace-R50 at 0.9, scrfd = insightface SCRFD at 0.5)")
    register("ism", f"{_M}.face_metrics:IdentityScoreMatching", version="2",
             description="cosine of the largest generated face to the mean clean reference embedding (dlib default; "
                         "arcface = Anti-DreamBooth's deepface ResNet-34 ArcFace)")
    register("ser-fiq", f"{_M}.face_metrics:SERFIQ", version="2",
             description="SER-FIQ face quality on FaceNet (VGGFace2), 100 dropout passes (needs its weights; "
                         "the original's MXNet ArcFace is not available)")
    register("brisque", f"{_M}.quality:BRISQUE", version="1",
             description="BRISQUE no-reference quality (brisque package, offline; pyiqa optional)")
    register("liqe", f"{_M}.quality:LIQE", version="2",
             description="LIQE quality in [1, 5] through pyiqa, the authors' multitask checkpoint (needs its weights)")
    register("clip-iqa", f"{_M}.quality:CLIPIQA", version="1",
             description="CLIP-IQA through pyiqa, or MetaCloak's CLIP-IQA-C good/bad face prompts via open_clip")
    register("clip-align", f"{_M}.clip:CLIPAlignment", version="1",
             description="cosine of the open_clip image embedding to the class/instance prompt (DiffShortcut diagnostic)")
    register("psnr", f"{_M}.fidelity:PSNR", version="1",
             description="PSNR (dB) of the protected (or purified) set_B against the clean set_B")
    register("ssim", f"{_M}.fidelity:SSIM", version="1",
             description="SSIM of the protected (or purified) set_B against the clean set_B")
    register("lpips", f"{_M}.fidelity:LPIPS", version="1",
             description="LPIPS (AlexNet) of the protected (or purified) set_B against clean (needs weights)")
    register("linf", f"{_M}.fidelity:LInf", version="1",
             description="measured L-inf distance (levels) of the protected (or purified) set_B to clean")
    register("fid", f"{_M}.distribution:FID", version="1",
             description="FID (KID in details) of generated images against set_C (needs Inception weights)")
    register("ref-rmse", f"{_M}.fidelity:ReferenceRMSE", version="1",
             description="RMS pixel distance (levels) of each generated image to its nearest set_C reference, 32 px")
