#!/usr/bin/env bash
# Slims the tree a lent-GPU call takes (benchmarks/gpu/session.sh, every phase): a call takes
# tracked and untracked-not-ignored files and its carried paths, 64 MiB in all, and the full
# tree (38 MB) with the wheels and Fashion-MNIST (.fmnist/, 31 MB) would not fit. `on` takes
# the paths no call reads (goldens, committed models) out of git's index and ignores them
# (.git/info/exclude), so they stay on disk but do not travel (about 6 MB travel); `off` puts
# them back. Nothing is committed either way: run `off` right after the calls, and never commit
# while `status` says on.
#   bash benchmarks/gpu/slim.sh on | off | status
set -euo pipefail
cd "$(dirname "$0")/../.."
PATHS=(tests/goldens results/fmnist_finetuned results/fmnist_teacher results/fmnist_teacher_gap
       results/fmnist_teacher_map results/fmnist_196/fmnist_finetuned)
EXCLUDE=.git/info/exclude
MARK="# slim.sh on"
case "${1:-}" in
  on)
    grep -qxF "$MARK" "$EXCLUDE" 2>/dev/null && { echo "already on"; exit 0; }
    git rm -r -q --cached --ignore-unmatch -- "${PATHS[@]}"
    { echo "$MARK"; for p in "${PATHS[@]}"; do echo "/$p/"; done; echo "# slim.sh end"; } \
      >> "$EXCLUDE"
    echo "slim: ${PATHS[*]} stay here and do not travel; run 'bash $0 off' after the call" ;;
  off)
    for p in "${PATHS[@]}"; do
      [ -n "$(git ls-tree HEAD -- "$p")" ] && git reset -q HEAD -- "$p"
    done
    [ -f "$EXCLUDE" ] && sed -i "/^$MARK\$/,/^# slim.sh end\$/d" "$EXCLUDE"
    echo "full tree again" ;;
  status)
    if grep -qxF "$MARK" "$EXCLUDE" 2>/dev/null; then echo on; else echo off; fi ;;
  *) echo "usage: $0 on | off | status" >&2; exit 2 ;;
esac
