"""The function hook that builds factors during the backward pass.

In the backward pass of a covered link's function, the retained input and the
output gradient are both at hand: the hook builds the due factors there, so
no intermediate array is kept beyond what backprop keeps anyway.
"""

import time
import typing

import chainer
from chainer.types import NdArray


class FactorHook(chainer.FunctionHook):
    """Collects ``{layer: [{name: (data, scale)}, ...]}`` for the due
    factors: one dict per call of the link in the pass (several for a link
    used more than once, e.g. an RNN unrolled over time).

    ``build_seconds`` adds up the time spent building them.

    Args:
        due: ``{layer: set of factor names}``: the layers whose factors are
            built in this pass.
        reduction: ``'mean'`` (per-sample gradients are ``n * gy``) or
            ``'sum'``.
        loss_scale: the static loss scale the backward pass runs with (the
            optimizer's ``loss_scaling(scale=...)``), or None: ``gy`` is
            divided by it, so the factors do not depend on it.
        synchronize: called before and after each build (a device
            synchronization, for ``build_seconds``), or None.
    """

    name = 'KFACFactorHook'

    def __init__(self, due, reduction, loss_scale=None, synchronize=None):
        self.due = due
        self.reduction = reduction
        self.loss_scale = loss_scale
        self.synchronize = synchronize or (lambda: None)
        self.by_node = {id(layer.param.node): layer for layer in due}
        self.collected = {}
        self.build_seconds = 0.0

    def backward_preprocess(
            self, function: chainer.FunctionNode,
            in_data: typing.Sequence[NdArray],
            out_grad: typing.Sequence[typing.Optional[NdArray]]) -> None:
        layer = None
        for node in function.inputs[1:3]:  # W, or BN's gamma / beta
            layer = self.by_node.get(id(node))
            if layer is not None:
                break
        if layer is None or not layer.matches(function):
            return
        gy = out_grad[0]
        multiplier = gy.shape[0] if self.reduction == 'mean' else 1
        if self.loss_scale is not None:
            multiplier = multiplier / self.loss_scale
        self.synchronize()
        start = time.perf_counter()
        self.collected.setdefault(layer, []).append(layer.build(
            function, in_data, gy, multiplier, self.due[layer]))
        self.synchronize()
        self.build_seconds += time.perf_counter() - start
