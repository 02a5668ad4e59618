"""The hooks that build factors in every training backward pass.

At ``setup`` the optimizer registers a :class:`ForwardHook` (a Chainer link
hook) on every covered link, as kfac-pytorch registers its module hooks
once.  Each training forward of the link (``chainer.config.train`` and
``enable_backprop``) tags the link's function node with a
:class:`BackwardHook`; when a backward pass reaches that node, the retained
input and the output gradient are both at hand, and the hook hands them to
the optimizer, which builds the due factors there: no intermediate array is
kept beyond what backprop keeps anyway.  Evaluation (``train=False``,
``no_backprop_mode``) builds nothing.
"""

import typing

import chainer
from chainer.types import NdArray

#: The name of both hooks on links and function nodes.
HOOK_NAME = 'chainerkfac'

#: How far back from a link's output its own function node is searched
#: (e.g. the reshape after a Linear with several batch axes).
_SEARCH_DEPTH = 4


def function_node_of(layer: typing.Any, outputs: typing.Any
                     ) -> typing.Optional[chainer.FunctionNode]:
    """The function node of ``layer``'s link that made ``outputs`` (its
    parameter is that node's input), or None."""
    if isinstance(outputs, chainer.Variable):
        outputs = (outputs,)
    elif not isinstance(outputs, (tuple, list)):
        return None
    nodes = [v.creator_node for v in outputs
             if isinstance(v, chainer.Variable)]
    for _ in range(_SEARCH_DEPTH):
        nodes = [node for node in nodes if node is not None]
        for node in nodes:
            if layer.matches(node):
                return node
        nodes = [x.creator_node for node in nodes for x in node.inputs]
    return None


class ForwardHook(chainer.LinkHook):
    """On a covered link: tags the function node of each training forward.

    Args:
        layer: the link's K-FAC block.
        recorder: the optimizer (``tag_forward()`` and
            ``record_backward(layer, function, in_data, gy, tag)``).
    """

    name = HOOK_NAME

    def __init__(self, layer: typing.Any, recorder: typing.Any):
        self.layer = layer
        self.recorder = recorder

    def __deepcopy__(self, memo: dict) -> 'ForwardHook':
        # a copy of the model (e.g. for evaluation) is not this optimizer's
        # target: its functions never match the layer, the hook does nothing
        return self

    def __getstate__(self) -> dict:
        # a pickled model (another process) is not this optimizer's target
        return {'layer': None, 'recorder': None}

    def forward_postprocess(self, args: typing.Any) -> None:
        if self.recorder is None:
            return
        config = chainer.config
        if not (config.train and config.enable_backprop):
            return
        node = function_node_of(self.layer, args.out)
        if node is None:
            return
        if HOOK_NAME in node.local_function_hooks:
            return  # a link nested in another covered link's forward
        node.add_hook(BackwardHook(self.layer, self.recorder,
                                   self.recorder.tag_forward()),
                      name=HOOK_NAME)


class BackwardHook(chainer.FunctionHook):
    """On one function node of a covered link: its backward hands the
    retained inputs and the output gradient to the optimizer."""

    name = HOOK_NAME

    def __init__(self, layer: typing.Any, recorder: typing.Any,
                 tag: typing.Any):
        self.layer = layer
        self.recorder = recorder
        self.tag = tag

    def backward_preprocess(
            self, function: chainer.FunctionNode,
            in_data: typing.Sequence[NdArray],
            out_grad: typing.Sequence[typing.Optional[NdArray]]) -> None:
        if out_grad[0] is None:
            return
        self.recorder.record_backward(self.layer, function, in_data,
                                      out_grad[0], self.tag)


def register(layers: typing.Iterable[typing.Any],
             recorder: typing.Any) -> None:
    """A :class:`ForwardHook` on each layer's link (replacing one an
    earlier optimizer registered: the last one set up records)."""
    for layer in layers:
        if HOOK_NAME in layer.link.local_link_hooks:
            layer.link.delete_hook(HOOK_NAME)
        layer.link.add_hook(ForwardHook(layer, recorder))
