#!/usr/bin/env bash
# Installs what tps_jax needs on a fresh Debian machine: the Python packages of
# requirements.txt and the offline default data (Debian's dataset-fashion-mnist).
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# tcmalloc: XLA on the CPU runs 1.4x faster with it (tps_jax/host.py preloads it).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || \
   ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist libtcmalloc-minimal4 >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
# libtpu, at the version the installed jax pins, into .tpu/ (outside the environment, so that
# nothing else loads it): benchmarks/pod_compile.py and its test compile the train step for TPU
# pod topologies on this CPU. Optional: without it that test is skipped, saying why.
if [ ! -d .tpu/libtpu ]; then
  LIBTPU=$(python3 -c 'import importlib.metadata as m; print(next((r.split(";")[0].strip() for r in m.requires("jax") or [] if r.startswith("libtpu") and "tpu" in r.split(";")[-1]), ""))')
  if [ -n "$LIBTPU" ]; then
    python3 -m pip install -q --disable-pip-version-check --no-deps --target .tpu "$LIBTPU" \
      || echo "setup: could not install $LIBTPU into .tpu/; the TPU compile test will be skipped" >&2
  fi
fi
