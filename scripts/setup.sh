#!/usr/bin/env bash
# One command to set up a development/benchmark environment in .venv (offline-friendly).
# Usage: bash scripts/setup.sh            (PYTHON=python3.11 bash scripts/setup.sh to pick an interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first, pinned: a range that admits a newer release makes pip fetch several GB of CUDA wheels.
# The pin is this script's (a machine choice), not the package's: pyproject.toml asks only for
# torch>=2.2; the constraints file keeps every later install on the pinned pair.
PINS="$(mktemp)"; printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$PINS"
$PIP install --quiet "torch==2.14.1" "torchvision==0.29.1"
$PIP install --quiet -c "$PINS" -e ".[all,dev]"
# facenet-pytorch 2.6.0 pins torch<2.3 and numpy<2 in its metadata but works with current ones;
# --no-deps keeps pip from downgrading. It ships MTCNN's weights.
$PIP install --quiet --no-deps "facenet-pytorch==2.6.0"
# realign's CodeFormer: the sczhou/CodeFormer code packaged as codeformer-pip (S-Lab License,
# non-commercial); --no-deps because its requirements list training tools (tb-nightly, lmdb, ...)
# that inference does not import. Its basicsr imports lpips at import time.
$PIP install --quiet --no-deps "codeformer-pip==0.0.4" "lpips==0.1.4"
# Anti-DreamBooth's face models on PyTorch: RetinaFace (retina-face) and ArcFace (deepface).
# --no-deps: their requirements add TensorFlow-era and server packages; the PyTorch path needs
# only gdown (imported by their weight helpers) and its beautifulsoup4.
$PIP install --quiet --no-deps "retina-face==0.0.19" "deepface==0.0.103" "gdown==6.5.1"
$PIP install --quiet "beautifulsoup4>=4.12"
# peft (LoRA, benchbase.toolkit.lora) comes with the package's dependencies above; checked here
.venv/bin/python -c "import benchbase, torch, diffusers, peft, facenet_pytorch; print('benchbase', benchbase.__version__, '| torch', torch.__version__, '| peft', peft.__version__)"
