#!/usr/bin/env bash
# Fetch, on a machine with access to the package registry, the wheels that the offline GPU
# machine lacks (FACTS.md: it has torch, transformers, peft, accelerate, safetensors, tokenizers,
# numpy and pytest for CPython 3.12; not bitsandbytes, DeepSpeed, Hydra/OmegaConf or W&B) into
# .whl/ (git-ignored; pass it along with the tree: carry [".whl"]). About 48 MB, most of it the
# bitsandbytes wheel with its CUDA 13.0 kernels.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON]        # PYTHON: the pip to use (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64)
# Binary wheels for CPython 3.12 on x86-64 Linux, with their dependencies where the GPU machine
# lacks them too.
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" \
    bitsandbytes==0.50.2 hydra-core==1.3.2 omegaconf==2.3.0 \
    hjson msgpack ninja py-cpuinfo einops psutil
"$PY" -m pip download -q "${TARGET[@]}" -d "$DEST" pydantic
# Source-only packages become pure-Python wheels here: antlr4 (Hydra's parser runtime) and
# DeepSpeed without precompiled ops (it JIT-builds what it needs; torch_adam needs nothing).
"$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
du -sh "$DEST"
ls "$DEST"
