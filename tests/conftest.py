"""Shared test setup.

``chainerkfac`` is imported before any test module imports Chainer: it makes
Chainer 7.8.1 importable on NumPy 2 / Python 3.12+ (``chainerkfac.compat``).
Tests marked ``gpu`` run only where CuPy sees a CUDA device.
"""

import pytest

import chainerkfac  # NOQA: first
from chainerkfac import devices


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'gpu: needs a CUDA device (CuPy); skipped without one')


def pytest_collection_modifyitems(config, items):
    if devices.gpu_available():
        return
    skip = pytest.mark.skip(reason='no CUDA device visible to CuPy')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
