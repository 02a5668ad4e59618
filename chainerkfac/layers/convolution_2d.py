"""K-FAC block of ``chainer.links.Convolution2D`` (KFC)."""

import numpy

from chainer import backend
import chainer.functions.connection.convolution_2d as convolution_function
import chainer.links as L
from chainer.utils import conv

from chainerkfac.layers import kronecker


def patches(function, x):
    """im2col patches of ``x`` as (C·kh·kw, n·T), rows in W's order."""
    _, _, kh, kw = function.inputs[1].shape
    xp = backend.get_array_module(x)
    im2col = conv.im2col_cpu if xp is numpy else conv.im2col_gpu
    col = im2col(x, kh, kw, function.sy, function.sx, function.ph,
                 function.pw, cover_all=function.cover_all,
                 dy=function.dy, dx=function.dx)
    n, c, _, _, oh, ow = col.shape
    # (n, C, kh, kw, oh, ow) -> (C, kh, kw, n, oh, ow) -> (C·kh·kw, n·T)
    return col.transpose(1, 2, 3, 0, 4, 5).reshape(c * kh * kw, n * oh * ow)


class Convolution2DLayer(kronecker.KroneckerLayer):
    """KFC: A = Σ_i Σ_t a aᵀ / n, G = Σ_i Σ_t g gᵀ / (n·T)."""

    link_type = L.Convolution2D
    function_type = convolution_function.Convolution2DFunction

    def check_link(self):
        link = self.link
        dilate = link.dilate if isinstance(link.dilate, tuple) else (
            link.dilate, link.dilate)
        if link.groups != 1 or dilate != (1, 1):
            raise ValueError(
                'K-FAC covers Convolution2D with groups=1 and dilate=1 only; '
                'link {} has groups={} dilate={}'.format(
                    self.name, link.groups, link.dilate))

    def input_columns(self, function, x):
        return patches(function, x), x.shape[0]

    def output_columns(self, function, gy):
        n, c, oh, ow = gy.shape
        g = gy.transpose(1, 0, 2, 3).reshape(c, n * oh * ow)
        return g, n * oh * ow
