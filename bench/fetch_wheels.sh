#!/usr/bin/env bash
# Wheels for dalle-pytorch 1.6.6 and what its model modules import, for a machine without a package index (the lent
# GPU: Python 3.12, x86_64), into .whl/ (git ignores it; the device tool carries it: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl dalle-pytorch==1.6.6 axial-positional-embedding==0.2.1 rotary-embedding-torch==0.1.5 \
  omegaconf antlr4-python3-runtime==4.9.3 "setuptools<81"
python3 -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pyyaml requests urllib3 idna certifi charset-normalizer packaging
ls .whl
