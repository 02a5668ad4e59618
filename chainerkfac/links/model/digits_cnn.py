"""A small convolutional network with BatchNormalization for 8×8 digits."""

import typing

import chainer
import chainer.functions as F
import chainer.links as L
from chainer.types import NdArray


class DigitsCNN(chainer.Chain):
    """conv3×3(16)-BN-ReLU, conv3×3/2(32)-BN-ReLU, FC(10); returns logits."""

    def __init__(self, n_class=10, width=16):
        super(DigitsCNN, self).__init__()
        w = chainer.initializers.HeNormal()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, width, 3, pad=1, nobias=True,
                                         initialW=w)
            self.bn1 = L.BatchNormalization(width)
            self.conv2 = L.Convolution2D(width, 2 * width, 3, stride=2,
                                         pad=1, nobias=True, initialW=w)
            self.bn2 = L.BatchNormalization(2 * width)
            self.fc = L.Linear(2 * width * 4 * 4, n_class, initialW=w)

    def forward(self, x: typing.Union[chainer.Variable, NdArray]
                ) -> chainer.Variable:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h)
