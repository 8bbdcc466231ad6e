#!/usr/bin/env bash
# The next lent-GPU session's work in calls of under 10 minutes each (carry .whl, made here by
# scripts/gpu_wheels.sh), in order of need:   bash scripts/gpu_session.sh N
#   1  the GPU tests (tests/test_gpu.py), Equalize's histogram by method, and the train-step
#      rows timm, dense, dtps_fused
#   2  the rows dtps (exact), etps, evit, dtps_fused_teacher, dense_remat
#   3  the row dtps_fused_remat and the largest batches (dense, dtps; remat off and on)
#   4  one process timing dense and dtps_fused with kernel breakdowns (and dense's optimised
#      HLO, to name the reductions the traces show), and dense with cuDNN's LayerNorm and with
#      cuBLAS in place of Triton GEMMs (XLA compiler options)
#   5  inference rows of every method (PiToMe and MCTF included) on DeiT-S, bf16, batch 256 and 1
# A DeiT-S step compiles in about 80 s, so 30 device-minutes hold about three of these calls.
# The rows accumulate in benchmarks/results/train_step_gpu.json (--append): between calls,
# copy the returned train_step_gpu.json over it here, so the next call keeps its rows. Never
# carry an XLA autotuning cache between calls (benchmarks/NOTES_gpu.md, lease 3).
set -uo pipefail
: "${OUT:?run on the lent machine, where OUT is set}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
RESULT=benchmarks/results/train_step_gpu.json
rows() { python3 -m benchmarks.train_step --append --out "$RESULT" "$@" 2>&1 | tee -a "$OUT/log.txt"; }
case "${1:?phase 1 to 5}" in
  1)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/log.txt"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
      | tee "$OUT/test_gpu.txt"
    timeout 90 python3 -m benchmarks.input_pipeline --device_only --only histograms \
      --out "$OUT/input_pipeline_gpu.json" 2>&1 | tail -8
    rows --variants dense,dtps_fused --deadline_s 300 ;;
  2)
    rows --no-timm --variants dtps,etps,evit,dtps_fused_teacher,dense_remat --deadline_s 450 ;;
  3)
    rows --no-timm --variants dtps_fused_remat --max_batch ;;
  4)
    SPECS='[{"method":"none"},{"method":"dtps","policy_form":"fused"},
      {"method":"none","compiler_options":{"xla_gpu_enable_cudnn_layer_norm":true}},
      {"method":"none","compiler_options":{"xla_gpu_enable_triton_gemm":false}}]'
    timeout 540 python3 -m benchmarks.train_step_profile --specs "$SPECS" --trace 0,1 \
      --hlo 0 --out "$OUT/prof" 2>&1 | tail -12 ;;
  5)
    timeout 540 python3 -m benchmarks.throughput --models S/16 --batches 256 1 \
      --dtypes bfloat16 --out "$OUT/throughput_gpu.json" 2>&1 | tail -24 ;;
  *) echo "phase must be 1 to 5" >&2; exit 2 ;;
esac
cp "$RESULT" "$OUT/train_step_gpu.json"
