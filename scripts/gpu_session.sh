#!/usr/bin/env bash
# The next lent-GPU session's work in calls of under 6 minutes each (carry .whl, made here by
# scripts/gpu_wheels.sh), in order of need:   bash scripts/gpu_session.sh N
#   1  the GPU tests (tests/test_gpu.py), then inference on DeiT-S, bf16, batch 256: timm +
#      torch.compile first (with its kernel tables), our dense (with a kernel breakdown and its
#      optimised HLO), dtps, etps, evit, topk, tome
#   2  the train-step rows timm + compile, dense, dtps_fused, etps, evit (--deadline_s)
#   3  inference: dense with cuDNN's LayerNorm and with cuBLAS in place of Triton GEMMs (does an
#      XLA option close the dense gap?); mctf, pitome, diffrate, dynamicvit at 256; batch 1 of
#      dense and each method
#   4  the train rows dtps (exact), dtps_fused_teacher, dense_remat, dtps_fused_remat
#   5  the largest batches (dense, dtps; remat off and on), Equalize's histogram by method
#   6  one process timing dense and dtps_fused train steps with kernel breakdowns (and dense's
#      optimised HLO), and dense with cuDNN's LayerNorm and with cuBLAS in place of Triton GEMMs
# Set TPS_JAX_COMMIT=<this commit> in the command: the tree travels without .git.
# A DeiT-S train step compiles in about 80 s, an inference graph in 10-30 s.
# The rows accumulate in benchmarks/results/{train_step,throughput}_gpu.json (--append):
# between calls, copy the returned JSON over them here, so the next call keeps its rows. Never
# carry an XLA autotuning cache between calls (benchmarks/NOTES_gpu.md, lease 3).
set -uo pipefail
: "${OUT:?run on the lent machine, where OUT is set}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
RESULT=benchmarks/results/train_step_gpu.json
rows() { python3 -m benchmarks.train_step --append --out "$RESULT" "$@" 2>&1 | tee -a "$OUT/log.txt"; }
TP=benchmarks/results/throughput_gpu.json
infer() { timeout 400 python3 -m benchmarks.throughput --models S/16 --dtypes bfloat16 \
  --repeats 30 --append --out "$TP" "$@" 2>&1 | tee -a "$OUT/log.txt"; cp "$TP" "$OUT/"; }
case "${1:?phase 1 to 6}" in
  1)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/log.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
      | tee "$OUT/test_gpu.txt" | tail -5
    infer --batches 256 --deadline_s 160 --trace none --trace_dir "$OUT/prof" \
      --methods none dtps etps evit topk tome ;;
  2)
    rows --variants dense,dtps_fused,etps,evit --deadline_s 230 ;;
  3)
    infer --batches 256 --no-timm --methods none --xla_option xla_gpu_enable_cudnn_layer_norm=true
    infer --batches 256 --no-timm --methods none --xla_option xla_gpu_enable_triton_gemm=false
    infer --batches 256 --no-timm --deadline_s 90 --methods none mctf pitome diffrate dynamicvit
    infer --batches 1 --no-timm --deadline_s 60 --methods none dtps etps evit topk tome ;;
  4)
    rows --no-timm --variants dtps,dtps_fused_teacher,dense_remat,dtps_fused_remat \
      --deadline_s 280 ;;
  5)
    rows --no-timm --variants "" --max_batch
    timeout 90 python3 -m benchmarks.input_pipeline --device_only --only histograms \
      --out "$OUT/input_pipeline_gpu.json" 2>&1 | tail -8 ;;
  6)
    SPECS='[{"method":"none"},{"method":"dtps","policy_form":"fused"},
      {"method":"none","compiler_options":{"xla_gpu_enable_cudnn_layer_norm":true}},
      {"method":"none","compiler_options":{"xla_gpu_enable_triton_gemm":false}}]'
    timeout 340 python3 -m benchmarks.train_step_profile --specs "$SPECS" --trace 0,1 \
      --hlo 0 --out "$OUT/prof" 2>&1 | tail -12 ;;
  *) echo "phase must be 1 to 6" >&2; exit 2 ;;
esac
[ -f "$RESULT" ] && cp "$RESULT" "$OUT/train_step_gpu.json"
