"""K-FAC's step bound (Ba, Grosse and Martens, ICLR 2017; KAISA's default
``kl_clip=0.001``), an option beyond the paper.

The preconditioned gradients 𝒢 of the K-FAC layers are scaled by

    ν = min(1, sqrt(kl_clip / |η² Σ_l 𝒢_l · ∇L_l|)),

so that the second-order change of the loss the step predicts stays at most
``kl_clip``.  ``Σ_l 𝒢_l · ∇L_l`` runs over the K-FAC layers (each counted
once, on the process that preconditions it, then summed over processes).
"""

import numpy

from chainer import backend
from chainer.types import NdArray


def inner_product(direction: NdArray, gradient: NdArray) -> NdArray:
    """``Σ 𝒢 · ∇L`` of one parameter, as a 0-d array (float32 or wider)."""
    dtype = numpy.promote_types(direction.dtype, numpy.float32)
    return (direction.astype(dtype, copy=False) *
            gradient.astype(dtype, copy=False)).sum()


def nu(vg: NdArray, lr: float, kl_clip: float) -> NdArray:
    """ν = min(1, sqrt(kl_clip / |η²·vg|)) as a 0-d array on vg's device
    (1 when vg is 0), without a host synchronization."""
    xp = backend.get_array_module(vg)
    dtype = vg.dtype.type
    quadratic = xp.abs(vg * dtype(lr * lr))
    tiny = dtype(numpy.finfo(vg.dtype).tiny)
    return xp.minimum(dtype(1), xp.sqrt(dtype(kl_clip) /
                                        xp.maximum(quadratic, tiny)))
