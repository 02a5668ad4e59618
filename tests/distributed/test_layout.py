"""The buffers of stages 3 and 6 (chainerkfac.distributed.layout)."""

import numpy
import pytest

import chainerkfac  # noqa: F401  first: makes Chainer importable
import chainer

from chainerkfac.distributed import assignment
from chainerkfac.distributed import layout
from chainerkfac.distributed import packing
from chainerkfac.distributed import plan as plan_module


class FakeLayer(object):
    """What the layout reads of a K-FAC layer: parameters, factor shapes
    and dtype."""

    def __init__(self, name, params, shapes, factor_dtype):
        self.name = name
        self.params = params
        self._shapes = shapes
        self.factor_dtype = factor_dtype
        self.factor_names = tuple(sorted(shapes))

    def factor_shapes(self):
        return dict(self._shapes)


def _param(shape, dtype, rng):
    p = chainer.Parameter(rng.standard_normal(shape).astype(dtype))
    p.grad = rng.standard_normal(shape).astype(dtype)
    return p


def _symmetric(n, rng):
    x = rng.standard_normal((n, n))
    return x + x.T


@pytest.fixture
def plan():
    """Four blocks of mixed dtypes (float64 gradients in one, float16
    factors in another, a vector factor, '(other)'), on 3 processes with
    one block owned twice."""
    rng = numpy.random.RandomState(0)
    f32, f64 = numpy.float32, numpy.float64
    layers = [
        FakeLayer('a', [_param((3, 2), f32, rng), _param((3,), f32, rng)],
                  {'A': (3, 3), 'G': (3, 3)}, f32),
        FakeLayer('b', [_param((4, 5), f64, rng)],
                  {'A': (5, 5), 'G': (4, 4)}, numpy.float16),
        FakeLayer('c', [_param((2,), f32, rng), _param((2,), f32, rng)],
                  {'F': (4,)}, f32),
    ]
    blocks = [plan_module.Block(i, layer.name, layer, layer.params)
              for i, layer in enumerate(layers)]
    blocks.append(plan_module.Block(3, '(other)', None,
                                    [_param((7,), f32, rng)]))
    owners = [(0,), (1, 2), (2,), (0,)]
    a = assignment.Assignment([1, 1, 1, 1], 3, owners, primary=[0, 2, 2, 0])
    factors = {(i, name): _symmetric(shape[0], rng) if len(shape) == 2
               else rng.standard_normal(shape)
               for i, layer in enumerate(layers)
               for name, shape in layer.factor_shapes().items()}
    return plan_module.Plan(blocks, [1] * 4, a), factors


def _fill(buffers, factors):
    """Every rank's segment written from the pieces at their positions."""
    for buffer in buffers:
        for r in range(len(buffer.counts)):
            for offset, piece in buffer.positions(r):
                out = buffer.sendbuf[offset:offset + piece.size]
                if isinstance(piece, layout.GradientPiece):
                    out[...] = piece.read()
                else:
                    data = factors[(piece.block.index, piece.name)]
                    out[...] = packing.pack(data) if data.ndim == 2 \
                        else data


def _expected(plan, factors, rank_blocks, due):
    """``{dtype: [per rank: the values]}`` by an independent loop over the
    assignment: a rank's blocks in index order, each block's gradients in
    parameter order, then its due factors in name order."""
    out = {}

    def add(rank, dtype, values):
        per_rank = out.setdefault(numpy.dtype(dtype).name,
                                  [[] for _ in range(plan.size)])
        per_rank[rank].append(numpy.asarray(values, dtype).ravel())

    for r in range(plan.size):
        for i in rank_blocks(r):
            block = plan.blocks[i]
            for p in block.params:
                add(r, p.dtype, p.grad)
            for name in sorted(due.get(i, ())):
                data = factors[(i, name)]
                rows, cols = numpy.triu_indices(data.shape[0]) \
                    if data.ndim == 2 else (None, None)
                values = data[rows, cols] if rows is not None else data
                add(r, block.layer.factor_dtype, values)
    return {k: [numpy.concatenate(v) if v else numpy.zeros(0, k)
                for v in per_rank] for k, per_rank in out.items()}


def _check(buffers, expected):
    assert [b.dtype.name for b in buffers] == sorted(expected)
    for buffer in buffers:
        per_rank = expected[buffer.dtype.name]
        start = 0
        for r, values in enumerate(per_rank):
            assert buffer.counts[r] == values.size
            assert buffer.displs[r] == start
            numpy.testing.assert_array_equal(
                buffer.sendbuf[start:start + values.size],
                values.astype(buffer.dtype))
            start += values.size
        assert buffer.total == start == buffer.sendbuf.size


@pytest.mark.parametrize('due', [{}, {0: ('A', 'G'), 1: ('G',), 2: ('F',)},
                                 {1: ('A', 'G')}])
def test_reduce_scatter_layout(plan, due):
    plan, factors = plan
    pieces = tuple(layout.FactorPiece(plan.blocks[i], name)
                   for i in sorted(due) for name in sorted(due[i]))
    for receiver in range(3):
        buffers = layout.reduce_scatter_layout(plan, pieces, numpy,
                                               receiver)
        _fill(buffers, factors)
        owners = plan.assignment.owners
        _check(buffers, _expected(
            plan, factors,
            lambda r: [i for i in range(4) if r in owners[i]], due))
        for buffer in buffers:
            assert buffer.recvbuf.size == buffer.counts[receiver]


def test_all_gather_layout(plan):
    plan, factors = plan
    buffers = layout.all_gather_layout(plan, numpy)
    _fill(buffers, factors)
    primary = plan.assignment.primary
    _check(buffers, _expected(
        plan, factors, lambda r: [i for i in range(4) if primary[i] == r],
        {}))
    assert all(b.recvbuf is None for b in buffers)


def test_local_positions_and_write(plan):
    """A segment's local offsets are its global ones minus its start; a
    gradient piece writes back the values it read."""
    plan, _ = plan
    buffer = layout.all_gather_layout(plan, numpy)[0]
    for r in range(3):
        global_ = [o for o, _ in buffer.positions(r)]
        local = [o for o, _ in buffer.positions(r, local=True)]
        assert local == [o - buffer.displs[r] for o in global_]
    offset, piece = next(buffer.positions(0))
    values = numpy.arange(piece.size, dtype=piece.dtype)
    piece.write(values)
    numpy.testing.assert_array_equal(piece.param.grad.ravel(), values)
