"""The optimizer, the distributed optimizer and the trainer on a device.

Every test takes the device as a parameter: ``gpu`` (GPU 0 through CuPy,
marked ``gpu``: skipped where CuPy sees no CUDA device; ``pytest -m gpu``
selects them) and ``cpu``, which runs the same comparison on NumPy so that
CI exercises each test's code on machines without a GPU.  Results on the
device are compared with the same computation on the CPU (NumPy, SciPy's
LAPACK), which shares no kernel with it.
"""

import json
import os
import subprocess
import sys

import numpy
import pytest

import tests

import chainer
import chainer.functions as F

from chainerkfac import devices
from chainerkfac import inverse
from chainerkfac.links import ResNet50
from chainerkfac.optimizers import KFAC

from tests import nets

from tests.mpi import mpi_env
from tests.mpi import mpiexec

ROOT = tests.ROOT
WORKER = os.path.join(ROOT, 'tests', 'mpi', 'device_worker.py')

DEVICES = [pytest.param('@numpy', id='cpu'),
           pytest.param('@cupy:0', id='gpu', marks=pytest.mark.gpu)]
CPU = chainer.get_device('@numpy')


def to_cpu(array):
    return chainer.backend.CpuDevice().send(array)


def Net():
    return nets.ConvBNLinear(3, 6, 7, 5)


def batch(n=8, seed=1):
    rng = numpy.random.RandomState(seed)
    return (rng.randn(n, 3, 7, 7).astype(numpy.float32),
            rng.randint(0, 5, n).astype(numpy.int32))


def train(device, updates=1, model_factory=Net, data=None, **kwargs):
    """``(optimizer, model, initial weights)`` after ``updates`` K-FAC
    updates on ``device`` (same seed, weights and batches everywhere)."""
    device = chainer.get_device(device)
    device.use()
    numpy.random.seed(0)
    model = model_factory()
    x, t = data or batch()
    with chainer.no_backprop_mode():
        model(x[:2])  # initialize lazily shaped links on the CPU
    initial = {n: p.array.copy() for n, p in model.namedparams()}
    model.to_device(device)
    kwargs = dict(dict(lr=0.1, momentum=0.9, damping=1e-2,
                       bn_damping_ratio=2.0), **kwargs)
    optimizer = KFAC(**kwargs).setup(model)

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)
    xd, td = device.send((x, t))
    for _ in range(updates):
        optimizer.update(lossfun, xd, td)
    return optimizer, model, initial


def assert_close_to_update(model, reference, initial, rel):
    """Every parameter of ``model`` within ``rel`` × (its update on the
    reference) of ``reference``'s."""
    ref = dict(reference.namedparams())
    for name, param in model.namedparams():
        expected = to_cpu(ref[name].array)
        step = float(numpy.abs(expected - initial[name]).max())
        assert step > 0, name
        error = float(numpy.abs(to_cpu(param.array) - expected).max())
        assert error <= rel * step, (name, error, step)


# -- factors, inverses, one update ------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype,rtol', [('float32', 1e-4),
                                        ('float16', 1e-2)])
def test_factors_equal_cpu(device, dtype, rtol):
    cpu, _, _ = train('@numpy', factor_dtype=dtype, bn_fisher='full')
    dev, _, _ = train(device, factor_dtype=dtype, bn_fisher='full')
    for a, b in zip(cpu.kfac_layers, dev.kfac_layers):
        for name in a.factor_names:
            expected, got = a.factor(name), to_cpu(b.factor(name))
            assert got.dtype == expected.dtype
            scale = float(numpy.abs(expected).max())
            numpy.testing.assert_allclose(got, expected, rtol=0,
                                          atol=rtol * scale,
                                          err_msg=a.name + name)


def random_spd(n, seed):
    rng = numpy.random.RandomState(seed)
    x = rng.randn(n, 2 * n)
    return (x.dot(x.T) / (2 * n)).astype(numpy.float32)


@pytest.mark.parametrize('device', DEVICES)
def test_cholesky_and_retry_on_device(device):
    device = chainer.get_device(device)
    mats = [random_spd(n, n) for n in (1, 5, 40)]
    factors = inverse.cholesky_many([(device.send(m), 0.1) for m in mats])
    for m, c in zip(mats, factors):
        c = to_cpu(c)
        assert numpy.array_equal(c, numpy.tril(c))
        numpy.testing.assert_allclose(
            c.dot(c.T), m + 0.1 * numpy.eye(len(m)), rtol=1e-5, atol=1e-5)
    # a failed factorization is detected from potrf's status (CuPy's own
    # cholesky raises nothing and may return finite values there)
    bad = numpy.diag([1.0, 2.0, -0.5, 3.0]).astype(numpy.float32)
    _, info = inverse.potrf(device.send(bad))
    assert int(to_cpu(info)) == 3
    inverse._warned[0] = False
    with pytest.warns(RuntimeWarning, match='not positive definite'):
        c = to_cpu(inverse.cholesky(device.send(bad), 1e-3))
    d = numpy.diag(c) ** 2 - numpy.diag(bad)
    assert d[2] > 0.5 and numpy.allclose(d, d[0], rtol=1e-5)
    with pytest.raises(FloatingPointError, match='non-finite'):
        nan = mats[1].copy()
        nan[0, 3] = numpy.nan  # the triangle potrf does not read
        inverse.cholesky(device.send(nan), 0.1)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('method', ['solve', 'explicit'])
@pytest.mark.parametrize('bn_fisher', ['diagonal', 'full'])
def test_kfac_updates_equal_cpu(device, method, bn_fisher):
    cpu, cpu_model, initial = train('@numpy', updates=3,
                                    bn_fisher=bn_fisher)
    _, model, _ = train(device, updates=3, bn_fisher=bn_fisher,
                        inverse_method=method)
    assert_close_to_update(model, cpu_model, initial, rel=1e-3)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('options', [
    dict(refresh='adaptive', refresh_tolerance=0.5, max_interval=2),
    dict(bn_fisher='unit'), dict(fisher='sampled')],
    ids=['adaptive', 'unit', 'sampled'])
def test_sp_ngd_options_update_as_on_cpu(device, options):
    """The options beyond the paper: the same builds, labels and updates
    on the device as on the CPU."""
    cpu, cpu_model, initial = train('@numpy', updates=4, **options)
    dev, model, _ = train(device, updates=4, **options)
    assert dev.factor_builds == cpu.factor_builds
    assert_close_to_update(model, cpu_model, initial, rel=1e-3)


@pytest.mark.parametrize('device', DEVICES)
def test_non_finite_loss_stops_before_the_weights_change(device):
    optimizer, model, _ = train(device)
    before = {n: to_cpu(p.array).copy() for n, p in model.namedparams()}
    x, t = chainer.get_device(device).send(batch())

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t) * float('nan')
    with pytest.raises(FloatingPointError, match='non-finite loss'):
        optimizer.update(lossfun, x, t)
    for n, p in model.namedparams():
        numpy.testing.assert_array_equal(to_cpu(p.array), before[n])


@pytest.mark.parametrize('device', DEVICES)
def test_resnet50_forward_backward_update(device):
    data = (numpy.random.RandomState(3).rand(4, 3, 64, 64).astype('f'),
            numpy.arange(4, dtype=numpy.int32))

    def small():
        return ResNet50(n_class=4, width=0.125)
    _, cpu_model, initial = train('@numpy', model_factory=small, data=data,
                                  lr=0.01, damping=2.5e-2)
    optimizer, model, _ = train(device, model_factory=small, data=data,
                                lr=0.01, damping=2.5e-2)
    assert len(optimizer.kfac_layers) == 107
    assert_close_to_update(model, cpu_model, initial, rel=5e-2)


# -- DistributedKFAC --------------------------------------------------------

@pytest.mark.parametrize('device,communicator,processes,dtype', [
    pytest.param('cpu', 'naive', 1, 'float32', id='cpu-naive-1'),
    pytest.param('cpu', 'naive', 2, 'float16', id='cpu-naive-2-fp16'),
    pytest.param('gpu', 'naive', 1, 'float32', id='gpu-naive-1',
                 marks=pytest.mark.gpu),
    pytest.param('gpu', 'naive', 2, 'float32', id='gpu-naive-2',
                 marks=pytest.mark.gpu),
    pytest.param('gpu', 'naive', 2, 'float16', id='gpu-naive-2-fp16',
                 marks=pytest.mark.gpu),
    pytest.param('gpu', 'pure_nccl', 1, 'float32', id='gpu-nccl-1',
                 marks=pytest.mark.gpu),
    pytest.param('gpu', 'pure_nccl', 1, 'float16', id='gpu-nccl-1-fp16',
                 marks=pytest.mark.gpu),
])
def test_distributed_on_device(tmp_path, device, communicator, processes,
                               dtype):
    out = tmp_path / 'result.json'
    proc = subprocess.run(
        [mpiexec(), '-n', str(processes), '--oversubscribe', sys.executable,
         WORKER, '--device', device, '--communicator', communicator,
         '--factor-dtype', dtype, '--out', str(out)],
        env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result['processes'] == processes
    assert result['kfac_communicator'] == (
        'NcclCommunicator' if communicator == 'pure_nccl'
        else 'MpiCommunicator')
    assert result['ranks_differ'] == 0.0  # every rank applies the same step
    tolerance = 1e-3 if dtype == 'float32' else 3e-2
    assert result['vs_reference'] <= tolerance, result


# The trainer's synthetic job on the GPU (and its resume onto the GPU) is
# the ``synthetic`` step of scripts/gpu_check.py, not a test here: it runs
# once per check.


def test_device_choices_without_gpu(monkeypatch):
    monkeypatch.setattr(devices, 'gpu_count', lambda: 0)
    assert devices.get_device('auto').xp is numpy
    assert devices.get_device('cpu').xp is numpy
    with pytest.raises(devices.DeviceError, match='gpu requested, but'):
        devices.get_device('gpu')
    with pytest.raises(devices.DeviceError,
                       match="device must be one of 'auto'"):
        devices.get_device('tpu')
    monkeypatch.setattr(devices, 'gpu_count', lambda: 1)
    # fewer GPUs than processes on the node: auto stays on the CPU, gpu fails
    assert devices.get_device('auto', intra_rank=0, local_size=2).xp is numpy
    with pytest.raises(devices.DeviceError, match='process 1 of this node'):
        devices.get_device('gpu', intra_rank=1, local_size=2)
    assert devices.communicator_name('auto', CPU) == 'naive'
    assert devices.communicator_name('flat', CPU) == 'flat'


def test_ranks_sharing_one_gpu_all_use_gpu_0(monkeypatch):
    """Two MPI ranks on a one-GPU machine: both on GPU 0 (the device
    worker's MPI runs); NCCL's rank 1 has no GPU of its own."""
    monkeypatch.setattr(devices, 'gpu_count', lambda: 1)
    monkeypatch.setattr(devices.chainer, 'get_device', lambda spec: spec)
    from tests.mpi import device_worker as worker
    assert worker.worker_device('gpu', 'naive', 0, 2) == '@cupy:0'
    assert worker.worker_device('gpu', 'naive', 1, 2) == '@cupy:0'
    assert worker.worker_device('gpu', 'pure_nccl', 0, 1) == '@cupy:0'
    with pytest.raises(devices.DeviceError, match='process 1 of this node'):
        worker.worker_device('gpu', 'pure_nccl', 1, 2)
    monkeypatch.setattr(devices, 'gpu_count', lambda: 2)
    assert worker.worker_device('gpu', 'naive', 1, 2) == '@cupy:1'
    assert worker.worker_device('gpu', 'naive', 3, 4) == '@cupy:1'
    assert worker.worker_device('cpu', 'naive', 1, 2) == '@numpy'
