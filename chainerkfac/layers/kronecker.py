"""Kronecker-factored blocks F ≈ G ⊗ A (eq. 5) for Linear and Convolution."""

import typing

from chainerkfac import factors
from chainerkfac.layers import base


class KroneckerLayer(base.Layer):
    """A block with A (input side) and G (output-gradient side) factors.

    Subclasses provide ``input_columns`` and ``output_columns``: the sampled
    vectors a and g as the columns of a 2-D array, with their normalizers.
    """

    #: eq. 18 applies to its weight (a Linear or Convolution2D weight)
    rescales_weight = True

    factor_names = ('A', 'G')
    intervals = {'A': 'a_interval', 'G': 'g_interval'}
    summed_over_uses = 'A'  # A = Σ_uses A_use, G = Σ_uses G_use / U

    @property
    def params(self) -> list:
        return base.weight_and_bias(self.link)

    def factor_shapes(self) -> dict:
        dim_a, dim_g = base.input_dim(self.link), self.link.W.shape[0]
        return {'A': (dim_a, dim_a), 'G': (dim_g, dim_g)}

    def input_columns(self, function: typing.Any, x: typing.Any,
                      ones_row: bool) -> tuple:
        """``(a, count)``: a of shape (dim A, m), with a last row of ones
        when ``ones_row`` (the bias input)."""
        raise NotImplementedError

    def output_columns(self, function: typing.Any,
                       gy: typing.Any) -> tuple:
        """``(g, count)``: g of shape (dim G, m), before the multiplier."""
        raise NotImplementedError

    def build(self, function: typing.Any, in_data: typing.Sequence,
              gy: typing.Any, multiplier: float,
              names: typing.Iterable[str]) -> dict:
        out = {}
        if 'A' in names:
            a, count = self.input_columns(function, in_data[0],
                                          self.link.b is not None)
            out['A'] = factors.second_moment(a, count, self.factor_dtype)
        if 'G' in names:
            g, count = self.output_columns(function, gy)
            data, scale = factors.second_moment(g, count, self.factor_dtype)
            out['G'] = data, factors.times(scale, multiplier * multiplier)
        return out

    def damped_blocks(self, damping: float,
                      bn_damping_ratio: float) -> dict:
        a, g = self.damped_pair(damping)
        return {'A': a, 'G': g}

    def precondition(self, method: str = 'solve') -> None:
        """𝒢 = Ḡ⁻¹ ∇ Ā⁻¹, computed as Ḡ⁻¹ (Ā⁻¹ ∇ᵀ)ᵀ."""
        grad = base.grad_matrix(self.params)
        x = self.apply_inverse('A', grad.T, method)
        base.set_grad_matrix(self.params,
                             self.apply_inverse('G', x.T, method))
