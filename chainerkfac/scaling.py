"""Scaling model: time per iteration against the number of processes (Fig. 2).

One process per GPU, a fixed batch per process (weak scaling).  The time of
one iteration of Algorithm 1 at P processes is modelled stage by stage::

    T(P) = T_fb + T_A,G + T_RS(P) + T_inv(P) + T_prec(P) + T_AG(P) + T_upd

* ``T_fb`` (forward + backward), ``T_A,G`` (building the factors) and
  ``T_upd`` (the update) do not depend on P: every process runs them on its
  own 32 images (given, or measured by ``scripts/bench_kfac.py`` /
  ``scripts/bench_distributed.py``).
* ``T_inv`` and ``T_prec`` are the slowest process's FLOPs over a measured
  (or given) rate, under the real layer assignment of
  :func:`chainerkfac.distributed.assignment.assign` for that P: the sum of
  :func:`~chainerkfac.distributed.assignment.inversion_flops` and
  :func:`~chainerkfac.distributed.assignment.precondition_flops` of the
  layers it owns.
  This is where model parallelism wins: at P = 1 one process inverts all 107
  layers, from P ≥ #layers the slowest owns one.
* ``T_RS`` (ReduceScatterV) and ``T_AG`` (AllGatherV) follow the α–β model
  of :func:`collective_time` on the real per-process byte counts: at stage 3
  every owner receives its layers' summed gradients (float32) and, at a
  refresh, their factors (dense float32, or packed float16 upper triangles);
  at stage 6 every process receives every preconditioned gradient (float32)
  from the layers' owners.  The counts are those the optimizer sends
  (:func:`stage3_counts`, :func:`stage6_counts`; a test compares them with
  ``DistributedKFAC.comm_counters``).  Three ways to run the uneven
  collectives: ``'grouped'``, what
  :class:`~chainerkfac.distributed.communicator.NcclCommunicator` runs on
  GPUs (one rooted reduce per owner in stage 3, one broadcast per owner in
  stage 6, issued together), and MPI's ``'ring'`` and ``'halving'``
  algorithms.

A stale (non-refresh) iteration has no ``T_A,G`` and ``T_inv`` and sends
gradients only; the *stale* curve averages both kinds with the refresh
fraction of a schedule.  SGD's reference curve is ``T_fb + T_allreduce +
T_upd`` with the all-reduce as ReduceScatter + AllGather of equal segments.
"""

import collections
import dataclasses
import math
import typing

from chainerkfac import errors
from chainerkfac.distributed import assignment as assignment_module
from chainerkfac.distributed import packing
from chainerkfac.distributed import plan as plan_module

ALGORITHMS = ('grouped', 'ring', 'halving')


@dataclasses.dataclass(frozen=True)
class Network:
    """α–β parameters of the interconnect.

    Attributes:
        latency (float): α, seconds per message (per step of a collective).
        bandwidth (float): 1/β, bytes per second each process sends.
        algorithm (str): ``'grouped'`` (one pipelined rooted reduce, or
            broadcast, per segment, all at once: NCCL's grouped calls),
            ``'ring'`` or ``'halving'`` (recursive halving for
            ReduceScatterV, its mirror recursive doubling for AllGatherV).
    """

    latency: float
    bandwidth: float
    algorithm: str = 'grouped'

    def __post_init__(self):
        errors.check_choice('algorithm', self.algorithm, ALGORITHMS)
        if not self.latency >= 0 or not self.bandwidth > 0:
            raise ValueError('latency must be >= 0 and bandwidth > 0, got '
                             '{} and {}'.format(self.latency, self.bandwidth))

    @property
    def beta(self) -> float:
        """Seconds per byte."""
        return 1.0 / self.bandwidth


def collective_time(counts: typing.Sequence[float],
                    network: Network) -> float:
    """α–β time of a ReduceScatterV whose process r ends with ``counts[r]``
    bytes, or of the AllGatherV whose process r starts with them (the same
    messages in reverse order).

    * grouped: one pipelined ring reduce (or broadcast) per non-empty
      segment, all issued together.  The reduce to root r sends the
      segment's bytes over every link of the ring but the one leaving r, so
      the link leaving process q carries every segment but q's:
      ``(P − 1)·α + β·(Σ counts − min counts)`` (for equal segments the
      ring's ``(P − 1)·α + (P − 1)/P·n·β``).  Uneven segments cost only
      their bytes: nothing is padded and no step waits for the largest.
    * ring: P − 1 steps; at each step every process sends one segment to its
      neighbour, so a step lasts as long as the largest segment:
      ``(P − 1)·(α + β·max(counts))`` (``(P − 1)·α + (P − 1)/P·n·β`` for equal
      segments of an n-byte vector).
    * halving (recursive halving / doubling): for P a power of two, log₂ P
      steps; at each step every process exchanges with its partner in the
      other half of its current group the segments that half ends with; a
      step lasts as long as its largest exchange.  Otherwise the P − 2^k
      extra processes (2^k ≤ P the largest power of two) first hand their
      whole vector to a partner among the first ones (α + β·n) and get their
      segment back at the end (α + β·their largest segment); the partner
      carries both segments in between.

    Returns:
        float: seconds (0 for one process).
    """
    counts = [float(c) for c in counts]
    size = len(counts)
    if size <= 1:
        return 0.0
    alpha, beta = network.latency, network.beta
    if network.algorithm == 'grouped':
        return (size - 1) * alpha + beta * (sum(counts) - min(counts))
    if network.algorithm == 'ring':
        return (size - 1) * (alpha + beta * max(counts))
    base = 1 << (size.bit_length() - 1)
    extra = size - base
    seconds = 0.0
    if extra:
        seconds += alpha + beta * sum(counts)
        seconds += alpha + beta * max(counts[base:])
    blocks = [counts[r] + (counts[base + r] if r < extra else 0.0)
              for r in range(base)]
    width = base
    while width > 1:
        half = width // 2
        largest = 0.0
        for lo in range(0, base, width):
            lower = sum(blocks[lo:lo + half])
            upper = sum(blocks[lo + half:lo + width])
            largest = max(largest, lower, upper)
        seconds += alpha + beta * largest
        width = half
    return seconds


def padded_bytes(counts: typing.Sequence[float]) -> float:
    """Bytes of an equal-count collective (NCCL's ``reduceScatter`` /
    ``allGather``) carrying segments of ``counts`` bytes: every segment
    padded to the largest."""
    return len(counts) * max(counts) if counts else 0


def allreduce_time(nbytes: float, size: int, network: Network) -> float:
    """SGD's all-reduce of ``nbytes``: a ReduceScatter and an AllGather of
    equal segments (ring: ``2(P − 1)·α + 2(P − 1)/P·n·β``)."""
    if size <= 1:
        return 0.0
    segments = [nbytes / size] * size
    return 2.0 * collective_time(segments, network)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the model needs of a K-FAC layer: its name, the number of
    gradient values it carries and its factors' shapes."""

    name: str
    grad_elements: int
    factor_shapes: tuple

    @property
    def cost(self) -> float:
        """What the plan balances (:meth:`chainerkfac.distributed.plan.
        Block.cost`): the FLOPs of stages 4-5, or for the ``'(other)'``
        block (no factors) the values it carries."""
        if not self.factor_shapes:
            return float(self.grad_elements)
        return assignment_module.layer_cost(self.factor_shapes)

    def factor_elements(self, packed: bool) -> int:
        """Values sent for its factors: N² per N×N factor (N(N+1)/2 when
        ``packed``), d per vector."""
        total = 0
        for shape in self.factor_shapes:
            if packed:
                total += packing.packed_size(shape)
            else:
                total += int(math.prod(shape))
        return total


def layer_infos(optimizer: typing.Any) -> typing.List[LayerInfo]:
    """:class:`LayerInfo` of every block of a set-up optimizer's plan
    (:func:`chainerkfac.distributed.plan.make_blocks`: its K-FAC layers,
    then ``'(other)'`` if some parameters are outside them)."""
    out = []
    for block in plan_module.make_blocks(optimizer.kfac_layers,
                                         optimizer.target):
        shapes = () if block.layer is None else tuple(
            tuple(s) for s in block.layer.factor_shapes().values())
        out.append(LayerInfo(block.name, sum(p.size for p in block.params),
                             shapes))
    return out


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """Per-process costs that do not depend on P, and the FLOP rates of
    stages 4 and 5.

    Attributes:
        forward_backward (float): seconds of forward + backward (no factors).
        factors (float): seconds to build all factors (a refresh).
        update (float): seconds of the parameter update.
        inverse_rate (float): FLOP/s of the Cholesky factorizations.
        precondition_rate (float): FLOP/s of the triangular solves.
    """

    forward_backward: float
    factors: float
    update: float
    inverse_rate: float
    precondition_rate: float


@dataclasses.dataclass(frozen=True)
class Communication:
    """What stage 3 sends: factor bytes per value and packed or dense."""

    factor_itemsize: int = 4
    packed: bool = False
    gradient_itemsize: int = 4

    @property
    def label(self) -> str:
        return '{} fp{}'.format('packed' if self.packed else 'dense',
                                8 * self.factor_itemsize)


DENSE_FP32 = Communication(4, False)
PACKED_FP16 = Communication(2, True)


def stage3_counts(plan: assignment_module.Assignment,
                  layers: typing.Sequence[LayerInfo],
                  communication: Communication, refresh: bool) -> list:
    """Bytes each process receives in the ReduceScatterV of stage 3: its
    layers' gradients, and their factors when ``refresh``."""
    counts = []
    for rank in range(plan.size):
        total = 0
        for i in plan.layers_of(rank):
            layer = layers[i]
            total += layer.grad_elements * communication.gradient_itemsize
            if refresh:
                total += layer.factor_elements(communication.packed) * \
                    communication.factor_itemsize
        counts.append(total)
    return counts


def stage6_counts(plan: assignment_module.Assignment,
                  layers: typing.Sequence[LayerInfo],
                  itemsize: int = 4) -> list:
    """Bytes each process contributes to the AllGatherV of stage 6: the
    preconditioned gradients of the layers it is the primary owner of."""
    return [sum(layers[i].grad_elements for i in plan.primary_layers_of(r))
            * itemsize for r in range(plan.size)]


def iteration_stages(size: int, layers: typing.Sequence[LayerInfo],
                     costs: StageCosts, network: Network,
                     communication: Communication, refresh: bool = True,
                     plan: typing.Optional[assignment_module.Assignment] = None
                     ) -> collections.OrderedDict:
    """Seconds per stage of one K-FAC iteration at ``size`` processes.

    Returns:
        OrderedDict: forward_backward, factors, reduce_scatter, inverse,
        precondition, all_gather, update, total.
    """
    if plan is None:
        plan = plan_of(layers, size)
    inverse = precondition = 0.0
    for rank in range(size):
        owned = [layers[i] for i in plan.layers_of(rank)]
        inverse = max(inverse, sum(
            assignment_module.inversion_flops(layer.factor_shapes)
            for layer in owned))
        precondition = max(precondition, sum(
            assignment_module.precondition_flops(layer.factor_shapes)
            for layer in owned))
    out = collections.OrderedDict()
    out['forward_backward'] = costs.forward_backward
    out['factors'] = costs.factors if refresh else 0.0
    out['reduce_scatter'] = collective_time(
        stage3_counts(plan, layers, communication, refresh), network)
    out['inverse'] = inverse / costs.inverse_rate if refresh else 0.0
    out['precondition'] = precondition / costs.precondition_rate
    out['all_gather'] = collective_time(stage6_counts(plan, layers), network)
    out['update'] = costs.update
    out['total'] = sum(out.values())
    return out


def plan_of(layers: typing.Sequence[LayerInfo], size: int,
            redundant: bool = False) -> assignment_module.Assignment:
    """The optimizer's layer assignment for ``size`` processes
    (``redundant``: the paper's replicated layout past the layer count)."""
    return assignment_module.assign([layer.cost for layer in layers], size,
                                    redundant=redundant)


def kfac_time(size: int, layers: typing.Sequence[LayerInfo],
              costs: StageCosts, network: Network,
              communication: Communication, refresh_fraction: float = 1.0,
              redundant: bool = False) -> float:
    """Mean seconds per K-FAC iteration when a fraction ``refresh_fraction``
    of the iterations rebuild and invert the factors (1: every step)."""
    if not 0 < refresh_fraction <= 1:
        raise ValueError('refresh_fraction must be in (0, 1], got {}'.format(
            refresh_fraction))
    plan = plan_of(layers, size, redundant)
    fresh = iteration_stages(size, layers, costs, network, communication,
                             True, plan)['total']
    if refresh_fraction == 1:
        return fresh
    stale = iteration_stages(size, layers, costs, network, communication,
                             False, plan)['total']
    return refresh_fraction * fresh + (1 - refresh_fraction) * stale


def sgd_time(size: int, layers: typing.Sequence[LayerInfo],
             costs: StageCosts, network: Network,
             gradient_itemsize: int = 4) -> float:
    """Seconds per SGD iteration: forward + backward, the all-reduce of
    every gradient, the update."""
    nbytes = sum(layer.grad_elements for layer in layers) * gradient_itemsize
    return costs.forward_backward + allreduce_time(nbytes, size, network) + \
        costs.update
