#!/usr/bin/env bash
# Downloads the wheels that the lent GPU machine lacks (it has jax, flax, optax, orbax, chex,
# etils, cloudpickle, protobuf, pillow, but not these) into .whl/ (git-ignored), for Python 3.12
# on x86-64. There: pip install --no-index --no-deps --target /tmp/site .whl/*.whl and put
# /tmp/site on PYTHONPATH. tensorflow-datasets is needed only for tfds sources (imported lazily).
# With a big_vision git directory (the `fetch` tool's copy, or any clone's .git) as $1, also
# exports its two model files into .whl/big_vision/ for the reference row of
# benchmarks/big_vision_inference.py (run there, never committed here). Fashion-MNIST's four
# files go to .fmnist/ (git-ignored) for the study's calls (benchmarks/gpu/session.sh 2 and 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl grain==0.2.18 array-record==0.8.6 portpicker ml-collections tensorboardX
if [ -n "${1:-}" ]; then
  rm -rf .whl/big_vision && mkdir -p .whl/big_vision
  git --git-dir "$1" archive HEAD big_vision/models/vit.py big_vision/models/common.py \
    | tar -x -C .whl/big_vision
  git --git-dir "$1" log -1 --format='google-research/big_vision %H %cs' > .whl/big_vision/COMMIT
  cat .whl/big_vision/COMMIT
fi
mkdir -p .fmnist
cp "${TPS_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"/*-idx?-ubyte.gz .fmnist/
ls .whl .fmnist
