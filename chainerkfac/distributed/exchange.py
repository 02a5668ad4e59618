"""What processes exchange in one K-FAC update: stages 3 and 6 and the
agreements around them (Algorithm 1, Osawa et al. 2019, Sec. 3.3).

The optimizer is given an exchange and calls it at the same points for any
number of processes P, as kfac-jax's syncs are no-ops without an axis:

* :class:`Exchange`: one process.  Every agreement is the process's own
  value and stages 3 and 6 move nothing: the process owns every block.
* :class:`CollectiveExchange`: P processes of a ChainerMN communicator,
  through the K-FAC communicator of
  :mod:`chainerkfac.distributed.communicator` (MPI or NCCL): stage 3 is ONE
  ReduceScatterV per dtype of the averaged gradients and due factors onto
  their owners (factors as upper triangles; float16 factors brought to a
  common power-of-two scale first), stage 6 ONE AllGatherV per dtype of the
  preconditioned gradients from their primary owners; what each process
  sent is counted in :attr:`~Exchange.counters`.

Averages: every process's factors and (mean-loss) gradients are averages
over its local batch, so those over the combined batch are their mean:
every value is multiplied by 1/P before the sum (a sum-reduced loss sums
the gradients).
"""

import typing

import numpy

import chainer

from chainerkfac.distributed import communicator as communicator_module
from chainerkfac.distributed import counters as counters_module
from chainerkfac.distributed import layout
from chainerkfac.distributed import plan as plan_module
from chainerkfac import factors as factors_module


class Exchange(object):
    """The exchange of one process: nothing to exchange.

    Attributes:
        rank (int): this process (0).
        size (int): the number of processes (1).
        counters: :class:`~chainerkfac.distributed.counters.CommCounters`
            of what this process sent (nothing, on one process).
    """

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.counters = counters_module.CommCounters()

    def reports(self) -> bool:
        """Whether this process logs reports (rank 0)."""
        return self.rank == 0

    def sync_parameters(self, link: chainer.Link) -> None:
        """Step 1 of Algorithm 1: every process starts from rank 0's
        parameters (on one process, they are)."""

    def begin_update(self) -> None:
        """Called when an update's first pass begins."""

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process."""
        return bool(flag)

    def sum(self, value: typing.Any) -> typing.Any:
        """A 0-d array summed over the processes."""
        return value

    def union(self, items: list) -> list:
        """Every process's ``items`` (small picklable objects), in rank
        order."""
        return list(items)

    def agree_active(self, layers: typing.Sequence, active: set,
                     t: int) -> set:
        """The covered links with a gradient in update ``t``: those with one
        on every process (a link with one on some processes only is one
        error on every process)."""
        return active

    def agree_plan(self, plan: plan_module.Plan) -> None:
        """Raises RuntimeError unless every process made the same plan."""

    def reduce_scatter(self, plan: plan_module.Plan,
                       pieces: typing.Sequence[layout.FactorPiece],
                       mean: bool, xp: typing.Any) -> None:
        """Stage 3: the averaged gradients and the due factors ``pieces``
        onto the blocks' owners (``mean``: a mean-reduced loss)."""

    def all_gather(self, plan: plan_module.Plan, xp: typing.Any,
                   extra: typing.Optional[typing.Callable] = None) -> None:
        """Stage 6: every block's preconditioned gradient from its primary
        owner onto every process, with ``extra(block)``'s pieces (the
        adaptive refresh's intervals)."""

    def report(self, target: typing.Any) -> None:
        """Reports what this process sent in the update (``comm/<key>``,
        to the active reporter): nothing is sent on one process."""


class _ForwardBracket(chainer.LinkHook):
    """Marks the forward of a link with lazily sized parameters, so that
    those it initializes are broadcast at once (and removes itself once
    the link is initialized)."""

    name = 'chainerkfac_broadcast'

    def __init__(self, exchange):
        self.exchange = exchange

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        # a pickled model (another process) is not this exchange's
        return {'exchange': None}

    def forward_preprocess(self, args: typing.Any) -> None:
        if self.exchange is not None:
            self.exchange._forwarding += 1

    def forward_postprocess(self, args: typing.Any) -> None:
        if self.exchange is None:
            return
        self.exchange._forwarding -= 1
        if all(p.array is not None for p in args.link.params(
                include_uninit=True)):
            args.link.delete_hook(self.name)


class CollectiveExchange(Exchange):
    """The exchange of P processes of a ChainerMN communicator.

    Args:
        comm: a ChainerMN communicator (``'naive'`` on CPU, ``'pure_nccl'``
            on GPU), or a K-FAC communicator.
    """

    def __init__(self, comm: typing.Any) -> None:
        super(CollectiveExchange, self).__init__()
        self.communicator = communicator_module.create_communicator(comm)
        self.rank = self.communicator.rank
        self.size = self.communicator.size
        self._stage3 = {}
        self._stage6 = None

    # -- agreements ----------------------------------------------------------
    def sync_parameters(self, link: chainer.Link) -> None:
        """Initialized parameters are broadcast now.  An uninitialized one
        (``L.Linear(None, n)``) is broadcast the moment a forward
        initializes it, before it is used: every process runs the same
        forward, so every process initializes (and broadcasts) the same
        parameters in the same order.  One initialized outside a forward
        (a snapshot loaded into lazily sized links: Chainer walks a chain's
        children in an order of its own on each process) is broadcast, in
        name order, when the next update begins."""
        self._forwarding = 0
        self._initialized_outside = []
        self.communicator.broadcast_params(
            [p for _, p in sorted(link.namedparams(include_uninit=False))])
        for name, param in link.namedparams(include_uninit=True):
            if param.array is None:
                self._broadcast_when_initialized(name, param)
        for sublink in link.links():
            if any(p.array is None for p in sublink.params(
                    include_uninit=True)):
                sublink.add_hook(_ForwardBracket(self),
                                 name=_ForwardBracket.name)

    def _broadcast_when_initialized(self, name, param):
        """Shadows ``param.initialize`` with one that also broadcasts rank
        0's values, once: the shadow removes itself."""
        def initialize_and_broadcast(shape):
            del param.initialize  # Parameter.initialize again
            param.initialize(shape)
            if self._forwarding:
                self.communicator.broadcast_params([param])
            else:
                self._initialized_outside.append((name, param))
        param.initialize = initialize_and_broadcast

    def begin_update(self) -> None:
        """When an update's first pass begins: the parameters initialized
        outside a forward since, broadcast in name order."""
        pending = sorted(getattr(self, '_initialized_outside', ()),
                         key=lambda item: item[0])
        if pending:
            self._initialized_outside = []
            self.communicator.broadcast_params([p for _, p in pending])

    def any(self, flag: bool) -> bool:
        return bool(self.communicator.sum_over_ranks(
            numpy.array([int(bool(flag))], numpy.int32))[0])

    def sum(self, value: typing.Any) -> typing.Any:
        return self.communicator.allreduce_sum(value.reshape(1)).reshape(())

    def union(self, items: list) -> list:
        return [item for part in self.communicator.allgather_obj(items)
                for item in part]

    def agree_active(self, layers: typing.Sequence, active: set,
                     t: int) -> set:
        mask = self.communicator.sum_over_ranks(numpy.array(
            [layer in active for layer in layers], numpy.int32))
        partial = [layer.name for layer, n in zip(layers, mask)
                   if 0 < n < self.size]
        if partial:
            raise RuntimeError(
                'K-FAC: link {} got gradients on some processes but not on '
                'others in update {}: a covered link must be used on every '
                'process or on none in an update (or kept on the raw '
                'gradient with skip_layers)'.format(', '.join(partial[:5]),
                                                    t))
        return set(layer for layer, n in zip(layers, mask) if n)

    def agree_plan(self, plan: plan_module.Plan) -> None:
        if not self.communicator.agree(plan.signature()):
            raise RuntimeError(
                'K-FAC: the layer assignment differs between ranks '
                '(different models or parameter shapes?)')

    # -- stage 3 -------------------------------------------------------------
    def reduce_scatter(self, plan: plan_module.Plan,
                       pieces: typing.Sequence[layout.FactorPiece],
                       mean: bool, xp: typing.Any) -> None:
        pieces = tuple(pieces)
        buffers = self._stage3.get(pieces)
        if buffers is None:
            buffers = self._stage3[pieces] = layout.reduce_scatter_layout(
                plan, pieces, xp, self.rank)
        scales = self._agree_scales(pieces, xp)
        coef = 1.0 / self.size if mean else 1.0
        for buffer in buffers:
            self._pack(buffer, scales, coef, xp)
            if buffer.total == 0:
                continue
            self.communicator.reduce_scatter(buffer.sendbuf, buffer.recvbuf,
                                             buffer.counts)
            self.counters.count_reduce_scatter(buffer)
            recv = buffer.recvbuf
            for offset, piece in buffer.positions(self.rank, local=True):
                if isinstance(piece, layout.GradientPiece):
                    piece.write(recv[offset:offset + piece.size])
                else:
                    piece.write(recv, offset, scales[piece])

    def _agree_scales(self, pieces, xp):
        """``{piece: S}``: the common scale of each due factor (float16: the
        MAX over ranks of the power-of-two scales; otherwise 1)."""
        scales = {}
        half = []
        for piece in pieces:
            scale = piece.scale
            if piece.layer.factor_dtype == factors_module.FLOAT16:
                half.append(piece)
            else:
                scales[piece] = xp.ones((), scale.dtype)
        if half:
            local = xp.stack([piece.scale.astype(numpy.float64)
                              for piece in half])
            agreed = self.communicator.allreduce_max(local)
            self.counters.count_scale_agreement(local.size)
            for k, piece in enumerate(half):
                scales[piece] = agreed[k].astype(piece.scale.dtype)
        return scales

    def _pack(self, buffer, scales, coef, xp):
        """Every rank's segment: gradients × 1/P (mean loss), factors'
        triangles brought to the common scale and divided by P."""
        packed = {}  # a factor with several owners is packed once
        for r in range(self.size):
            for offset, piece in buffer.positions(r):
                out = buffer.sendbuf[offset:offset + piece.size]
                if isinstance(piece, layout.GradientPiece):
                    if coef == 1.0:
                        out[...] = piece.read()
                    else:
                        xp.multiply(piece.read(), coef, out=out,
                                    casting='unsafe')
                    continue
                values = packed.get(piece)
                if values is None:
                    values = packed[piece] = piece.read(scales[piece],
                                                        self.size)
                out[...] = values  # cast to the buffer dtype

    # -- stage 6 -------------------------------------------------------------
    def all_gather(self, plan: plan_module.Plan, xp: typing.Any,
                   extra: typing.Optional[typing.Callable] = None) -> None:
        if self._stage6 is None:
            self._stage6 = layout.all_gather_layout(plan, xp, extra)
        for buffer in self._stage6:
            sendbuf = buffer.sendbuf  # in place: each fills its segment
            for offset, piece in buffer.positions(self.rank):
                sendbuf[offset:offset + piece.size] = piece.read()
            if buffer.total == 0:
                continue
            self.communicator.all_gather(sendbuf, buffer.counts)
            self.counters.count_all_gather(buffer, self.rank)
            for r in range(self.size):
                for offset, piece in buffer.positions(r):
                    piece.write(sendbuf[offset:offset + piece.size])
        self.counters['updates'] += 1

    def report(self, target: typing.Any) -> None:
        self.counters.report(target)
