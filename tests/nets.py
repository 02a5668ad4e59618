"""Small nets shared by the tests."""

import math

import numpy

import chainer
import chainer.functions as F
import chainer.links as L

from tests import reference as ref


class ConvBNLinear(chainer.Chain):
    """3×3 conv (pad 1) → BN → ReLU → linear: every K-FAC layer type, on
    ``in_channels`` × ``size`` × ``size`` inputs."""

    def __init__(self, in_channels, channels, size, n_out):
        super(ConvBNLinear, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, channels, 3, pad=1)
            self.bn = L.BatchNormalization(channels)
            self.fc = L.Linear(channels * size * size, n_out)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))))


def randomize(model, seed):
    """``model``'s parameters drawn from ``seed``: He-scaled weights, γ
    around 1, small biases and β (float64 models of the references)."""
    rng = numpy.random.RandomState(seed)
    for name, p in sorted(model.namedparams()):
        if name.endswith('/W'):
            fan_in = int(numpy.prod(p.shape[1:]))
            p.array[...] = rng.standard_normal(p.shape) * math.sqrt(
                2.0 / fan_in)
        elif name.endswith('/gamma'):
            p.array[...] = 1.0 + 0.3 * rng.standard_normal(p.shape)
        else:  # biases, beta
            p.array[...] = 0.1 * rng.standard_normal(p.shape)
    return model


class ConvBNConvNet(chainer.Chain):
    """Conv(3->4, k3, pad1, nobias) -> BN -> relu -> Conv(4->5, k3, s2,
    pad1) -> relu -> Linear(->3), its K-FAC links routed through
    ``reference.run``; input (n, 3, 7, 6)."""

    in_shape = (3, 7, 6)

    def __init__(self, dtype=numpy.float64):
        super(ConvBNConvNet, self).__init__()
        with chainer.using_config('dtype', dtype), self.init_scope():
            self.conv1 = L.Convolution2D(3, 4, 3, pad=1, nobias=True)
            self.bn1 = L.BatchNormalization(4)
            self.conv2 = L.Convolution2D(4, 5, 3, stride=2, pad=1)
            self.fc = L.Linear(5 * 4 * 3, 3)

    def forward(self, x, tape=None):
        h = ref.run(tape, self.conv1, x)
        h = F.relu(ref.run(tape, self.bn1, h))
        h = F.relu(ref.run(tape, self.conv2, h))
        return ref.run(tape, self.fc, h)
