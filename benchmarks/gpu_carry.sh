#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for benchmarks/gpu_check.py on a GPU machine that has PyTorch, timm, typer, rich and
# safetensors but reaches no package index: the wheels of what it lacks, built for its Python 3.12 on x86-64, and
# the CIFAR-10 tarball. Run from anywhere in the repository:
#
#   bash benchmarks/gpu_carry.sh [path/to/cifar10-jpeg.tar.gz]      # default: ../shared/data/cifar10-jpeg.tar.gz
#
# Then carry .gpu and, there, install the wheels into a folder on PYTHONPATH (README, "The GPU check").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tarball="${1:-../shared/data/cifar10-jpeg.tar.gz}"
mkdir -p .gpu/wheels
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# ssl's own needs (pydantic and its core, tomli-w), then lightly's (the peer step): the versions tested here
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .gpu/wheels pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing-extensions==4.16.0 tomli-w==1.2.0 lightly==1.6.0 hydra-core==1.3.8 omegaconf==2.3.1
# hydra's parser runtime is published as a source archive only: a pure-Python wheel built here runs there
python3 -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
cp "$tarball" .gpu/cifar10-jpeg.tar.gz
du -sh .gpu
