"""Damping: the factored Tikhonov split of γ between A and G (eq. 12-14)."""

import math

from chainer import backend


def pi(A, G):
    """π = sqrt((tr A / dim A) / (tr G / dim G)); 1 when either trace is 0."""
    xp = backend.get_array_module(A)
    mean_a = float(xp.trace(A)) / A.shape[0]
    mean_g = float(xp.trace(G)) / G.shape[0]
    if not (mean_a > 0 and mean_g > 0
            and math.isfinite(mean_a) and math.isfinite(mean_g)):
        return 1.0
    return math.sqrt(mean_a / mean_g)


def kronecker_damping(A, G, damping):
    """(π·√γ, √γ/π): what is added to the diagonals of A and of G."""
    p = pi(A, G)
    root = math.sqrt(damping)
    return p * root, root / p


def bn_damping(damping, bn_damping_ratio):
    """γ_BN = ρ_BN·γ: the damping of the BatchNormalization Fisher."""
    return bn_damping_ratio * damping
