"""K-FAC block of ``chainer.links.BatchNormalization`` (Sec. 5.4).

The Fisher of (γ, β) is not factorized: it is the full 2C × 2C matrix, its
diagonal (the paper's choice), or unit-wise (SP-NGD, Osawa et al. 2020: one
2 × 2 block over (γ_c, β_c) per channel, kept as the 3C values
[F_γγ; F_γβ; F_ββ]), built from the per-sample gradients
u_i = Σ_t g_{i,c,t} x̂_{i,c,t} and v_i = Σ_t g_{i,c,t}.  A link without γ
(``use_gamma=False``) or without β (``use_beta=False``) has the Fisher of
the one parameter it has: of u alone or of v alone (C × C, or C values;
unit-wise is then the diagonal).
"""

import typing

import chainer
from chainer import backend
import chainer.functions.normalization.batch_normalization as bn_function
import chainer.links as L
from chainer.types import NdArray

from chainerkfac import damping as damping_module
from chainerkfac import factors
from chainerkfac.layers import base


class BatchNormalizationLayer(base.Layer):
    """F = Σ_i [u_i; v_i][u_i; v_i]ᵀ / n, its diagonal, or its unit-wise
    2 × 2 blocks.

    Args:
        mode (str): ``'diagonal'``, ``'full'`` or ``'unit'``
            (:data:`chainerkfac.options.BN_FISHER`); ``diagonal`` (bool)
            says the first two.
    """

    link_type = L.BatchNormalization
    function_type = bn_function.BatchNormalization
    factor_names = ('F',)
    intervals = {'F': 'g_interval'}

    def __init__(self, name, link, factor_dtype, diagonal=True, mode=None):
        self.mode = mode or ('diagonal' if diagonal else 'full')
        super(BatchNormalizationLayer, self).__init__(name, link, factor_dtype)
        if self.mode == 'unit' and len(self.params) == 1:
            self.mode = 'diagonal'  # one parameter: its 1 × 1 blocks
        #: whether F is kept as its diagonal
        self.diagonal = self.mode == 'diagonal'
        #: whether F is kept as its unit-wise 2 × 2 blocks
        self.unit = self.mode == 'unit'

    @classmethod
    def unsupported(cls, link: chainer.Link) -> typing.Optional[str]:
        if isinstance(link, L.BatchRenormalization):
            return 'BatchRenormalization: its function is not ' \
                'BatchNormalization\'s'
        if link.gamma is None and link.beta is None:
            return 'BatchNormalization without gamma and beta has no ' \
                'parameter'
        return super(BatchNormalizationLayer, cls).unsupported(link)

    @property
    def params(self) -> list:
        return [p for p in (self.link.gamma, self.link.beta)
                if p is not None]

    @property
    def param_input(self) -> int:
        # the function's inputs are (x, gamma, beta), constants standing in
        # for a parameter the link does not have
        return 1 if self.link.gamma is not None else 2

    def factor_shapes(self) -> dict:
        dim = sum(p.size for p in self.params)
        if self.unit:
            return {'F': (3 * dim // 2,)}  # [F_γγ; F_γβ; F_ββ]
        return {'F': (dim,) if self.diagonal else (dim, dim)}

    def build(self, function: chainer.FunctionNode, in_data: tuple,
              gy: NdArray, multiplier: float, names: typing.Iterable) -> dict:
        if 'F' not in names:
            return {}
        # float16 inputs (mixed precision) are summed in float32
        dtype = factors.compute_dtype(in_data[0].dtype)
        x = in_data[0].astype(dtype, copy=False)
        gy = gy.astype(dtype, copy=False)
        axis = function.axis
        expander = tuple(slice(None) if i not in axis else None
                         for i in range(x.ndim))
        x_hat = (x - function.mean[expander]) * function.inv_std[expander]
        per_sample = tuple(i for i in axis if i != 0)
        n = x.shape[0]
        parts = []
        if self.link.gamma is not None:
            parts.append((gy * x_hat).sum(axis=per_sample).reshape(n, -1))
        if self.link.beta is not None:
            parts.append(gy.sum(axis=per_sample).reshape(n, -1))
        xp = backend.get_array_module(parts[0])
        if self.unit:
            u, v = parts[0] * multiplier, parts[1] * multiplier
            blocks = xp.concatenate([(u * u).sum(axis=0), (u * v).sum(axis=0),
                                     (v * v).sum(axis=0)]) / dtype.type(n)
            return {'F': factors.quantize(blocks, self.factor_dtype)}
        uv = xp.concatenate(parts, axis=1).T * multiplier
        return {'F': factors.second_moment(uv, n, self.factor_dtype,
                                           diagonal=self.diagonal)}

    def damped_blocks(self, damping: float,
                      bn_damping_ratio: float) -> dict:
        F = self.factor('F')
        gamma_bn = damping_module.bn_damping(damping, bn_damping_ratio)
        return {'F': (F, gamma_bn)}

    def vector_inverse(self, name: str, factor: NdArray,
                       added: float) -> NdArray:
        """The damped inverse of the diagonal F (its reciprocals), or of the
        unit-wise one: per channel the closed-form inverse of
        [[F_γγ + λ, F_γβ], [F_γβ, F_ββ + λ]], as its 3C values."""
        if not self.unit:
            return super(BatchNormalizationLayer, self).vector_inverse(
                name, factor, added)
        xp = backend.get_array_module(factor)
        a, b, d = xp.split(factor, 3)
        a, d = a + added, d + added
        det = a * d - b * b
        return xp.concatenate([d / det, -b / det, a / det])

    def precondition(self, method: str = 'solve') -> None:
        """(F + ρ_BN·γ·I)⁻¹ ∇ with ∇ = [∇γ; ∇β] (or the one present);
        unit-wise, a 2 × 2 product per channel."""
        params = self.params
        xp = backend.get_array_module(params[0].grad)
        f_inv = self.state['F_inv']
        grad = xp.concatenate([p.grad.ravel() for p in params]).astype(
            f_inv.dtype, copy=False)
        if self.unit:
            gg, gb = xp.split(grad, 2)
            i_gg, i_gb, i_bb = xp.split(f_inv, 3)
            direction = xp.concatenate([i_gg * gg + i_gb * gb,
                                        i_gb * gg + i_bb * gb])
        elif self.diagonal:
            direction = f_inv * grad
        else:
            direction = self.apply_inverse('F', grad, method)
        offset = 0
        for p in params:
            p.grad[...] = direction[offset:offset + p.size].reshape(p.shape)
            offset += p.size
