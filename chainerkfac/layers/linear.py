"""K-FAC block of ``chainer.links.Linear``."""

import chainer
import chainer.functions.connection.linear as linear_function
import chainer.links as L
from chainer.types import NdArray

from chainerkfac import factors
from chainerkfac.layers import kronecker


class LinearLayer(kronecker.KroneckerLayer):
    """a_i = x_i (+1), g_i = ∂ℓ_i/∂y_i; A = Σ a aᵀ / n, G = Σ g gᵀ / n."""

    link_type = L.Linear
    function_type = linear_function.LinearFunction

    def input_columns(self, function: chainer.FunctionNode, x: NdArray,
                      ones_row: bool) -> tuple:
        x = x.reshape(x.shape[0], -1)
        a = factors.with_ones_row(x.T) if ones_row else x.T
        return a, x.shape[0]

    def output_columns(self, function: chainer.FunctionNode,
                       gy: NdArray) -> tuple:
        return gy.T, gy.shape[0]
