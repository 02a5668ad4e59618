"""Small nets shared by the tests."""

import chainer
import chainer.functions as F
import chainer.links as L


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
