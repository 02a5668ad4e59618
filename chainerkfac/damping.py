"""Damping: the factored Tikhonov split of γ between A and G (eq. 12-14).

The values stay on the factors' device (0-d arrays): computing them needs no
host synchronization.
"""

import math

from chainer import backend
from chainer.types import NdArray


def pi(A: NdArray, G: NdArray) -> NdArray:
    """π = sqrt((tr A / dim A) / (tr G / dim G)) (a 1-d factor is a
    diagonal); 1 when either mean
    diagonal is not positive and finite.  A 0-d array on A's device."""
    xp = backend.get_array_module(A)

    def mean_diagonal(M):  # a 1-d factor is a diagonal
        total = M.sum() if M.ndim == 1 else xp.trace(M)
        return total / M.dtype.type(M.shape[0])  # keeps the dtype
    mean_a = mean_diagonal(A)
    mean_g = mean_diagonal(G)
    ok = (mean_a > 0) & (mean_g > 0) & xp.isfinite(mean_a) & \
        xp.isfinite(mean_g)
    one = xp.ones((), mean_a.dtype)
    return xp.where(ok, xp.sqrt(xp.where(ok, mean_a, one) /
                                xp.where(ok, mean_g, one)), one)


def kronecker_damping(A: NdArray, G: NdArray,
                      damping: float) -> tuple:
    """(π·√γ, √γ/π): what is added to the diagonals of A and of G."""
    p = pi(A, G)
    root = p.dtype.type(math.sqrt(damping))  # keeps π's dtype
    return p * root, root / p


def bn_damping(damping: float, bn_damping_ratio: float) -> float:
    """γ_BN = ρ_BN·γ: the damping of the BatchNormalization Fisher."""
    return bn_damping_ratio * damping
