"""ResNet-8: a small ResNet with BatchNormalization for 28×28 images.

The model of the large-batch study (``scripts/batch_scaling.py``):
conv 3×3 (w) - BN - ReLU, three stages of one basic block each (two 3×3
convolutions with BN, identity shortcut in the first stage, 1×1 projection
with BN and stride 2 in the others) of widths w, 2w, 4w, global average
pooling and a fully connected layer: 8 weight layers on the main path
(9 Convolution2D with the projections, 9 BatchNormalization, 1 Linear).
With w = 16 and 10 classes it has 78,042 parameters.
"""

import typing

import chainer
import chainer.functions as F
import chainer.links as L
from chainer.types import NdArray


def _conv(in_channels, out_channels, ksize, stride=1):
    return L.Convolution2D(in_channels, out_channels, ksize, stride=stride,
                           pad=ksize // 2, nobias=True,
                           initialW=chainer.initializers.HeNormal())


class BasicBlock(chainer.Chain):
    """3×3 (stride) - BN - ReLU - 3×3 - BN, plus the (projected) input."""

    def __init__(self, in_channels, out_channels, stride=1):
        super(BasicBlock, self).__init__()
        self.projection = stride != 1 or in_channels != out_channels
        with self.init_scope():
            self.conv1 = _conv(in_channels, out_channels, 3, stride)
            self.bn1 = L.BatchNormalization(out_channels)
            self.conv2 = _conv(out_channels, out_channels, 3)
            self.bn2 = L.BatchNormalization(out_channels)
            if self.projection:
                self.conv3 = _conv(in_channels, out_channels, 1, stride)
                self.bn3 = L.BatchNormalization(out_channels)

    def forward(self, x: typing.Union[chainer.Variable, NdArray]
                ) -> chainer.Variable:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = self.bn3(self.conv3(x)) if self.projection else x
        return F.relu(h + shortcut)


class ResNet8(chainer.Chain):
    """ResNet-8 for (in_channels, 28, 28) inputs; ``width`` = w."""

    def __init__(self, n_class=10, width=16, in_channels=1):
        super(ResNet8, self).__init__()
        with self.init_scope():
            self.conv1 = _conv(in_channels, width, 3)
            self.bn1 = L.BatchNormalization(width)
            self.block1 = BasicBlock(width, width)
            self.block2 = BasicBlock(width, 2 * width, stride=2)
            self.block3 = BasicBlock(2 * width, 4 * width, stride=2)
            self.fc = L.Linear(4 * width, n_class,
                               initialW=chainer.initializers.HeNormal())

    def forward(self, x: typing.Union[chainer.Variable, NdArray]
                ) -> chainer.Variable:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.block3(self.block2(self.block1(h)))
        return self.fc(F.average(h, axis=(2, 3)))
