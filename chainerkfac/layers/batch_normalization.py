"""K-FAC block of ``chainer.links.BatchNormalization`` (Sec. 5.4).

The Fisher of (γ, β) is not factorized: it is the full 2C × 2C matrix or its
diagonal (the paper's choice), built from the per-sample gradients
u_i = Σ_t g_{i,c,t} x̂_{i,c,t} and v_i = Σ_t g_{i,c,t}.
"""

from chainer import backend
import chainer.functions.normalization.batch_normalization as bn_function
import chainer.links as L

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
    def unsupported(cls, link):
        if isinstance(link, L.BatchRenormalization):
            return 'BatchRenormalization: its function is not ' \
                'BatchNormalization\'s'
        if link.gamma is None or link.beta is None:
            return 'BatchNormalization without gamma or beta not covered'
        return super(BatchNormalizationLayer, cls).unsupported(link)

    @property
    def params(self):
        return [self.link.gamma, self.link.beta]

    def factor_shapes(self):
        dim = 2 * self.link.gamma.size
        return {'F': (dim,) if self.diagonal else (dim, dim)}

    def build(self, function, in_data, gy, multiplier, names):
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
        u = (gy * x_hat).sum(axis=per_sample).reshape(n, -1)
        v = gy.sum(axis=per_sample).reshape(n, -1)
        xp = backend.get_array_module(u)
        uv = xp.concatenate([u, v], axis=1).T * multiplier
        return {'F': factors.second_moment(uv, n, self.factor_dtype,
                                           diagonal=self.diagonal)}

    def damped_blocks(self, damping, bn_damping_ratio):
        F = self.factor('F')
        gamma_bn = damping_module.bn_damping(damping, bn_damping_ratio)
        if self.diagonal:
            self.set_inverse('F', 1 / (F + gamma_bn))
            return {}
        return {'F': (F, gamma_bn)}

    def precondition(self, method='solve'):
        """(F + ρ_BN·γ·I)⁻¹ ∇ with ∇ = [∇γ; ∇β]."""
        gamma, beta = self.params
        xp = backend.get_array_module(gamma.grad)
        f_inv = self.state['F_inv']
        grad = xp.concatenate([gamma.grad.ravel(), beta.grad.ravel()]).astype(
            f_inv.dtype, copy=False)
        direction = f_inv * grad if self.diagonal else \
            self.apply_inverse('F', grad, method)
        c = gamma.size
        gamma.grad[...] = direction[:c].reshape(gamma.shape)
        beta.grad[...] = direction[c:].reshape(beta.shape)
