"""Which device a process computes on: one GPU per process, or the CPU.

The choices (``train.device`` of the trainer, ``--device`` of the scripts):

``'auto'``
    a GPU when CuPy sees one for every process of the node, else the CPU;
``'cpu'``
    NumPy;
``'gpu'``
    a GPU; on a machine without a usable one, :class:`DeviceError` (one
    line) before anything is written.

With several processes per node, rank r uses GPU ``intra_rank`` (ChainerMN's
convention: ``comm.intra_rank``, its rank among the processes of its node).
"""

import typing

import numpy

import chainer

from chainerkfac.distributed import agreement
from chainerkfac import errors

CHOICES = ('auto', 'cpu', 'gpu')


class DeviceError(RuntimeError):
    """No usable device for the choice: the message is one line."""


def gpu_count() -> int:
    """The number of CUDA devices CuPy can use (0 without CuPy, CUDA or a
    driver)."""
    from chainer.backends import cuda
    if not cuda.available:
        return 0
    try:
        return cuda.cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def gpu_available() -> bool:
    return gpu_count() > 0


def _why_no_gpu():
    from chainer.backends import cuda
    if not cuda.available:
        reason = getattr(cuda, '_resolution_error', None)
        if reason is None:
            return 'CuPy is not installed (pip install -e .[gpu])'
        return 'CuPy cannot be used: {}'.format(
            errors.one_line(reason)[:200])
    return 'CuPy sees no CUDA device'


def get_device(choice: str = 'auto', intra_rank: int = 0,
               local_size: int = 1,
               share: bool = False) -> chainer.backend.Device:
    """The ``chainer.backend.Device`` of ``choice`` for the process with
    node-local rank ``intra_rank`` of ``local_size`` processes on its node.

    ``'auto'`` takes GPU ``intra_rank`` when every process of the node has a
    GPU of its own, else the CPU; ``'gpu'`` raises :class:`DeviceError`
    when this process has none.  With ``share=True`` (tests, and MPI
    communicators that allow it) processes share the node's GPUs instead:
    process r uses GPU ``r % count`` (all on GPU 0 with one GPU).
    """
    errors.check_choice('device', choice, CHOICES, DeviceError)
    count = gpu_count() if choice != 'cpu' else 0
    if choice == 'gpu':
        if count == 0:
            raise DeviceError('gpu requested, but {}'.format(_why_no_gpu()))
        if intra_rank >= count and not share:
            raise DeviceError(
                'gpu requested, but process {} of this node has no GPU of its '
                'own '
                '({} visible for {} processes; run one process per GPU)'
                .format(intra_rank, count, local_size))
    elif choice == 'cpu' or count == 0 or (
            count < max(local_size, 1) and not share):
        return chainer.get_device('@numpy')
    return chainer.get_device('@cupy:{}'.format(gpu_id(intra_rank, count)))


def gpu_id(intra_rank: int, count: int) -> int:
    """The GPU of the process with node-local rank ``intra_rank`` among
    ``count`` GPUs: its own (``intra_rank``) when there are enough, else
    shared round-robin (``intra_rank % count``)."""
    return intra_rank % count


def get_process_device(choice: str,
                       comm: typing.Any) -> chainer.backend.Device:
    """:func:`get_device` for this MPI process, agreed by all: when any
    process has no device for ``choice``, every process raises the same
    :class:`DeviceError` (no rank is left waiting in a collective)."""
    intra_rank, local_size = comm.node_layout()
    found = []  # devices stay on their process: only the errors travel
    agreement.agree(
        comm, lambda: found.append(
            get_device(choice, intra_rank, local_size)),
        catch=DeviceError, error=DeviceError)
    return found[0]


def describe(device: chainer.backend.Device) -> str:
    """``'cpu'`` or ``'gpu <id> (<name>)'``, for logs."""
    if not is_gpu(device):
        return 'cpu'
    from chainer.backends import cuda
    props = cuda.cupy.cuda.runtime.getDeviceProperties(device.device.id)
    name = props['name']
    if isinstance(name, bytes):
        name = name.decode()
    return 'gpu {} ({})'.format(device.device.id, name)


def is_gpu(device: chainer.backend.Device) -> bool:
    return device.xp is not numpy


def communicator_name(name: str, device: chainer.backend.Device) -> str:
    """ChainerMN's communicator for ``name``: ``'auto'`` is ``'pure_nccl'``
    on a GPU and ``'naive'`` on the CPU; other names are kept."""
    if name != 'auto':
        return name
    return 'pure_nccl' if is_gpu(device) else 'naive'


def synchronize(device: chainer.backend.Device) -> None:
    """Waits for the device's queued work (no-op on the CPU): timings."""
    if is_gpu(device):
        device.device.synchronize()
