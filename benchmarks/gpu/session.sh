#!/usr/bin/env bash
# The next lent-GPU session's work in calls of under 6 minutes each (carry .whl, made here by
# `benchmarks/gpu/wheels.sh <big_vision git dir>`), in order of need:
#   bash benchmarks/gpu/session.sh N
#   1  where the dense block loses: the GPU tests (tests/test_gpu.py), then inference on DeiT-S,
#      bf16, batch 256, each with its kernel breakdown: timm + torch.compile (torch.profiler
#      tables), big_vision's own ViT (the JAX anchor, .whl/big_vision), our dense (and its
#      optimised HLO), our dense with einsum attention (big_vision's kind, not cuDNN's)
#   2  the study at the paper's geometry: the dense teacher at 196 tokens (patch 2, depth 12,
#      stages 3-6-9), resumable across calls (runs and teacher come back in back.tar)
#   3  the study's fine-tunes (dtps, dynamicvit, etps, evit at keep 0.7 / 0.5 / 0.3, seeds
#      0-2), resumable: each call runs what the earlier ones left
#      (2 and 3 carry .whl and .fmnist, with `benchmarks/gpu/slim.sh on` before the call and
#      `benchmarks/gpu/slim.sh off` after it)
#   4  the train-step rows timm + compile, dense, dtps_fused, etps, evit (--deadline_s)
#   5  inference: dense with bf16 parameters, with big_vision's tanh GELU, with cuDNN's
#      LayerNorm and with cuBLAS in place of Triton GEMMs (does an XLA option close the dense
#      gap?); mctf, pitome, diffrate, dynamicvit at 256; batch 1 of dense and each method
#   6  the train rows dtps (exact), dtps_fused_teacher, dense_remat, dtps_fused_remat
#   7  the largest batches (dense, dtps; remat off and on), Equalize's histogram by method
#   8  one process timing dense and dtps_fused train steps with kernel breakdowns (and dense's
#      optimised HLO), and dense with cuDNN's LayerNorm and with cuBLAS in place of Triton GEMMs
#   9  every registered method's inference at batch 256, then at batch 1 and 8 (issue 45's
#      breadth: ToFu, VisionZip, DCT and any method added since), each row beside dense
# Set TPS_JAX_COMMIT=<this commit> in the command: the tree travels without .git.
# A DeiT-S train step compiles in about 80 s, an inference graph in 10-30 s.
# The rows accumulate in benchmarks/results/{train_step,throughput}_gpu.json (--append):
# between calls, copy the returned JSON over them here, so the next call keeps its rows; unpack
# a returned back.tar (below) here, so the next call (carrying carry/) resumes the study.
# Never carry an XLA autotuning cache between calls (benchmarks/gpu/README.md).
set -uo pipefail
: "${OUT:?run on the lent machine, where OUT is set}"
# STUDY_ARG set in the environment: a dry run of phases 2-3 here, on CPU, under other names
# (STUDY_ARG=tiny,steps=2,patch=2): nothing is installed and the real runs are not touched.
if [ -n "${STUDY_ARG:-}" ]; then TAG=196dry; else
  TAG=196
  STUDY_ARG=patch=2,depth=12,stages=3-6-9  # configs/fashion_mnist.py: 196 tokens, stages 3/6/9
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
RESULT=benchmarks/results/train_step_gpu.json
rows() { python3 -m benchmarks.train_step --append --out "$RESULT" "$@" 2>&1 | tee -a "$OUT/log.txt"; }
# Traces and HLO go to /tmp/prof (emptied first: a warm machine keeps it) and come back as one
# file, rewritten after every inference process, so a call cut short keeps the earlier ones.
PROF=/tmp/prof
rm -rf "$PROF"
TP=benchmarks/results/throughput_gpu.json
infer() {  # infer SECONDS ARGS...: one benchmarks.throughput process
  timeout "$1" python3 -m benchmarks.throughput --models S/16 --dtypes bfloat16 --repeats 30 \
    --append --out "$TP" "${@:2}" 2>&1 | tee -a "$OUT/log.txt"
  cp "$TP" "$OUT/"
  [ -d "$PROF" ] && tar -czf "$OUT/prof.tgz" -C /tmp prof
}
# The study at the paper's geometry. Fashion-MNIST is not on that machine: phases 2 and 3 carry
# it in .fmnist/ (benchmarks/gpu/wheels.sh) beside .whl, with the tree slimmed for the call
# (benchmarks/gpu/slim.sh on; off after it), as both would not fit in the 64 MiB a call takes.
TEACHER=results/fmnist_teacher_$TAG/params.npz
study() {  # study SECONDS ARGS...: experiments.fashion_mnist at the paper's geometry
  timeout "$1" python3 -m experiments.fashion_mnist --arg "$STUDY_ARG" --teacher "$TEACHER" \
    --results "results/fmnist_$TAG" --workdir "runs/ft$TAG" "${@:2}" 2>&1 \
    | tee -a "$OUT/log.txt" | tail -8
}
need_data() {
  [ "$TAG" = 196dry ] && return 0
  export TPS_FASHION_MNIST_DIR=$PWD/.fmnist
  [ -f .fmnist/train-images-idx3-ubyte.gz ] || {
    echo "no .fmnist/: carry it (benchmarks/gpu/wheels.sh makes it; benchmarks/gpu/slim.sh on)" >&2
    exit 2; }
}
# Runs travel in carry/<run>.tar (benchmarks/gpu/carry_runs.sh; git-ignored: each call carries
# carry/ with .whl and .fmnist, run's `carry`).
# At most 8 files come back from a call, each under 16 MB: the phase's carry tars and results
# return as one tar, split into parts ($OUT/back.tar.part-*); here, in the repository root:
#   cat <files_at>/back.tar.part-* | tar -x      # then commit results/ (carry/ stays here)
back() {  # back PATHS...: pack RUNS (those matching PARAM_RUNS with their params) and PATHS
  local paths=() run
  for run in "${RUNS[@]}"; do
    [ -d "$run" ] || continue
    # shellcheck disable=SC2053  # PARAM_RUNS is a glob
    if [[ -n "${PARAM_RUNS:-}" && $run == $PARAM_RUNS ]]; then local keep=1; else local keep=0; fi
    CARRY_PARAMS=$keep bash benchmarks/gpu/carry_runs.sh save "$run" | tee -a "$OUT/log.txt" \
      && paths+=("carry/$(echo "${run%/}" | tr '/' '+').tar")
  done
  for r in "$@"; do [ -e "$r" ] && paths+=("$r"); done
  [ ${#paths[@]} -gt 0 ] && tar -cf - "${paths[@]}" | split -b 15M - "$OUT/back.tar.part-"
}
case "${1:?phase 1 to 9}" in
  1)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/log.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
      | tee "$OUT/test_gpu.txt" | tail -5
    infer 240 --batches 256 --trace none --trace_dir "$PROF" --big_vision .whl/big_vision \
      --methods none
    # like for like with big_vision's attention (flax's einsums, not cuDNN's flash kernel)
    infer 80 --batches 256 --no-timm --trace none --trace_dir "$PROF" --methods none \
      --model_kw attention=einsum ;;
  2)
    need_data
    bash benchmarks/gpu/carry_runs.sh restore > /dev/null
    study 300 teacher --suffix "_$TAG"
    # each teacher phase warm-starts from the one before: until the teacher is complete, a
    # finished phase's params travel with it (a call takes 64 MiB in all)
    RUNS=(runs/fmnist_teacher_$TAG runs/fmnist_teacher_b_$TAG runs/fmnist_teacher_c_$TAG)
    if [ -f "$TEACHER" ]; then PARAM_RUNS=""; else PARAM_RUNS="*"; fi
    back "results/fmnist_teacher_$TAG" ;;
  3)
    need_data
    bash benchmarks/gpu/carry_runs.sh restore > /dev/null
    [ -f "$TEACHER" ] || { echo "no $TEACHER yet: run phase 2 first" >&2; exit 2; }
    study 300 finetune --keeps 0.7,0.5,0.3  # rewrites its JSON after every run
    # the seed-0 models at keep 0.7 that this call trained, into results/fmnist_196/
    # fmnist_finetuned/ (committed here; benchmarks/gpu/slim.sh keeps them from travelling)
    study 40 finetune --keeps 0.7,0.5,0.3 --report --publish --publish_keep 0.7
    RUNS=(runs/ft$TAG/*)
    back "results/fmnist_$TAG" ;;
  4)
    rows --variants dense,dtps_fused,etps,evit --deadline_s 230 ;;
  5)
    infer 60 --batches 256 --no-timm --methods none --param_dtype bfloat16
    infer 60 --batches 256 --no-timm --methods none --model_kw gelu=tanh
    infer 60 --batches 256 --no-timm --methods none \
      --xla_option xla_gpu_enable_cudnn_layer_norm=true
    infer 60 --batches 256 --no-timm --methods none --xla_option xla_gpu_enable_triton_gemm=false
    infer 120 --batches 256 --no-timm --deadline_s 90 --methods none mctf pitome diffrate dynamicvit
    infer 90 --batches 1 --no-timm --deadline_s 60 --methods none dtps etps evit topk tome ;;
  6)
    rows --no-timm --variants dtps,dtps_fused_teacher,dense_remat,dtps_fused_remat \
      --deadline_s 280 ;;
  7)
    rows --no-timm --variants "" --max_batch
    timeout 90 python3 -m benchmarks.input_pipeline --device_only --only histograms \
      --out "$OUT/input_pipeline_gpu.json" 2>&1 | tail -8 ;;
  8)
    SPECS='[{"method":"none"},{"method":"dtps","policy_form":"fused"},
      {"method":"none","compiler_options":{"xla_gpu_enable_cudnn_layer_norm":true}},
      {"method":"none","compiler_options":{"xla_gpu_enable_triton_gemm":false}}]'
    timeout 340 python3 -m benchmarks.train_step_profile --specs "$SPECS" --trace 0,1 \
      --hlo 0 --out "$PROF" 2>&1 | tail -12
    [ -d "$PROF" ] && tar -czf "$OUT/prof.tgz" -C /tmp prof ;;
  9)
    infer 170 --batches 256 --no-timm --deadline_s 150
    infer 170 --batches 1 8 --min_images 64 --no-timm --deadline_s 150 ;;
  *) echo "phase must be 1 to 9" >&2; exit 2 ;;
esac
[ -f "$RESULT" ] && cp "$RESULT" "$OUT/train_step_gpu.json"
