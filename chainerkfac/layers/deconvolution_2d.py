"""K-FAC block of ``chainer.links.Deconvolution2D`` (transposed convolution).

W has shape (in, out, kh, kw); as a matrix M = W.reshape(in, out·kh·kw) its
gradient is ∇M = Σ_t x_t c_tᵀ over the input positions t, where x_t is the
input at t and c_t the patch of the output gradient that position t
reaches (the output gradient's im2col with the deconvolution's stride, pad
and dilation: how Chainer computes ∇W).  KFC on that form:

    A = Σ_i Σ_t x xᵀ / n           (in × in, the input side)
    G = Σ_i Σ_t c cᵀ / (n·T)       (out·kh·kw square, the gradient side)

and 𝒢 = Ā⁻¹ ∇M Ḡ⁻¹ (the input side is M's row space here).  The bias, one
value per output channel added at every output position, does not fit
M's columns: it stays on the raw gradient (and is reported so).  Grouped
deconvolutions are not covered.
"""

import typing

import chainer
import chainer.functions.connection.deconvolution_2d as deconv_function
import chainer.links as L
from chainer.types import NdArray

from chainerkfac import factors
from chainerkfac.layers import convolution_2d
from chainerkfac.layers import kronecker


class Deconvolution2DLayer(kronecker.KroneckerLayer):
    """A from the input, G from the output gradient's patches (the
    damping of :class:`KroneckerLayer`; eq. 18 does not apply: W's first
    axis is the input's)."""

    link_type = L.Deconvolution2D
    function_type = deconv_function.Deconvolution2DFunction
    rescales_weight = False

    @classmethod
    def unsupported(cls, link: chainer.Link) -> typing.Optional[str]:
        if getattr(link, 'groups', 1) != 1:
            return 'grouped Deconvolution2D (groups={}) not covered'.format(
                link.groups)
        return super(Deconvolution2DLayer, cls).unsupported(link)

    @property
    def params(self) -> list:
        return [self.link.W]

    def factor_shapes(self) -> dict:
        w = self.link.W
        dim_g = w.size // w.shape[0]
        return {'A': (w.shape[0], w.shape[0]), 'G': (dim_g, dim_g)}

    def build(self, function: chainer.FunctionNode, in_data: tuple,
              gy: NdArray, multiplier: float, names: typing.Iterable) -> dict:
        x = in_data[0]
        n = x.shape[0]
        out = {}
        if 'A' in names:
            cols = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
            out['A'] = factors.second_moment(cols, n, self.factor_dtype)
        if 'G' in names:
            if function.cover_all is None:
                # as Chainer's backward sets it (its own W-only branch
                # passes arrays where it wants shapes)
                function._set_cover_all(x.shape, in_data[1].shape)
            c = convolution_2d.patches(function, gy)
            data, scale = factors.second_moment(c, c.shape[1],
                                                self.factor_dtype)
            out['G'] = data, factors.times(scale, multiplier * multiplier)
        return out

    def precondition(self, method: str = 'solve') -> None:
        """𝒢 = Ā⁻¹ ∇M Ḡ⁻¹, computed as Ā⁻¹ (Ḡ⁻¹ ∇Mᵀ)ᵀ."""
        w = self.link.W
        grad = w.grad.reshape(w.shape[0], -1)
        x = self.apply_inverse('G', grad.T, method)
        w.grad[...] = self.apply_inverse('A', x.T, method).reshape(w.shape)
