"""K-FAC block of ``chainer.links.Convolution2D`` (KFC), dilated or not.

Dilation only spaces the patch: a_{i,t} is the input at the kernel's
dilated taps (zero outside the padded input), in W's order.
"""

import chainer
from chainer import backend
import chainer.functions.connection.convolution_2d as convolution_function
import chainer.links as L
from chainer.types import NdArray
from chainer.utils import conv

from chainerkfac.layers import kronecker


def patches(function: chainer.FunctionNode, x: NdArray,
            ones_row: bool = False) -> NdArray:
    """im2col patches of ``x`` as (C·kh·kw [+1], n·T), rows in W's order.

    Written straight into the layout the symmetric product wants (one copy
    of the patches, no transpose afterwards); ``ones_row`` appends the row of
    ones of the bias input in the same buffer.
    """
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    _, _, kh, kw = function.inputs[1].shape
    sy, sx, dy, dx = function.sy, function.sx, function.dy, function.dx
    oh = conv.get_conv_outsize(h, kh, sy, function.ph, function.cover_all, dy)
    ow = conv.get_conv_outsize(w, kw, sx, function.pw, function.cover_all, dx)
    if function.ph or function.pw or function.cover_all:
        # as Chainer's im2col: the extra s-1 keeps every slice full length
        x = xp.pad(x, ((0, 0), (0, 0), (function.ph, function.ph + sy - 1),
                       (function.pw, function.pw + sx - 1)), mode='constant')
    rows = c * kh * kw
    out = xp.empty((rows + bool(ones_row), n * oh * ow), dtype=x.dtype)
    view = out[:rows].reshape(c, kh, kw, n, oh, ow)
    for j in range(kh):
        for i in range(kw):
            window = x[:, :, j * dy:j * dy + sy * oh:sy,
                       i * dx:i * dx + sx * ow:sx]
            view[:, j, i] = window.transpose(1, 0, 2, 3)
    if ones_row:
        out[rows] = 1
    return out


class Convolution2DLayer(kronecker.KroneckerLayer):
    """KFC: A = Σ_i Σ_t a aᵀ / n, G = Σ_i Σ_t g gᵀ / (n·T)."""

    link_type = L.Convolution2D
    function_type = convolution_function.Convolution2DFunction

    @classmethod
    def covers(cls, link: chainer.Link) -> bool:
        return isinstance(link, cls.link_type) and link.groups == 1

    def input_columns(self, function: chainer.FunctionNode, x: NdArray,
                      ones_row: bool) -> tuple:
        return patches(function, x, ones_row), x.shape[0]

    def output_columns(self, function: chainer.FunctionNode,
                       gy: NdArray) -> tuple:
        n, c, oh, ow = gy.shape
        g = gy.transpose(1, 0, 2, 3).reshape(c, n * oh * ow)
        return g, n * oh * ow
