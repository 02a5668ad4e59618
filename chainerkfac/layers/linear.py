"""K-FAC block of ``chainer.links.Linear``."""

import chainer.functions.connection.linear as linear_function
import chainer.links as L

from chainerkfac.layers import kronecker


class LinearLayer(kronecker.KroneckerLayer):
    """a_i = x_i (+1), g_i = ∂ℓ_i/∂y_i; A = Σ a aᵀ / n, G = Σ g gᵀ / n."""

    link_type = L.Linear
    function_type = linear_function.LinearFunction

    def input_columns(self, function, x):
        x = x.reshape(x.shape[0], -1)
        return x.T, x.shape[0]

    def output_columns(self, function, gy):
        return gy.T, gy.shape[0]
