"""Non-finite values caught before they reach the weights, without a host
synchronization per step or per parameter on a GPU."""

import math
import typing as tp

import numpy

from chainer import backend
from chainer.types import NdArray


class LossCheck(object):
    """Checks the losses of an update before its parameters change.

    :meth:`record` takes each loss as it is computed.  On NumPy it checks at
    once.  On CuPy it starts an asynchronous copy of the loss into pinned
    host memory and records an event, and :meth:`check` (called just before
    the parameters are updated) waits for that event: by then the device has
    long finished the forward pass that produced the loss, so the check
    costs no stall of the backward pass and K-FAC stages still queued.
    """

    def __init__(self):
        self._pending = []  # (host value, event or None, t)

    def record(self, loss: NdArray, t: int) -> None:
        xp = backend.get_array_module(loss)
        if xp is numpy:
            self._raise_unless_finite(float(loss), t)
            return
        import cupy
        import cupyx
        host = cupyx.empty_pinned(loss.shape, loss.dtype)
        stream = cupy.cuda.get_current_stream()
        loss.get(out=host, stream=stream, blocking=False)
        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        self._pending.append((host, event, t))

    def check(self) -> None:
        """Raises ``FloatingPointError`` for the first non-finite loss
        recorded since the last check."""
        pending, self._pending = self._pending, []
        for host, event, t in pending:
            event.synchronize()
            self._raise_unless_finite(float(host), t)

    @staticmethod
    def _raise_unless_finite(value, t):
        if not math.isfinite(value):
            raise FloatingPointError(
                'K-FAC: non-finite loss {} at update {}'.format(value, t))


def all_finite(arrays: tp.Iterable[tp.Any]) -> bool:
    """Whether every array of ``arrays`` (all on one device) is finite, with
    one host synchronization for all of them."""
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return True
    device = backend.get_device_from_array(arrays[-1])
    xp = device.xp
    flags = xp.stack([xp.isfinite(device.send(_as_array(a))).all()
                      for a in arrays])
    return bool(backend.CpuDevice().send(flags.all()))


def _as_array(value):
    """NumPy scalars and floats as NumPy arrays; device arrays as they are."""
    if backend.get_array_module(value) is numpy:
        return numpy.asarray(value)
    return value


def first_non_finite(named_arrays: tp.Iterable[tuple]
                     ) -> tp.Optional[str]:
    """The name of the first non-finite array of ``(name, array)`` pairs,
    or None; one synchronization when all are finite."""
    named_arrays = [(n, a) for n, a in named_arrays if a is not None]
    if all_finite([a for _, a in named_arrays]):
        return None
    for name, array in named_arrays:
        if not all_finite([array]):
            return name
    return None
