#!/usr/bin/env bash
# Carries training runs from one session to the next: runs/ is not in git, and a session's
# processes and files outside git end with it. `save` packs into carry/<run>.tar (git-ignored:
# a later call takes it as a carried path, run's `carry`):
# a finished run's summary, config and metrics (enough for the study to count it and skip it),
# an unfinished run's newest checkpoint step, metrics and config. `restore` unpacks them under
# runs/ again, where rerunning the same command resumes at that step. With CARRY_PARAMS=1 a
# finished run keeps its params.npz too (for a run that warm-starts from it).
#
#   bash benchmarks/gpu/carry_runs.sh save runs/curve/dtps_0.5_s0_2000 runs/fmnist_teacher_gap
#   bash benchmarks/gpu/carry_runs.sh restore
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-}
shift || true
case "$mode" in
  save)
    mkdir -p carry
    for run in "$@"; do
      run=${run%/}
      if [ -f "$run/summary.json" ]; then  # finished
        files=("$run/summary.json" "$run/config.json")
        [ "${CARRY_PARAMS:-0}" = 1 ] && [ -f "$run/params.npz" ] && files+=("$run/params.npz")
        latest=done
      else
        latest=$(ls "$run/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
        [ -n "$latest" ] || { echo "no checkpoint step in $run" >&2; exit 1; }
        files=("$run/checkpoints/$latest" "$run/config.json")
      fi
      [ -f "$run/metrics.jsonl" ] && files+=("$run/metrics.jsonl")
      [ -f "$run.log" ] && files+=("$run.log")
      tar -cf "carry/$(echo "$run" | tr '/' '+').tar" "${files[@]}"
      echo "carried $run at step $latest"
    done ;;
  restore)
    for t in carry/*.tar; do
      [ -e "$t" ] || continue
      tar -xf "$t" && echo "restored $(basename "$t" .tar | tr '+' '/')"
    done ;;
  *) echo "usage: $0 save RUN_DIR... | restore" >&2; exit 2 ;;
esac
