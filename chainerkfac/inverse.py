"""Inverses of damped symmetric positive-definite blocks, by Cholesky.

The optimizer keeps the Cholesky factor L of each damped block (LAPACK
``potrf`` through SciPy on NumPy, cuSOLVER ``potrf`` through CuPy) and
applies the inverse in one of two ways (:data:`METHODS`):

``'solve'``
    two triangular solves (``potrs``) per use: no explicit inverse is formed
    (saves potri's 2n³/3 flops; the best choice on a CPU);
``'explicit'``
    the explicit inverse (L Lᵀ)⁻¹, formed once per refresh from L, applied by
    a matrix product (GEMM) at every step: on a GPU, triangular solves are
    slow and the inverse is reused for every stale step.

``'auto'`` picks ``'solve'`` on NumPy and ``'explicit'`` on CuPy
(:func:`resolve_method`).

Everything runs in float32 or wider.  :func:`cholesky_many` factorizes a list
of blocks with one host synchronization for all of them (on a GPU, a
per-block check would stall the device for each layer): cuSOLVER's status
(``devInfo``) stays on the device until then.  CuPy's own
``cupy.linalg.cholesky`` cannot serve here: under CuPy's default
``errstate(linalg='ignore')`` a failed factorization returns a partly
factorized, finite matrix without any error, and ``linalg='raise'``
synchronizes on every call.  A block that is not positive definite even
with its damping is retried with ten times more damping a few times (a
warning is issued once); a block with non-finite entries raises
``FloatingPointError`` so that nothing non-finite reaches the weights.
"""

import typing as tp
import warnings

import numpy
import scipy.linalg

from chainer import backend
from chainer.types import NdArray

from chainerkfac import errors
from chainerkfac import factors


MAX_RETRIES = 8
METHODS = ('auto', 'solve', 'explicit')
_warned = [False]


def resolve_method(method: str, xp: tp.Any) -> str:
    """``'solve'`` or ``'explicit'`` for ``method`` on array module ``xp``."""
    errors.check_choice('inverse_method', method, METHODS)
    if method != 'auto':
        return method
    return 'solve' if xp is numpy else 'explicit'


# -- potrf: (lower factor, status) -------------------------------------------

def _potrf_numpy(m):
    potrf, = scipy.linalg.lapack.get_lapack_funcs(('potrf',), (m,))
    c, info = potrf(m, lower=True, overwrite_a=True, clean=True)
    return c, numpy.asarray(info)


def _potrf_cupy(m):
    """cuSOLVER potrf on ``m`` (overwritten), its devInfo left on the GPU."""
    import cupy
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas
    from cupy_backends.cuda.libs import cusolver
    routines = {numpy.dtype(numpy.float32): (cusolver.spotrf_bufferSize,
                                             cusolver.spotrf),
                numpy.dtype(numpy.float64): (cusolver.dpotrf_bufferSize,
                                             cusolver.dpotrf)}
    buffer_size, potrf = routines[m.dtype]
    m = cupy.ascontiguousarray(m)
    n = m.shape[0]
    handle = device.get_cusolver_handle()
    # row-major m is column-major mᵀ = m: 'upper' there is our lower factor
    uplo = cublas.CUBLAS_FILL_MODE_UPPER
    work = cupy.empty(buffer_size(handle, uplo, n, m.data.ptr, n), m.dtype)
    info = cupy.zeros((), numpy.int32)
    potrf(handle, uplo, n, m.data.ptr, n, work.data.ptr, work.size,
          info.data.ptr)
    return cupy.tril(m), info


def potrf(matrix: NdArray) -> tuple:
    """``(L, info)``: the lower Cholesky factor of ``matrix`` and the status
    (a 0-d int array on the matrix's device: 0 on success, k > 0 when the
    leading minor of order k is not positive definite)."""
    xp = backend.get_array_module(matrix)
    return (_potrf_numpy if xp is numpy else _potrf_cupy)(matrix)


# -- the damped blocks -------------------------------------------------------

def _damped(m, damping):
    """``m + damping·I`` as a new array (``damping``: a number or 0-d
    array on m's device)."""
    xp = backend.get_array_module(m)
    out = m.copy()
    diag = xp.arange(m.shape[0])
    out[diag, diag] += damping
    return out


def _is_finite(xp, m):
    return bool(xp.isfinite(m).all())


def _to_host(array):
    return backend.CpuDevice().send(array)


def cholesky_many(blocks: list) -> list:
    """Lower Cholesky factors of ``matrix + damping·I`` for each
    ``(matrix, damping)`` of ``blocks``, with one host synchronization when
    all are positive definite.

    Each block is factorized in float32 or wider; a block that fails is
    retried with more damping (10×, at least 1e-6 of its mean diagonal);
    a block with non-finite entries raises ``FloatingPointError``.
    """
    mats = [m.astype(factors.compute_dtype(m.dtype), copy=False)
            for m, _ in blocks]
    extras = [d for _, d in blocks]
    out = [None] * len(mats)
    pending = [i for i, m in enumerate(mats) if m.size]
    for i, m in enumerate(mats):
        if not m.size:
            out[i] = m.copy()
    for _ in range(MAX_RETRIES + 1):
        if not pending:
            return out
        checks = []
        for i in pending:
            out[i], info = potrf(_damped(mats[i], extras[i]))
            xp = backend.get_array_module(out[i])
            checks.append((info == 0) & xp.isfinite(out[i]).all()
                          & xp.isfinite(mats[i]).all())
        xp = backend.get_array_module(checks[0])
        good = _to_host(xp.stack(checks))  # the one synchronization
        pending = [i for i, ok in zip(pending, good) if not ok]
        for i in pending:
            extras[i] = _more_damping(mats[i], extras[i])
    i = pending[0]
    raise FloatingPointError(
        'K-FAC factor of size {} is not positive definite even with damping '
        '{:g}'.format(mats[i].shape[0], float(extras[i])))


def _more_damping(m, extra):
    """The damping of the next try of a block that failed with ``extra``."""
    xp = backend.get_array_module(m)
    if not _is_finite(xp, m):
        raise FloatingPointError(
            'K-FAC factor has non-finite entries: the loss or the gradients '
            'are not finite')
    extra = float(extra)
    if not _warned[0]:
        warnings.warn(
            'K-FAC factor of size {} is not positive definite with damping '
            '{:g}; retrying with 10x more damping'.format(m.shape[0], extra),
            RuntimeWarning)
        _warned[0] = True
    diag = xp.arange(m.shape[0])
    scale = float(xp.abs(m[diag, diag]).mean())
    return max(extra * 10, scale * 1e-6, numpy.finfo(m.dtype).tiny)


def cholesky(matrix: NdArray, damping: float = 0.0) -> NdArray:
    """Lower Cholesky factor of ``matrix + damping·I`` (float32 or wider).

    Retries with more damping when the block is not positive definite.
    """
    return cholesky_many([(matrix, damping)])[0]


def cholesky_solve(c: NdArray, b: NdArray) -> NdArray:
    """``(L Lᵀ)⁻¹ b`` for the lower Cholesky factor ``c`` (potrs)."""
    xp = backend.get_array_module(c)
    b = b.astype(c.dtype, copy=False)
    if xp is numpy:
        potrs, = scipy.linalg.lapack.get_lapack_funcs(('potrs',), (c, b))
        x, info = potrs(c, b, lower=True)
        if info != 0:
            raise numpy.linalg.LinAlgError('potrs failed: {}'.format(info))
        return x
    from cupyx.scipy.linalg import solve_triangular
    y = solve_triangular(c, b, lower=True)
    return solve_triangular(c, y, lower=True, trans='T')


def cholesky_inverse(c: NdArray) -> NdArray:
    """``(L Lᵀ)⁻¹`` from the lower Cholesky factor ``c``: symmetric."""
    xp = backend.get_array_module(c)
    if xp is numpy:
        potri, = scipy.linalg.lapack.get_lapack_funcs(('potri',), (c,))
        inv, info = potri(c, lower=True)
        if info != 0:
            raise numpy.linalg.LinAlgError('potri failed: {}'.format(info))
        lower = numpy.tril(inv)
        lower += numpy.tril(inv, -1).T
        return lower
    inv = cholesky_solve(c, xp.eye(c.shape[0], dtype=c.dtype))
    return (inv + inv.T) / 2


def inverse(matrix: NdArray, damping: float = 0.0) -> NdArray:
    """(matrix + damping·I)⁻¹ of a symmetric matrix, symmetric, by Cholesky."""
    return cholesky_inverse(cholesky(matrix, damping))


def apply(c: NdArray, b: NdArray, method: str,
          explicit: tp.Optional[NdArray] = None) -> NdArray:
    """``(L Lᵀ)⁻¹ b`` by ``method``: ``'solve'`` (potrs on ``c``) or
    ``'explicit'`` (``explicit`` @ b, with ``explicit = (L Lᵀ)⁻¹``)."""
    if method == 'solve':
        return cholesky_solve(c, b)
    return explicit @ b.astype(explicit.dtype, copy=False)
