"""K-FAC block of ``chainer.links.DilatedConvolution2D``.

The link runs ``F.convolution_2d`` with ``dilate``: the block is
Convolution2D's (KFC, with the patches at the dilated taps).
"""

import chainer
import chainer.links as L

from chainerkfac.layers import convolution_2d


class DilatedConvolution2DLayer(convolution_2d.Convolution2DLayer):
    """As :class:`Convolution2DLayer`."""

    link_type = L.DilatedConvolution2D

    @classmethod
    def covers(cls, link: chainer.Link) -> bool:
        return isinstance(link, cls.link_type)
