#!/usr/bin/env bash
# Install dalle-pytorch 1.6.6 into its own virtual environment, beside (not inside) the project's:
#   bench/install_dalle_pytorch.sh [VENV]      (default: runs/dalle-pytorch-venv, which git ignores)
# CPU torch 2.13.0 first (a bare 'torch' would pull a CUDA build), then dalle-pytorch without its dependencies
# (they name torchvision, which does not import beside the CPU torch here, and taming-transformers, transformers,
# tokenizers, youtokentome and WebDataset, none of which its model's forward pass or sampler uses), then what its
# model modules import. taming's VQGAN is imported at module load by dalle_pytorch.vae: a stub package stands in for it
# (the bench never builds a VQGAN).
# On a machine without a package index (the lent GPU): DP_OFFLINE=1 installs from the wheels in .whl/
# (bench/fetch_wheels.sh puts them there) into a venv that sees the machine's own torch (--system-site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-runs/dalle-pytorch-venv}"
if [ -e "$venv" ] && [ ! -e "$venv/.dalle_course_bench" ]; then
  echo "bench: $venv exists and was not made by this script; pass another folder" >&2; exit 2
fi
pkgs=(dalle-pytorch==1.6.6 axial-positional-embedding==0.2.1 rotary-embedding-torch==0.1.5)
deps=(einops numpy pillow tqdm packaging pyyaml requests omegaconf "setuptools<81")
if [ "${DP_OFFLINE:-0}" = 1 ]; then
  python3 -m venv --system-site-packages "$venv"; touch "$venv/.dalle_course_bench"
  pip=("$venv/bin/python" -m pip install -q --no-index --find-links .whl)
  "${pip[@]}" --no-deps "${pkgs[@]}" omegaconf antlr4-python3-runtime pyyaml requests urllib3 idna certifi charset-normalizer packaging "setuptools<81"
else
  python3 -m venv "$venv"; touch "$venv/.dalle_course_bench"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  "$venv/bin/python" -m pip install -q --no-deps "${pkgs[@]}"
  "$venv/bin/python" -m pip install -q "${deps[@]}"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/taming/models"
: > "$site/taming/__init__.py"; : > "$site/taming/models/__init__.py"
cat > "$site/taming/models/vqgan.py" <<'PY'
"Stub written by dalle_course's bench/install_dalle_pytorch.sh: dalle_pytorch.vae imports these names; the bench never builds a VQGAN."
class VQModel:
    def __init__(self, *a, **k): raise RuntimeError("taming is stubbed for the dalle_course bench")
class GumbelVQ(VQModel): pass
PY
"$venv/bin/python" -W ignore -c "import dalle_pytorch, torch; print('dalle-pytorch', dalle_pytorch.__version__, 'torch', torch.__version__)"
