"""Symmetry-aware packing of the factors (Sec. 3.4).

A symmetric N×N factor travels as its upper triangle, N(N+1)/2 values in
the row-major order of ``numpy.triu_indices(N)``; a vector (the diagonal BN
Fisher, 2C values) travels as is.  Several factors share one flat buffer,
each at an offset (:func:`pack_into` / :func:`unpack_from`).

Everything is generic over the array module (``chainer.backend
.get_array_module``): NumPy and CuPy arrays take the same code path, with no
Python loop over elements.  The flat triangle indices are cached per
(N, array module, device), see :func:`clear_cache`.
"""

import typing

import numpy

from chainer import backend
from chainer.types import NdArray


_cache = {}


def triangle_size(n: int) -> int:
    """N(N+1)/2."""
    n = int(n)
    return n * (n + 1) // 2


def packed_size(shape: typing.Sequence[int]) -> int:
    """Values a factor of ``shape`` takes packed.

    ``(n, n)`` -> n(n+1)/2; ``(n,)`` -> n.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return shape[0]
    if len(shape) == 2 and shape[0] == shape[1]:
        return triangle_size(shape[0])
    raise ValueError('cannot pack shape {}: neither square nor a vector'
                     .format(shape))


def total_packed_size(shapes: typing.Any) -> int:
    """Σ packed_size over ``shapes`` (an iterable, or a dict's values)."""
    values = shapes.values() if hasattr(shapes, 'values') else shapes
    return sum(packed_size(s) for s in values)


def _device_key(xp):
    if xp is numpy:
        return None
    try:  # CuPy: index arrays live on the current device
        return xp.cuda.runtime.getDevice()
    except AttributeError:
        return None


def _index_dtype(xp, n):
    if xp is numpy:
        return numpy.intp  # what NumPy indexes with: no cast per call
    return numpy.int32 if n * n < 2 ** 31 else numpy.int64


def _flat_indices(n, xp, transposed=False):
    """Flat positions in an (n, n) C-contiguous matrix of the upper triangle
    (row-major ``triu_indices`` order), or of its mirror image when
    ``transposed`` (``j * n + i`` for each ``(i, j)``)."""
    key = (n, xp.__name__, _device_key(xp), transposed)
    idx = _cache.get(key)
    if idx is None:
        dtype = _index_dtype(xp, n)
        rows, cols = (x.astype(dtype, copy=False)
                      for x in numpy.triu_indices(n))
        if transposed:
            rows, cols = cols, rows
        flat = rows * n + cols
        idx = flat if xp is numpy else xp.asarray(flat)
        _cache[key] = idx
    return idx


def clear_cache() -> None:
    """Drops the cached index arrays."""
    _cache.clear()


def _check_square(matrix):
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError('expected a square matrix, got shape {}'.format(
            matrix.shape))
    return matrix.shape[0]


def pack(matrix: NdArray) -> NdArray:
    """The upper triangle of a square matrix as a new 1-D array (same dtype),
    in the row-major order of ``numpy.triu_indices(n)``."""
    xp = backend.get_array_module(matrix)
    n = _check_square(matrix)
    flat = xp.ascontiguousarray(matrix).reshape(-1)
    return xp.take(flat, _flat_indices(n, xp))


def unpack(vector: NdArray, n: int,
           out: typing.Optional[NdArray] = None) -> NdArray:
    """The full symmetric (n, n) matrix from its packed upper triangle.

    Args:
        vector: n(n+1)/2 values as :func:`pack` gives them.
        n (int): the order of the matrix.
        out: optional C-contiguous (n, n) array written in place (its dtype
            is kept: the values are cast); by default a new array of
            ``vector``'s dtype.

    Returns:
        the matrix (``out`` when given).
    """
    xp = backend.get_array_module(vector)
    n = int(n)
    vector = vector.reshape(-1)
    if vector.size != triangle_size(n):
        raise ValueError('{} values do not make the triangle of a {}x{} '
                         'matrix ({} values)'.format(
                             vector.size, n, n, triangle_size(n)))
    if out is None:
        out = xp.empty((n, n), dtype=vector.dtype)
    else:
        if out.shape != (n, n):
            raise ValueError('out has shape {}, expected {}'.format(
                out.shape, (n, n)))
        if not out.flags.c_contiguous:
            raise ValueError('out must be C-contiguous')
    flat = out.reshape(-1)  # a view of the contiguous out
    flat[_flat_indices(n, xp)] = vector
    flat[_flat_indices(n, xp, transposed=True)] = vector
    return out


def pack_into(buffer: NdArray, offset: int, array: NdArray) -> int:
    """Writes ``array`` packed into the flat ``buffer`` at ``offset``.

    A square matrix is written as its upper triangle, a vector as is; the
    values are cast to the buffer's dtype (e.g. float16 for half-precision
    communication).

    Returns:
        int: the offset just past what was written.
    """
    offset = int(offset)
    end = offset + packed_size(array.shape)
    if end > buffer.size:
        raise ValueError('buffer of {} values too small for {} values at '
                         'offset {}'.format(buffer.size, end - offset, offset))
    if array.ndim == 2:
        buffer[offset:end] = pack(array)
    else:
        buffer[offset:end] = array
    return end


def unpack_from(buffer: NdArray, offset: int, shape: typing.Sequence[int],
                out: typing.Optional[NdArray] = None,
                dtype: typing.Any = None) -> tuple:
    """Reads a factor of ``shape`` from the flat ``buffer`` at ``offset``.

    Args:
        buffer: the flat buffer.
        offset (int): where the factor starts.
        shape: ``(n, n)`` (read as a packed triangle) or ``(n,)``.
        out: optional array of ``shape`` written in place.
        dtype: dtype of the new array when ``out`` is None (default: the
            buffer's), e.g. float32 from a float16 buffer.

    Returns:
        tuple: ``(array, offset just past what was read)``; the array never
        shares memory with the buffer.
    """
    offset = int(offset)
    shape = tuple(int(s) for s in shape)
    end = offset + packed_size(shape)
    if end > buffer.size:
        raise ValueError('buffer of {} values too small for {} values at '
                         'offset {}'.format(buffer.size, end - offset, offset))
    xp = backend.get_array_module(buffer)
    values = buffer[offset:end]
    if out is None:
        out = xp.empty(shape, dtype=buffer.dtype if dtype is None else dtype)
    elif out.shape != shape:
        raise ValueError('out has shape {}, expected {}'.format(
            out.shape, shape))
    if len(shape) == 2:
        unpack(values, shape[0], out=out)
    else:
        out[...] = values
    return out, end
