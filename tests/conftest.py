"""Shared test setup.

``chainerkfac`` is imported before any test module imports Chainer: it makes
Chainer 7.8.1 importable on NumPy 2 / Python 3.12+ (``chainerkfac.compat``).
Tests marked ``gpu`` run only where CuPy sees a CUDA device; tests marked
``slow`` (end-to-end runs of minutes: the study, training to convergence,
the trainer under mpiexec, the figures, packaging) are left out by
``make test-fast`` (``pytest -m "not slow"``) and run by ``make test``.
"""

import pytest

import chainerkfac  # noqa: F401 (first)
from chainerkfac import devices


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'gpu: needs a CUDA device (CuPy); skipped without one')
    config.addinivalue_line(
        'markers', 'slow: an end-to-end run of minutes; left out by '
        'make test-fast (-m "not slow")')


def pytest_collection_modifyitems(config, items):
    if devices.gpu_available():
        return
    skip = pytest.mark.skip(reason='no CUDA device visible to CuPy')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
