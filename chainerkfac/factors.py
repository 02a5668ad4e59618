"""Kronecker factors and BN Fisher blocks: second moments, stored with a scale.

A factor ``M`` is kept as a pair ``(data, scale)`` with ``M = scale * data``:
``data`` has the factor dtype (float32 or float16; float64 for float64
models) and ``scale`` is a 0-d array of the compute dtype.  In float16 the
scale is a power of two chosen before the cast, so that gradients of any size
give finite factors (a plain ``n**2 * mean(gy gy^T)`` overflows float16 early).
"""

import math
import typing as tp

import numpy

from chainer import backend
from chainer.types import NdArray


FLOAT16 = numpy.dtype(numpy.float16)


def compute_dtype(dtype: numpy.dtype) -> numpy.dtype:
    """The dtype used to build, sum and invert factors: float32 or wider."""
    return numpy.promote_types(dtype, numpy.float32)


def _power_of_two_at_least(xp, value):
    """Smallest power of two >= ``value`` (1 for zero or non-finite input)."""
    tiny = numpy.finfo(value.dtype).tiny
    exponent = xp.ceil(xp.log2(xp.maximum(value, tiny)))
    ok = xp.isfinite(value) & (value > 0)
    return xp.where(ok, xp.exp2(exponent), xp.ones_like(value)).astype(
        value.dtype)


def _matmul_lowp(xp, x, y):
    """``x @ y`` in the inputs' dtype; on NumPy fp16 runs through fp32."""
    if xp is numpy and x.dtype == FLOAT16:
        return numpy.matmul(x.astype(numpy.float32), y.astype(numpy.float32))
    return xp.matmul(x, y)


def second_moment(x: NdArray, count: int, dtype: numpy.dtype,
                  diagonal: bool = False) -> tuple:
    """``(data, scale)`` of ``x @ x.T / count`` (or its diagonal).

    Args:
        x: 2-D array ``(dim, m)``: one column per sample (or sample and
            position); the columns are summed over.
        count: the normalizer (the number of samples ``n``, or ``n * T``).
        dtype: the factor dtype.
        diagonal (bool): return only the diagonal, ``sum(x**2, axis=1)``.
    """
    xp = backend.get_array_module(x)
    dtype = numpy.dtype(dtype)
    cdtype = compute_dtype(x.dtype)
    x = x.astype(cdtype, copy=False)
    if dtype == FLOAT16:
        # |x / s| <= 1 / sqrt(m): every entry of the sum over m columns <= 1.
        amax = xp.abs(x).max() if x.size else xp.zeros((), cdtype)
        s = _power_of_two_at_least(xp, amax * numpy.sqrt(max(x.shape[1], 1)))
        x = (x / s).astype(FLOAT16)
        s2 = s * s
    else:
        s2 = xp.ones((), cdtype)
    if diagonal:
        if x.dtype == FLOAT16:
            x = x.astype(numpy.float32)
        data = (x * x).sum(axis=1)
    else:
        data = _matmul_lowp(xp, x, x.T)
    scale = (s2 / cdtype.type(count)).astype(cdtype)
    return data.astype(dtype, copy=False), scale


def quantize(value: NdArray, dtype: numpy.dtype) -> tuple:
    """``(data, scale)`` of a dense factor ``value`` in the factor dtype."""
    xp = backend.get_array_module(value)
    dtype = numpy.dtype(dtype)
    if dtype == FLOAT16:
        amax = xp.abs(value).max() if value.size else xp.zeros((), value.dtype)
        s = _power_of_two_at_least(xp, amax)
        return (value / s).astype(FLOAT16), s
    return value.astype(dtype, copy=False), xp.ones((), value.dtype)


def dense(data: NdArray, scale: NdArray) -> NdArray:
    """The factor ``scale * data`` in the compute dtype (float32 or wider)."""
    return data.astype(scale.dtype) * scale


def times(scale: NdArray, value: float) -> NdArray:
    """``scale * value`` in the scale's dtype (a Python float would make a
    float32 scale float64 on NumPy 1.x)."""
    return scale * scale.dtype.type(value)


def unscaled(pair: tuple, loss_scale: float) -> tuple:
    """``(data, scale)`` of an output-gradient factor built from gradients
    scaled by ``loss_scale``, divided by its square."""
    data, scale = pair
    return data, times(scale, 1.0 / (float(loss_scale) ** 2))


def with_ones_row(x: NdArray) -> NdArray:
    """``x`` (dim, m) with a row of ones appended: the bias input."""
    xp = backend.get_array_module(x)
    out = xp.empty((x.shape[0] + 1, x.shape[1]), dtype=x.dtype)
    out[:-1] = x
    out[-1] = 1
    return out


def nbytes(data: tp.Optional[NdArray]) -> int:
    """Bytes held by a factor's data."""
    return 0 if data is None else data.nbytes


def change_norms(new: NdArray, old: NdArray) -> tp.Tuple[NdArray, NdArray]:
    """``(‖X(t) − X(t−1)‖_F, ‖X(t−1)‖_F)`` as 0-d arrays on the factors'
    device, in at least float32 (float16 factors are widened first)."""
    xp = backend.get_array_module(new)
    dtype = numpy.promote_types(new.dtype, numpy.float32)
    new = new.astype(dtype, copy=False)
    old = old.astype(dtype, copy=False)
    return xp.linalg.norm((new - old).ravel()), xp.linalg.norm(old.ravel())


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator as a float; ``nan`` for a zero denominator."""
    if denominator == 0.0:
        return math.nan
    return float(numerator) / float(denominator)
