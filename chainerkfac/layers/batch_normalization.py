"""K-FAC block of ``chainer.links.BatchNormalization`` (Sec. 5.4).

The Fisher of (γ, β) is not factorized: it is the full 2C × 2C matrix or its
diagonal (the paper's choice), built from the per-sample gradients
u_i = Σ_t g_{i,c,t} x̂_{i,c,t} and v_i = Σ_t g_{i,c,t}.  A link without γ
(``use_gamma=False``) or without β (``use_beta=False``) has the Fisher of
the one parameter it has: of u alone or of v alone (C × C, or C values).
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
    """F = Σ_i [u_i; v_i][u_i; v_i]ᵀ / n, or its diagonal."""

    link_type = L.BatchNormalization
    function_type = bn_function.BatchNormalization
    factor_names = ('F',)
    intervals = {'F': 'g_interval'}

    def __init__(self, name, link, factor_dtype, diagonal=True):
        self.diagonal = diagonal
        super(BatchNormalizationLayer, self).__init__(name, link, factor_dtype)

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
        uv = xp.concatenate(parts, axis=1).T * multiplier
        return {'F': factors.second_moment(uv, n, self.factor_dtype,
                                           diagonal=self.diagonal)}

    def damped_blocks(self, damping: float,
                      bn_damping_ratio: float) -> dict:
        F = self.factor('F')
        gamma_bn = damping_module.bn_damping(damping, bn_damping_ratio)
        return {'F': (F, gamma_bn)}

    def precondition(self, method: str = 'solve') -> None:
        """(F + ρ_BN·γ·I)⁻¹ ∇ with ∇ = [∇γ; ∇β] (or the one present)."""
        params = self.params
        xp = backend.get_array_module(params[0].grad)
        f_inv = self.state['F_inv']
        grad = xp.concatenate([p.grad.ravel() for p in params]).astype(
            f_inv.dtype, copy=False)
        direction = f_inv * grad if self.diagonal else \
            self.apply_inverse('F', grad, method)
        offset = 0
        for p in params:
            p.grad[...] = direction[offset:offset + p.size].reshape(p.shape)
            offset += p.size
