"""ResNet-50 (bottleneck v1), the network of the paper's experiments.

As in He et al. 2016 and Chainer's ``examples/imagenet/resnet50.py``:
conv 7×7/2 (64) - BN - ReLU - max-pool 3×3/2, four stages of bottleneck
blocks (3, 4, 6, 3) with widths 64/128/256/512 and expansion 4, global
average pooling and a fully connected layer.  The stride 2 of a stage sits on
the first 1×1 convolution of its first block and on its projection shortcut
(v1).  Every convolution has no bias and is followed by BatchNormalization;
the FC has a bias.  All weights use ``HeNormal()`` with default parameters.

That is 53 Convolution2D, 53 BatchNormalization and 1 Linear: the 107 layers
whose Fisher blocks Figure 4 of the paper counts.
"""

import typing

import chainer
import chainer.functions as F
import chainer.links as L
from chainer.types import NdArray


#: (number of blocks, width, stride of the first block) per stage.
STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
EXPANSION = 4


def _conv(in_channels, out_channels, ksize, stride=1, pad=0):
    return L.Convolution2D(in_channels, out_channels, ksize, stride=stride,
                           pad=pad, nobias=True,
                           initialW=chainer.initializers.HeNormal())


class BottleNeck(chainer.Chain):
    """1×1 (stride) - 3×3 - 1×1 (×4), each with BN; projection if asked."""

    def __init__(self, in_channels, width, stride=1, projection=False):
        super(BottleNeck, self).__init__()
        out_channels = width * EXPANSION
        with self.init_scope():
            self.conv1 = _conv(in_channels, width, 1, stride=stride)
            self.bn1 = L.BatchNormalization(width)
            self.conv2 = _conv(width, width, 3, pad=1)
            self.bn2 = L.BatchNormalization(width)
            self.conv3 = _conv(width, out_channels, 1)
            self.bn3 = L.BatchNormalization(out_channels)
            if projection:
                self.conv4 = _conv(in_channels, out_channels, 1,
                                   stride=stride)
                self.bn4 = L.BatchNormalization(out_channels)
        self.projection = projection

    def forward(self, x: typing.Union[chainer.Variable, NdArray]
                ) -> chainer.Variable:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = self.bn4(self.conv4(x)) if self.projection else x
        return F.relu(h + shortcut)


class Stage(chainer.ChainList):
    """``n_blocks`` bottlenecks; the first one projects (and strides)."""

    def __init__(self, n_blocks, in_channels, width, stride):
        super(Stage, self).__init__()
        self.add_link(BottleNeck(in_channels, width, stride, projection=True))
        for _ in range(n_blocks - 1):
            self.add_link(BottleNeck(width * EXPANSION, width))

    def forward(self, x: typing.Union[chainer.Variable, NdArray]
                ) -> chainer.Variable:
        for block in self.children():
            x = block(x)
        return x


class ResNet50(chainer.Chain):
    """ResNet-50; ``forward(x)`` returns the logits ``(n, n_class)``.

    Args:
        n_class (int): outputs of the final FC (1000 for ImageNet-1k).
        width (float): the channel widths (64, 64/128/256/512) times
            ``width``, rounded, at least 1: 1 is the paper's network; a
            smaller value keeps its 107 layers and their layout with smaller
            factors (the synthetic job and tests use 1/8).

    Any input of spatial size >= 32 works (the pooling before the FC averages
    over whatever spatial size remains).
    """

    def __init__(self, n_class=1000, width=1.0):
        super(ResNet50, self).__init__()
        if not width > 0:
            raise ValueError('width must be positive, got {}'.format(width))

        def channels(c):
            return max(1, int(round(c * width)))
        with self.init_scope():
            self.conv1 = _conv(3, channels(64), 7, stride=2, pad=3)
            self.bn1 = L.BatchNormalization(channels(64))
            in_channels = channels(64)
            for i, (n_blocks, stage_width, stride) in enumerate(STAGES):
                stage_width = channels(stage_width)
                setattr(self, 'res{}'.format(i + 2),
                        Stage(n_blocks, in_channels, stage_width, stride))
                in_channels = stage_width * EXPANSION
            self.fc = L.Linear(in_channels, n_class,
                               initialW=chainer.initializers.HeNormal())

    def forward(self, x: typing.Union[chainer.Variable, NdArray]
                ) -> chainer.Variable:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pooling_2d(h, 3, stride=2)
        h = self.res2(h)
        h = self.res3(h)
        h = self.res4(h)
        h = self.res5(h)
        h = F.average(h, axis=(2, 3))
        return self.fc(h)
