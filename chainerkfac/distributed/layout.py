"""Flat buffers of stages 3 and 6: which value goes where.

A collective of Algorithm 1 (Osawa et al. 2019, Sec. 3.3) moves one flat
buffer per dtype with a segment per rank.  Each segment is a run of
*pieces*: the gradient of one parameter of a block (:class:`GradientPiece`)
or one of its factors as a packed upper triangle (:class:`FactorPiece`,
Sec. 3.4).  :func:`build_layout` lays out any pieces, rank by rank:

* stage 3 (ReduceScatterV, :func:`reduce_scatter_layout`): rank r's segment
  holds the gradients of the blocks r owns, each followed by its due
  factors; every rank sends the whole buffer and receives its own segment;
* stage 6 (AllGatherV, :func:`all_gather_layout`): rank r's segment holds
  the preconditioned gradients of the blocks r is the primary owner of.
"""

import dataclasses
import typing
from typing import Callable, Iterable, List, Optional, Sequence

import numpy

from chainerkfac.distributed import communicator
from chainerkfac.distributed import packing
from chainerkfac.distributed import plan as plan_module


@dataclasses.dataclass(frozen=True)
class GradientPiece(object):
    """The gradient of ``block.params[index]``, flattened."""

    block: plan_module.Block
    index: int

    @property
    def param(self) -> typing.Any:
        return self.block.params[self.index]

    @property
    def dtype(self) -> numpy.dtype:
        return numpy.dtype(self.param.dtype)

    @property
    def size(self) -> int:
        return self.param.size

    def read(self) -> typing.Any:
        return self.param.grad.reshape(-1)

    def write(self, values: typing.Any) -> None:
        grad = self.param.grad
        grad[...] = values.reshape(grad.shape)


@dataclasses.dataclass(frozen=True)
class FactorPiece(object):
    """Factor ``name`` of ``block``'s layer, as its packed upper triangle
    (a vector factor as is)."""

    block: plan_module.Block
    name: str

    @property
    def layer(self) -> typing.Any:
        return self.block.layer

    @property
    def shape(self) -> tuple:
        return tuple(self.layer.factor_shapes()[self.name])

    @property
    def dtype(self) -> numpy.dtype:
        return numpy.dtype(self.layer.factor_dtype)

    @property
    def size(self) -> int:
        return packing.packed_size(self.shape)

    @property
    def dense_size(self) -> int:
        return int(numpy.prod(self.shape))

    @property
    def scale(self) -> typing.Any:
        """The factor's scale (``factor = scale × data``)."""
        return self.layer.state[self.name + '_scale']

    def read(self, common_scale: typing.Any, size: int) -> typing.Any:
        """The packed values brought to ``common_scale`` and divided by
        ``size`` (a process's share of the sum over processes)."""
        data = self.layer.state[self.name]
        scale = self.scale
        coef = scale / (common_scale * size)
        values = packing.pack(data) if data.ndim == 2 else data.reshape(-1)
        return values.astype(scale.dtype, copy=False) * coef

    def write(self, buffer: typing.Any, offset: int,
              scale: typing.Any) -> None:
        """Sets the factor from its packed values at ``offset`` of
        ``buffer``, with ``scale``."""
        data, _ = packing.unpack_from(buffer, offset, self.shape)
        self.layer.set_factor(self.name, data, scale)


class Buffer(object):
    """One flat buffer of one dtype, a segment of pieces per rank.

    Attributes:
        dtype: the dtype of every value.
        segments (list): per rank, its pieces in order.
        counts (list): per rank, the values of its segment.
        displs (list): per rank, where its segment starts.
        total (int): the values of the whole buffer.
        sendbuf: the whole buffer (allocated once, reused at every update).
        recvbuf: the receiving rank's segment (stage 3 only), or None.
    """

    def __init__(self, dtype, size: int) -> None:
        self.dtype = numpy.dtype(dtype)
        self.segments = [[] for _ in range(size)]
        self.counts = [0] * size
        self.displs = [0] * size
        self.total = 0
        self.sendbuf = None
        self.recvbuf = None

    def add(self, rank: int,
            piece: typing.Union[GradientPiece, FactorPiece]) -> None:
        self.segments[rank].append(piece)
        self.counts[rank] += piece.size

    def allocate(self, xp: typing.Any,
                 receiver: Optional[int] = None) -> None:
        """Places the segments back to back and allocates the buffers."""
        self.displs, self.total = communicator.displacements(self.counts)
        self.sendbuf = xp.zeros(self.total, self.dtype)
        if receiver is not None:
            self.recvbuf = xp.empty(self.counts[receiver], self.dtype)

    def positions(self, rank: int,
                  local: bool = False) -> typing.Iterator[tuple]:
        """``(offset, piece)`` of rank's segment: offsets in the whole
        buffer, or in the segment alone when ``local``."""
        offset = 0 if local else self.displs[rank]
        for piece in self.segments[rank]:
            yield offset, piece
            offset += piece.size


def build_layout(pieces_of: Callable[[int], Iterable], size: int,
                 xp: typing.Any,
                 receiver: Optional[int] = None) -> List[Buffer]:
    """The buffers (one per dtype, by dtype name) holding ``pieces_of(r)``
    in rank r's segment, for every rank r in ``range(size)``.

    Args:
        pieces_of: rank -> its pieces, in order.
        size (int): the number of processes.
        xp: the array module of the buffers.
        receiver: the rank whose segment is received alone (stage 3's
            ``recvbuf``), or None.
    """
    by_dtype = {}
    for r in range(size):
        for piece in pieces_of(r):
            buffer = by_dtype.get(piece.dtype)
            if buffer is None:
                buffer = by_dtype[piece.dtype] = Buffer(piece.dtype, size)
            buffer.add(r, piece)
    buffers = [by_dtype[d] for d in sorted(by_dtype, key=str)]
    for buffer in buffers:
        buffer.allocate(xp, receiver)
    return buffers


def gradient_pieces(block: plan_module.Block) -> List[GradientPiece]:
    return [GradientPiece(block, j) for j in range(len(block.params))]


def reduce_scatter_layout(plan: plan_module.Plan,
                          due: Sequence[FactorPiece], xp: typing.Any,
                          receiver: int) -> List[Buffer]:
    """Stage 3: on each rank, the gradients of every block it owns, each
    followed by the block's factors in ``due``."""
    due_of = {}
    for piece in due:
        due_of.setdefault(piece.block.index, []).append(piece)

    def pieces_of(rank):
        for block in plan.owned_blocks(rank):
            yield from gradient_pieces(block)
            yield from due_of.get(block.index, ())
    return build_layout(pieces_of, plan.size, xp, receiver)


def all_gather_layout(plan: plan_module.Plan, xp: typing.Any,
                      extra: Optional[Callable[[plan_module.Block],
                                               Iterable]] = None
                      ) -> List[Buffer]:
    """Stage 6: on each rank, the gradients of the blocks it is the primary
    owner of, each followed by ``extra(block)``'s pieces (e.g. the adaptive
    refresh's intervals, :class:`chainerkfac.refresh.IntervalPiece`)."""
    def pieces_of(rank):
        for block in plan.primary_blocks(rank):
            yield from gradient_pieces(block)
            if extra is not None:
                yield from extra(block)
    return build_layout(pieces_of, plan.size, xp)
