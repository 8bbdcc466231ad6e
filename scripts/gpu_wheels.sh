#!/usr/bin/env bash
# Downloads the wheels that the lent GPU machine lacks (it has jax, flax, optax, orbax, chex,
# etils, cloudpickle, protobuf, pillow, but not these) into .whl/ (git-ignored), for Python 3.12
# on x86-64. There: pip install --no-index --no-deps --target /tmp/site .whl/*.whl and put
# /tmp/site on PYTHONPATH. tensorflow-datasets is needed only for tfds sources (imported lazily).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl grain==0.2.18 array-record==0.8.6 portpicker ml-collections tensorboardX
ls .whl
