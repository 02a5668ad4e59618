"""Every private Chainer / ChainerMN API chainerkfac uses, in one module.

Chainer 7.8.1 and ChainerMN keep a few things chainerkfac needs behind
underscore names.  They are reached only here, each behind a function that
says what it is for, so that a change of the framework shows in one file.
(:mod:`chainerkfac.compat` is the other place that knows Chainer's insides:
it patches Chainer to run on the modern stack.)
"""

import typing

import numpy

import chainer
from chainer import reporter as reporter_module
from chainer.dataset import convert


def own_params(link: chainer.Link) -> list:
    """The parameters ``link`` holds itself (not its children's), by name."""
    return [getattr(link, name) for name in sorted(link._params)]


def has_own_params(link: chainer.Link) -> bool:
    """Whether ``link`` holds parameters of its own."""
    return bool(link._params)


def call_converter(converter: typing.Callable, batch: typing.Any,
                   device: typing.Any) -> typing.Any:
    """``converter(batch, device)`` as Chainer's own updaters call it."""
    return convert._call_converter(converter, batch, device)


def report_to_observer(values: dict, target: typing.Any) -> None:
    """Reports ``values`` under ``target``'s name when a reporter is active
    and ``target`` is one of its observers, else without a prefix; nothing
    when no reporter is active."""
    if not reporter_module._get_reporters():
        return
    current = reporter_module.get_current_reporter()
    observer = target if id(target) in getattr(
        current, '_observer_names', {}) else None
    reporter_module.report(values, observer)


def loss_scale_of(param: chainer.Parameter) -> typing.Optional[float]:
    """The loss scale of the backward pass that left ``param``'s gradient
    (None: not scaled), as Chainer records it on the parameter."""
    return param._loss_scale


def optimizer_loss_scale(optimizer: chainer.Optimizer
                         ) -> typing.Optional[float]:
    """The loss scale the optimizer's ``update(lossfun)`` runs its backward
    pass with (``loss_scaling()``), or None."""
    return optimizer._loss_scale


def dynamic_loss_scaling(optimizer: chainer.Optimizer) -> bool:
    """Whether ``optimizer.loss_scaling()`` chose a dynamic scale."""
    return bool(optimizer._loss_scaling_is_dynamic)


def record_overflow(optimizer: chainer.Optimizer, overflow: bool) -> None:
    """Records whether a gradient was not finite, as Chainer's
    ``check_nan_in_grads`` does, for ``update_loss_scale()`` (which halves
    the scale after one, and grows it after good updates)."""
    optimizer._loss_scaling_isnan = overflow
    if overflow:
        optimizer._loss_scaling_isnan_ever = True


def drop_loss_scale(param: chainer.Parameter) -> None:
    """Marks ``param``'s gradient as already unscaled, so that its update
    rule does not divide it by the loss scale again."""
    param._loss_scale = None


def nccl_comm(comm: typing.Any) -> typing.Any:
    """The NCCL communicator of a ChainerMN ``pure_nccl`` communicator,
    created on first use."""
    comm._init_comms()
    return comm.nccl_comm


def nccl_type_id(dtype: typing.Any) -> int:
    """NCCL's id of ``dtype``."""
    from chainermn.communicators import _communication_utility
    return _communication_utility._get_nccl_type_id(numpy.dtype(dtype))
