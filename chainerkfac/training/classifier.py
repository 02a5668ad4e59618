"""Classifier for soft (mixed) targets, accuracy against the raw labels."""

import typing

import chainer
import chainer.functions as F
from chainer.types import NdArray


def soft_cross_entropy(y: chainer.Variable,
                       t_soft: chainer.Variable) -> chainer.Variable:
    """Mean over the batch of −Σ_c t_c log softmax(y)_c."""
    return -F.sum(t_soft * F.log_softmax(y)) / y.shape[0]


class MixupClassifier(chainer.Chain):
    """``forward(x, t)`` with int labels (evaluation) or
    ``forward(x, t_soft, t_raw)`` with mixed one-hot targets (training):
    reports ``loss`` and ``accuracy`` (against the raw labels)."""

    def __init__(self, predictor: chainer.Link):
        super(MixupClassifier, self).__init__()
        with self.init_scope():
            self.predictor = predictor

    def forward(self, x: NdArray, t: NdArray,
                t_raw: typing.Optional[NdArray] = None) -> chainer.Variable:
        # the input in the compute dtype (float16 under chainer.mixed16)
        y = self.predictor(x.astype(chainer.get_dtype(), copy=False))
        if t_raw is None:
            loss = F.softmax_cross_entropy(y, t)
            t_raw = t
        else:
            loss = soft_cross_entropy(y, t)
        chainer.report({'loss': loss, 'accuracy': F.accuracy(y, t_raw)},
                       self)
        return loss
