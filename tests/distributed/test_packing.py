"""Symmetric packing of the factors (chainerkfac.distributed.packing)."""

import numpy
import pytest

from chainerkfac.distributed import packing
from chainerkfac.links import ResNet50
from chainerkfac.optimizers import KFAC


def _symmetric(n, dtype=numpy.float32, seed=0):
    """x_i + x_j + y_i y_j: symmetric, no two mirror pairs alike (cheap for
    n = 4608)."""
    rng = numpy.random.RandomState(seed + n)
    x, y = rng.standard_normal((2, n)).astype(dtype)
    return numpy.add.outer(x, x) + numpy.multiply.outer(y, y)


@pytest.fixture(scope='module')
def resnet_shapes():
    """Every factor shape of ResNet-50, both BN Fisher modes, layer order."""
    shapes = []
    for mode in ('diagonal', 'full'):
        opt = KFAC(bn_fisher=mode)
        opt.setup(ResNet50(n_class=1000))
        for layer in opt.kfac_layers:
            factor_shapes = layer.factor_shapes()
            shapes.extend(factor_shapes[n] for n in layer.factor_names)
    return shapes


def test_triangle_and_packed_size():
    assert [packing.triangle_size(n) for n in range(5)] == [0, 1, 3, 6, 10]
    assert packing.packed_size((4, 4)) == 10
    assert packing.packed_size((7,)) == 7
    assert packing.total_packed_size({'A': (3, 3), 'G': (2, 2)}) == 9
    for bad in [(2, 3), (2, 2, 2), ()]:
        with pytest.raises(ValueError):
            packing.packed_size(bad)


def test_order_is_triu_indices():
    a = numpy.arange(36.0).reshape(6, 6)
    rows, cols = numpy.triu_indices(6)
    numpy.testing.assert_array_equal(packing.pack(a), a[rows, cols])


def test_round_trip_every_resnet50_factor_size(resnet_shapes):
    sizes = sorted(set(s[0] for s in resnet_shapes if len(s) == 2))
    assert 4608 in sizes and 64 in sizes
    for n in sizes:
        a = _symmetric(n)
        v = packing.pack(a)
        assert v.shape == (n * (n + 1) // 2,) and v.dtype == a.dtype
        numpy.testing.assert_array_equal(packing.unpack(v, n), a)
    packing.clear_cache()


def test_packed_count_of_resnet50(resnet_shapes):
    expected = sum(s[0] * (s[0] + 1) // 2 if len(s) == 2 else s[0]
                   for s in resnet_shapes)
    assert packing.total_packed_size(resnet_shapes) == expected
    assert sum(packing.packed_size(s) for s in resnet_shapes) == expected


@pytest.mark.parametrize('n', [1, 2, 3, 5, 8, 17, 64])
@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32,
                                   numpy.float64])
def test_round_trip_small(n, dtype):
    a = _symmetric(n, dtype)
    v = packing.pack(a)
    assert v.dtype == dtype and v.size == n * (n + 1) // 2
    b = packing.unpack(v, n)
    assert b.dtype == dtype
    numpy.testing.assert_array_equal(b, a)
    numpy.testing.assert_array_equal(b, b.T)
    out = numpy.full((n, n), numpy.nan, dtype=numpy.float64)
    assert packing.unpack(v, n, out=out) is out
    numpy.testing.assert_array_equal(out, a.astype(numpy.float64))


def test_pack_does_not_alias_and_reads_only_the_upper_triangle():
    a = _symmetric(6)
    v = packing.pack(a)
    v[:] = 0
    assert (a != 0).any()
    u = numpy.triu(a) + numpy.tril(numpy.full((6, 6), 99.0), -1)
    numpy.testing.assert_array_equal(packing.pack(u), packing.pack(a))
    # a non-contiguous input
    big = _symmetric(12)
    numpy.testing.assert_array_equal(
        packing.pack(big[::2, ::2]), packing.pack(big[::2, ::2].copy()))


def test_fp16_packed_bytes_half_of_fp32():
    for n in (3, 64, 1000):
        a = _symmetric(n)
        assert packing.pack(a.astype(numpy.float16)).nbytes * 2 == \
            packing.pack(a).nbytes


def test_errors():
    with pytest.raises(ValueError):
        packing.pack(numpy.zeros((2, 3)))
    with pytest.raises(ValueError):
        packing.unpack(numpy.zeros(5), 3)
    with pytest.raises(ValueError):
        packing.unpack(numpy.zeros(6), 3, out=numpy.zeros((2, 2)))
    with pytest.raises(ValueError):
        packing.unpack(numpy.zeros(6), 3, out=numpy.zeros((3, 6))[:, ::2])
    with pytest.raises(ValueError):
        packing.pack_into(numpy.zeros(5), 0, numpy.zeros((3, 3)))
    with pytest.raises(ValueError):
        packing.unpack_from(numpy.zeros(5), 2, (3, 3))


def _factors(seed=0):
    rng = numpy.random.RandomState(seed)
    out = []
    for shape in [(5, 5), (3,), (1, 1), (8,), (12, 12), (1,), (4, 4)]:
        if len(shape) == 2:
            out.append(_symmetric(shape[0], seed=seed))
        else:
            out.append(rng.standard_normal(shape).astype(numpy.float32))
    return out


@pytest.mark.parametrize('buffer_dtype', [numpy.float32, numpy.float16])
@pytest.mark.parametrize('start', [0, 7])
def test_buffer_round_trip(buffer_dtype, start):
    factors = _factors()
    total = start + packing.total_packed_size(f.shape for f in factors)
    buf = numpy.full(total + 3, -1, dtype=buffer_dtype)
    offset = start
    offsets = []
    for f in factors:
        offsets.append(offset)
        offset = packing.pack_into(buf, offset, f)
    assert offset == total
    assert (buf[:start] == -1).all() and (buf[total:] == -1).all()
    # vectors pass through unchanged
    for f, o in zip(factors, offsets):
        if f.ndim == 1:
            numpy.testing.assert_array_equal(
                buf[o:o + f.size], f.astype(buffer_dtype))
    offset = start
    for f, o in zip(factors, offsets):
        assert offset == o
        g, offset = packing.unpack_from(buf, offset, f.shape)
        assert g.shape == f.shape and g.dtype == buffer_dtype
        assert not numpy.shares_memory(g, buf)
        numpy.testing.assert_array_equal(g, f.astype(buffer_dtype))
        h, _ = packing.unpack_from(buf, o, f.shape, dtype=numpy.float32)
        assert h.dtype == numpy.float32
        numpy.testing.assert_array_equal(h, g.astype(numpy.float32))
        out = numpy.zeros(f.shape, dtype=numpy.float64)
        k, _ = packing.unpack_from(buf, o, f.shape, out=out)
        assert k is out
        numpy.testing.assert_array_equal(out, g.astype(numpy.float64))
    assert offset == total


def test_vector_pack_into_unchanged():
    v = numpy.arange(6, dtype=numpy.float32)
    buf = numpy.zeros(10, dtype=numpy.float32)
    assert packing.pack_into(buf, 2, v) == 8
    numpy.testing.assert_array_equal(buf[2:8], v)
    w, end = packing.unpack_from(buf, 2, (6,))
    assert end == 8
    numpy.testing.assert_array_equal(w, v)


def test_cupy_round_trip():
    cupy = pytest.importorskip('cupy')
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # pragma: no cover
        pytest.skip('no CUDA device')
    for n in (1, 5, 300):
        a = cupy.asarray(_symmetric(n))
        v = packing.pack(a)
        assert isinstance(v, cupy.ndarray)
        numpy.testing.assert_array_equal(cupy.asnumpy(v),
                                         packing.pack(cupy.asnumpy(a)))
        assert (packing.unpack(v, n) == a).all()
    factors = [cupy.asarray(f) for f in _factors()]
    buf = cupy.zeros(packing.total_packed_size(f.shape for f in factors),
                     dtype=cupy.float16)
    offset = 0
    for f in factors:
        offset = packing.pack_into(buf, offset, f)
    offset = 0
    for f in factors:
        g, offset = packing.unpack_from(buf, offset, f.shape,
                                        dtype=cupy.float32)
        assert isinstance(g, cupy.ndarray)
        assert (g == f.astype(cupy.float16).astype(cupy.float32)).all()
