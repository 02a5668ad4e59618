"""Inverse of damped symmetric positive-definite blocks by Cholesky.

NumPy arrays go through LAPACK ``potrf``/``potri`` (SciPy); CuPy arrays
through cuSOLVER (``cupyx.lapack.posv``).  The result is symmetric and in
float32 or wider.  A block that is not positive definite even with its
damping is retried with ten times more damping a few times (a warning is
issued once); a block with non-finite entries raises ``FloatingPointError``
so that nothing non-finite reaches the weights.
"""

import warnings

import numpy
import scipy.linalg

from chainer import backend

from chainerkfac import factors


MAX_RETRIES = 8
_warned = [False]


class NotPositiveDefinite(numpy.linalg.LinAlgError):
    pass


def _cholesky_inverse_numpy(m):
    potrf, potri = scipy.linalg.lapack.get_lapack_funcs(('potrf', 'potri'),
                                                         (m,))
    c, info = potrf(m, lower=False, overwrite_a=True, clean=False)
    if info > 0:
        raise NotPositiveDefinite(info)
    inv, info = potri(c, lower=False, overwrite_c=True)
    if info != 0:
        raise NotPositiveDefinite(info)
    upper = numpy.triu(inv)
    upper += numpy.triu(inv, 1).T
    return upper


def _cholesky_inverse_cupy(m):
    import cupy
    from cupyx import lapack
    # cuSOLVER reports a failed factorization as NaN under cupyx's default
    # errstate (linalg='ignore').
    inv = lapack.posv(m, cupy.eye(m.shape[0], dtype=m.dtype))
    if not bool(cupy.isfinite(inv).all()):
        raise NotPositiveDefinite(1)
    return (inv + inv.T) / 2


def cholesky_inverse(m):
    """Inverse of an SPD matrix (raises NotPositiveDefinite otherwise)."""
    xp = backend.get_array_module(m)
    if xp is numpy:
        return _cholesky_inverse_numpy(m)
    return _cholesky_inverse_cupy(m)


def inverse(matrix, damping=0.0):
    """(matrix + damping·I)⁻¹ of a symmetric matrix, in float32 or wider."""
    xp = backend.get_array_module(matrix)
    m = matrix.astype(factors.compute_dtype(matrix.dtype))
    if not bool(xp.isfinite(m).all()):
        raise FloatingPointError(
            'K-FAC factor has non-finite entries: the loss or the gradients '
            'are not finite')
    diag = xp.arange(m.shape[0])
    scale = float(xp.abs(m[diag, diag]).mean()) if m.size else 1.0
    extra = damping
    for retry in range(MAX_RETRIES + 1):
        damped = m.copy()
        damped[diag, diag] += extra
        try:
            return cholesky_inverse(damped)
        except NotPositiveDefinite:
            if not _warned[0]:
                warnings.warn(
                    'K-FAC factor of size {} is not positive definite with '
                    'damping {:g}; retrying with 10x more damping'.format(
                        m.shape[0], extra), RuntimeWarning)
                _warned[0] = True
            extra = max(extra * 10, scale * 1e-6,
                        numpy.finfo(m.dtype).tiny)
    raise FloatingPointError(
        'K-FAC factor of size {} is not positive definite even with damping '
        '{:g}'.format(m.shape[0], extra))
