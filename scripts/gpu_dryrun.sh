#!/usr/bin/env bash
# `make gpu-dryrun`: scripts/gpu_check.sh exactly as the GPU machine runs
# it, on a simulated image of that machine, without network and without a
# GPU.
#
#   bash scripts/gpu_dryrun.sh IMAGE WHEELS OUT
#
# IMAGE is a virtualenv with the GPU machine's packages (`make gpu-image`,
# requirements-gpu-image.txt); WHEELS what `make gpu-wheels` made.  A clean
# copy of the tree (tracked and untracked-not-ignored files, as a copy of
# the checkout would hold) plus WHEELS goes to OUT/tree; the check runs
# there twice with IMAGE's python as PYTHON, inside `unshare -n` (only the
# loopback interface; where unshare works) and with PIP_NO_INDEX=1 always.
# It passes when the install step passed (and installed nothing the second
# time) and every later step stopped on the missing CUDA device with one
# clear line, with no missing module and no traceback in any log.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=$(cd "${1:?IMAGE}" && pwd)
WHEELS=${2:?WHEELS}
OUT=${3:?OUT}
rm -rf "$OUT"
mkdir -p "$OUT/tree"
OUT=$(cd "$OUT" && pwd)
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
        [ -f "$f" ] && printf '%s\0' "$f"
    done | xargs -0 cp --parents -t "$OUT/tree"
cp -r "$WHEELS" "$OUT/tree/wheels"
echo "gpu-dryrun: tree $(du -sm "$OUT/tree" --exclude=wheels | cut -f1) MB," \
    "wheels $(du -sm "$OUT/tree/wheels" | cut -f1) MB ($(ls "$OUT/tree/wheels" | tr '\n' ' '))"

run=(env PIP_NO_INDEX=1 PYTHON="$IMAGE/bin/python3" bash scripts/gpu_check.sh)
if unshare -n true 2> /dev/null && command -v ip > /dev/null; then
    run=(unshare -n sh -c 'ip link set lo up && exec "$@"' sh "${run[@]}")
    echo "gpu-dryrun: network cut (unshare -n, loopback only)"
else
    echo "gpu-dryrun: unshare -n does not work here; PIP_NO_INDEX=1 only"
fi
for pass in 1 2; do
    echo "gpu-dryrun: run $pass"
    (cd "$OUT/tree" && "${run[@]}" wheels "$OUT/check$pass") || true
done
"$IMAGE/bin/python3" "$OUT/tree/scripts/gpu_check.py" \
    --verify-dryrun "$OUT/check1" --again "$OUT/check2"
