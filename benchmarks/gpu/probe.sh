#!/usr/bin/env bash
# One lent-GPU call: environment, bf16 peak, train-step variants with kernel breakdowns,
# timm reference. Results under $OUT (see .library/device/README.md).
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices()); from jax._src.lib import cuda_versions as c; print('cudnn', c.cudnn_get_version())"
python3 -c "from benchmarks.train_step import bf16_peak_tflops as f; print('bf16 peak TFLOP/s', f())"
timeout "${PROBE_S:-380}" python3 -m benchmarks.train_step_profile --specs "$SPECS" --trace "${TRACE:-}" --out "$OUT/prof"
timeout "${TIMM_S:-150}" python3 -m benchmarks.timm_train_step --batch 256 | tee "$OUT/timm.txt"
