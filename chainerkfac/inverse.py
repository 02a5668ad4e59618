"""Inverses of damped symmetric positive-definite blocks, by Cholesky.

The optimizer keeps the Cholesky factor L of each damped block (LAPACK
``potrf`` through SciPy on NumPy, cuSOLVER through CuPy) and applies the
inverse with two triangular solves (``potrs``): that skips the 2n³/3 flops of
forming the explicit inverse (``potri``).  :func:`inverse` forms it anyway,
for callers that want the matrix.

Everything runs in float32 or wider.  A block that is not positive definite
even with its damping is retried with ten times more damping a few times (a
warning is issued once); a block with non-finite entries raises
``FloatingPointError`` so that nothing non-finite reaches the weights.
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


def _potrf_numpy(m):
    potrf, = scipy.linalg.lapack.get_lapack_funcs(('potrf',), (m,))
    c, info = potrf(m, lower=True, overwrite_a=True, clean=True)
    if info != 0:
        raise NotPositiveDefinite(info)
    return c


def _potrf_cupy(m):
    import cupy
    # cuSOLVER reports a failed factorization as NaN under cupyx's default
    # errstate (linalg='ignore').
    c = cupy.linalg.cholesky(m)
    if not bool(cupy.isfinite(c).all()):
        raise NotPositiveDefinite(1)
    return c


def _potrs_numpy(c, b):
    potrs, = scipy.linalg.lapack.get_lapack_funcs(('potrs',), (c, b))
    x, info = potrs(c, b, lower=True)
    if info != 0:
        raise numpy.linalg.LinAlgError('potrs failed: {}'.format(info))
    return x


def _potrs_cupy(c, b):
    from cupyx.scipy.linalg import solve_triangular
    y = solve_triangular(c, b, lower=True)
    return solve_triangular(c, y, lower=True, trans='T')


def cholesky(matrix, damping=0.0):
    """Lower Cholesky factor of ``matrix + damping·I`` (float32 or wider).

    Retries with more damping when the block is not positive definite.
    """
    xp = backend.get_array_module(matrix)
    potrf = _potrf_numpy if xp is numpy else _potrf_cupy
    m = matrix.astype(factors.compute_dtype(matrix.dtype))
    if not bool(xp.isfinite(m).all()):
        raise FloatingPointError(
            'K-FAC factor has non-finite entries: the loss or the gradients '
            'are not finite')
    diag = xp.arange(m.shape[0])
    scale = float(xp.abs(m[diag, diag]).mean()) if m.size else 1.0
    extra = damping
    for _ in range(MAX_RETRIES + 1):
        damped = m.copy()
        damped[diag, diag] += extra
        try:
            return potrf(damped)
        except NotPositiveDefinite:
            if not _warned[0]:
                warnings.warn(
                    'K-FAC factor of size {} is not positive definite with '
                    'damping {:g}; retrying with 10x more damping'.format(
                        m.shape[0], extra), RuntimeWarning)
                _warned[0] = True
            extra = max(extra * 10, scale * 1e-6, numpy.finfo(m.dtype).tiny)
    raise FloatingPointError(
        'K-FAC factor of size {} is not positive definite even with damping '
        '{:g}'.format(m.shape[0], extra))


def cholesky_solve(c, b):
    """``(L Lᵀ)⁻¹ b`` for the lower Cholesky factor ``c`` (potrs)."""
    xp = backend.get_array_module(c)
    b = b.astype(c.dtype, copy=False)
    return (_potrs_numpy if xp is numpy else _potrs_cupy)(c, b)


def inverse(matrix, damping=0.0):
    """(matrix + damping·I)⁻¹ of a symmetric matrix, symmetric, by Cholesky."""
    c = cholesky(matrix, damping)
    xp = backend.get_array_module(c)
    if xp is numpy:
        potri, = scipy.linalg.lapack.get_lapack_funcs(('potri',), (c,))
        inv, info = potri(c, lower=True)
        if info != 0:
            raise numpy.linalg.LinAlgError('potri failed: {}'.format(info))
        lower = numpy.tril(inv)
        lower += numpy.tril(inv, -1).T
        return lower
    return cholesky_solve(c, xp.eye(c.shape[0], dtype=c.dtype))
