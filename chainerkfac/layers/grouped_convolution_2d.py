"""K-FAC block of a grouped ``chainer.links.Convolution2D`` (ResNeXt).

With g groups, output channels of group j see only input channels of group
j through their own slice of W: the gradient of W is block-diagonal in the
groups, and each group is its own KFC block (A_j from group j's input
patches, G_j from its output gradients), damped and inverted on its own:
𝒢_j = Ḡ_j⁻¹ [∇W_j | ∇b_j] Ā_j⁻¹.
"""

import typing

import chainer
from chainer import backend
import chainer.functions.connection.convolution_2d as convolution_function
import chainer.links as L
from chainer.types import NdArray

from chainerkfac import factors
from chainerkfac.layers import base
from chainerkfac.layers import convolution_2d


class GroupedConvolution2DLayer(base.Layer):
    """Per group j: A_j = Σ_i Σ_t a aᵀ / n, G_j = Σ_i Σ_t g gᵀ / (n·T)."""

    #: eq. 18 applies to its weight (a Linear or Convolution2D weight)
    rescales_weight = True
    summed_over_uses = 'A'

    link_type = L.Convolution2D
    function_type = convolution_function.Convolution2DFunction

    def __init__(self, name, link, factor_dtype=None):
        groups = link.groups
        self.factor_names = tuple(
            '{}{}'.format(k, j) for j in range(groups) for k in 'AG')
        self.intervals = dict(
            ('{}{}'.format(k, j), 'a_interval' if k == 'A' else 'g_interval')
            for j in range(groups) for k in 'AG')
        super(GroupedConvolution2DLayer, self).__init__(name, link,
                                                        factor_dtype)

    @classmethod
    def covers(cls, link: chainer.Link) -> bool:
        return isinstance(link, cls.link_type) and link.groups > 1

    @property
    def groups(self) -> int:
        return self.link.groups

    @property
    def params(self) -> list:
        return base.weight_and_bias(self.link)

    def factor_shapes(self) -> dict:
        dim_a = base.input_dim(self.link)
        dim_g = self.link.W.shape[0] // self.groups
        out = {}
        for j in range(self.groups):
            out['A{}'.format(j)] = (dim_a, dim_a)
            out['G{}'.format(j)] = (dim_g, dim_g)
        return out

    def build(self, function: chainer.FunctionNode, in_data: tuple,
              gy: NdArray, multiplier: float, names: typing.Iterable) -> dict:
        g = self.groups
        x = in_data[0]
        n, c = x.shape[:2]
        cg = c // g
        out = {}
        for j in range(g):
            if 'A{}'.format(j) in names:
                a = convolution_2d.patches(
                    function, x[:, j * cg:(j + 1) * cg],
                    self.link.b is not None)
                out['A{}'.format(j)] = factors.second_moment(
                    a, n, self.factor_dtype)
            if 'G{}'.format(j) in names:
                og = gy.shape[1] // g
                part = gy[:, j * og:(j + 1) * og]
                cols = part.transpose(1, 0, 2, 3).reshape(og, -1)
                data, scale = factors.second_moment(cols, cols.shape[1],
                                                    self.factor_dtype)
                out['G{}'.format(j)] = data, factors.times(
                    scale, multiplier * multiplier)
        return out

    def damped_blocks(self, damping: float,
                      bn_damping_ratio: float) -> dict:
        out = {}
        for j in range(self.groups):
            a, g = 'A{}'.format(j), 'G{}'.format(j)
            out[a], out[g] = self.damped_pair(damping, a, g)
        return out

    def precondition(self, method: str = 'solve') -> None:
        grad = base.grad_matrix(self.params)
        xp = backend.get_array_module(grad)
        og = grad.shape[0] // self.groups
        parts = []
        for j in range(self.groups):
            block = grad[j * og:(j + 1) * og]
            x = self.apply_inverse('A{}'.format(j), block.T, method)
            parts.append(self.apply_inverse('G{}'.format(j), x.T, method))
        base.set_grad_matrix(self.params, xp.concatenate(parts, axis=0))
