"""Distributed K-FAC: Algorithm 1 of Osawa et al. (CVPR 2019) over P processes.

One update, on every process (``comm.size`` = P, per-process batch b), as
:meth:`KFAC.update` reads it:

1. (at ``setup``) the parameters are broadcast from rank 0 (those of
   lazily sized links as soon as the first forward initializes them, so the
   first gradients are already those of rank 0's weights);
2. the due factors (:meth:`~KFAC.due_factors`: by the same rule on every
   rank), then stages 1-2: forward / backward on the local batch, run by
   ``update(lossfun)`` or by the caller, whose backward builds them
   (accumulation included);
3. the plan, made once (:mod:`chainerkfac.distributed.plan`): every *block*
   (a K-FAC layer, or the pseudo-block ``'(other)'`` of the parameters
   outside K-FAC layers) has owners
   (:func:`chainerkfac.distributed.assignment.assign`);
4. stage 3, :meth:`reduce_scatter` (due): ONE ReduceScatterV per dtype of the
   gradients and of the due factors (A, G, the BN Fisher), laid out by
   :mod:`chainerkfac.distributed.layout`: a block's averaged gradient and
   factors land only on its owners.  Factors travel as upper triangles
   (N(N+1)/2 values; the diagonal BN Fisher as its 2C values); a stale step
   sends only the gradients;
5. stage 4, :meth:`~KFAC.invert`, and stage 5, :meth:`~KFAC.precondition`:
   each owner inverts its layers' factors and preconditions their gradients
   (over :meth:`owned_layers`);
6. stage 6, :meth:`all_gather`: ONE AllGatherV per dtype of the
   preconditioned gradients, each block taken from its primary owner;
7. every process runs the optimizer hooks on the same directions (with
   ``kl_clip``, scaled by the ν of the summed Σ 𝒢·∇L) and applies the same
   update rule (eq. 17/18), so the parameters stay identical on every
   process.

What each process sent is counted in :attr:`DistributedKFAC.comm_counters`
(:class:`chainerkfac.distributed.counters.CommCounters`).

Averages: every process's factors and (mean-loss) gradients are averages over
its local batch, so those over the combined batch P·b are their mean: every
value is multiplied by 1/P before the sum (a sum-reduced loss sums the
gradients).  Float16 factors (``factor_dtype='float16'``) are stored as
data × scale with a power-of-two scale per process; a tiny MAX all-reduce
agrees on one scale per factor, the data are brought to it (exact: a power of
two) and divided by P before the float16 sum, so the sum stays ≤ 1 and never
overflows.  They are inverted in float32 by their owner.
"""

import logging
import typing

import numpy

import chainer

from chainerkfac import errors
from chainerkfac.distributed import assignment as assignment_module
from chainerkfac.distributed import communicator as communicator_module
from chainerkfac.distributed import counters as counters_module
from chainerkfac.distributed import layout
from chainerkfac.distributed import packing
from chainerkfac.distributed import plan as plan_module
from chainerkfac import factors as factors_module
from chainerkfac.optimizers import kfac

# re-exported: their home is the distribution package
from chainerkfac.distributed.counters import COUNTER_KEYS  # NOQA
from chainerkfac.distributed.counters import REPORTED_KEYS  # NOQA
from chainerkfac.distributed.plan import Block  # NOQA
from chainerkfac.distributed.plan import OTHER_BLOCK_NAME  # NOQA

#: the layer assignment, when it is made (rank 0)
plan_logger = logging.getLogger('chainerkfac.plan')


class DistributedKFAC(kfac.KFAC):
    """K-FAC over the processes of a ChainerMN communicator (Algorithm 1).

    Use it instead of ``chainermn.create_multi_node_optimizer`` (which would
    all-reduce raw gradients): this optimizer owns the whole iteration.  Call
    ``update(lossfun, *args)`` on every process with its local batch.

    Args:
        comm: a ChainerMN communicator (``'naive'`` on CPU, ``'pure_nccl'``
            on GPU; one process per GPU).
        *args, **kwargs: the arguments of :class:`KFAC` (``lr``,
            ``momentum``, ``damping``, ``bn_damping_ratio``, ``a_interval``,
            ``g_interval``, ``weight_rescaling``, ``bn_fisher``,
            ``factor_dtype``, ``loss_reduction``, ``accumulation_steps``).
        abort_on_exception (bool): when P > 1, an uncaught exception on any
            rank ends all of them with one line
            (:func:`chainerkfac.distributed.communicator.install_abort_hook`).
        print_plan (bool): log the layer assignment (logger
            ``chainerkfac.plan``, INFO) on rank 0 when it is made.

    Attributes:
        assignment: the
            :class:`chainerkfac.distributed.assignment.Assignment` of the
            blocks (K-FAC layers, then the pseudo-block ``'(other)'`` when
            some parameters are outside K-FAC layers), made at the first
            update or by :meth:`plan`; ``blocks`` lists them in that order,
            ``plan_lines`` is the plan as text.
        comm_counters: cumulative counts of what this process sent
            (:class:`~chainerkfac.distributed.counters.CommCounters`, a dict
            over :data:`COUNTER_KEYS`; a stage's bytes are the size of this
            process's send buffer: all segments in stage 3, its own segment
            in stage 6).
        stage_seconds: as in :class:`KFAC`, plus ``'reduce_scatter'`` and
            ``'all_gather'`` (packing, the collective and unpacking).
    """

    def __init__(self, comm, *args, **kwargs):
        abort_on_exception = kwargs.pop('abort_on_exception', True)
        self.print_plan = kwargs.pop('print_plan', True)
        super(DistributedKFAC, self).__init__(*args, **kwargs)
        self.comm = comm
        self.kfac_comm = communicator_module.create_communicator(comm)
        self.rank = self.kfac_comm.rank
        self.size = self.kfac_comm.size
        if abort_on_exception and self.size > 1:
            communicator_module.install_abort_hook()
        self.comm_counters = counters_module.CommCounters()
        self._plan = None
        self._built = set()
        self._loaded = False
        self._stage3 = {}
        self._stage6 = None

    @property
    def blocks(self) -> typing.Optional[list]:
        """The blocks of the plan (None before it is made)."""
        return None if self._plan is None else self._plan.blocks

    @property
    def assignment(self) -> typing.Optional[assignment_module.Assignment]:
        """The assignment of the plan (None before it is made)."""
        return None if self._plan is None else self._plan.assignment

    @property
    def plan_lines(self) -> typing.Optional[typing.List[str]]:
        """The plan as text (None before it is made)."""
        return None if self._plan is None else self._plan.lines()

    # -- setup and before the passes ----------------------------------------
    def setup(self, link: chainer.Link) -> 'DistributedKFAC':
        """As :meth:`KFAC.setup`, then step 1 of Algorithm 1: every rank
        starts from rank 0's weights (call it on every rank)."""
        super(DistributedKFAC, self).setup(link)
        self._sync_parameters()
        return self

    def _before_update(self):
        """When an update's first pass begins, after a load: the loaded
        factors settled."""
        if self._loaded:
            self._settle_loaded()

    def _sync_parameters(self):
        """Step 1 of Algorithm 1: every rank starts from rank 0's weights.

        Initialized parameters are broadcast now.  An uninitialized one
        (``L.Linear(None, n)``) is broadcast the moment the first forward
        initializes it, before it is used: every rank runs the same forward,
        so every rank initializes (and broadcasts) the same parameters in
        the same order, and the first gradients and factors are already
        those of rank 0's weights on every rank.
        """
        self._broadcast_initialized()
        for param in self.target.params(include_uninit=True):
            if param.array is None:
                self._broadcast_when_initialized(param)

    def _broadcast_when_initialized(self, param):
        """Shadows ``param.initialize`` with one that also broadcasts rank
        0's values, once: the shadow removes itself."""
        def initialize_and_broadcast(shape):
            del param.initialize  # Parameter.initialize again
            param.initialize(shape)
            self.kfac_comm.broadcast_params([param])
        param.initialize = initialize_and_broadcast

    def _broadcast_initialized(self):
        """Rank 0's initialized parameters onto every rank, through the
        K-FAC communicator (NCCL, or MPI with device arrays staged through
        the host unless MPI is CUDA-aware)."""
        self.kfac_comm.broadcast_params(
            [p for _, p in sorted(self.target.namedparams(
                include_uninit=False))])

    def _reports(self):
        return self.rank == 0

    def _has_built(self, layer, name):
        """Whether the factor has gone through stage 3: the same on every
        rank (the local state is kept by owners only)."""
        return (layer.name, name) in self._built

    def _settle_active(self, passes):
        """The covered links with a gradient in this update, agreed by all
        ranks: a link is active when it got one on every rank, left alone
        (factors kept, zero gradient) when on none; on some ranks only, every
        rank raises the same one-line error."""
        super(DistributedKFAC, self)._settle_active(passes)
        if self.size > 1:
            mask = self.kfac_comm.sum_over_ranks(numpy.array(
                [layer in passes.active for layer in self.kfac_layers],
                numpy.int32))
            partial = [layer.name for layer, n in zip(self.kfac_layers, mask)
                       if 0 < n < self.size]
            if partial:
                raise RuntimeError(
                    'K-FAC: link {} got gradients on some processes but not '
                    'on others in update {}: a covered link must be used on '
                    'every process or on none in an update (or kept on the '
                    'raw gradient with skip_layers)'.format(
                        ', '.join(partial[:5]), self.t))
            passes.active = set(layer for layer, n in
                                zip(self.kfac_layers, mask) if n)

    def _any_process(self, flag):
        """Whether ``flag`` holds on any rank (the same answer on every
        rank)."""
        if self.size == 1:
            return flag
        return bool(self.kfac_comm.sum_over_ranks(
            numpy.array([int(bool(flag))], numpy.int32))[0])

    def _sum_over_processes(self, value):
        if self.size == 1:
            return value
        return self.kfac_comm.allreduce_sum(value.reshape(1)).reshape(())

    # -- the plan ------------------------------------------------------------
    def plan(self) -> assignment_module.Assignment:
        """The layer assignment (:attr:`assignment`), made now if it is not
        yet.  Call it on every rank; the model's parameters must be
        initialized (the first update makes it otherwise)."""
        if self._plan is None:
            if any(p.array is None
                   for p in self.target.params(include_uninit=True)):
                raise RuntimeError(
                    'K-FAC: the layer assignment needs initialized '
                    'parameters (run one forward pass first)')
            self._make_plan()
        return self.assignment

    def _make_plan(self):
        """The plan of the blocks, once (at :meth:`plan`, or in the first
        update after its passes, before stage 3), agreed by every rank."""
        if self._plan is not None:
            return
        plan = plan_module.make_plan(self.kfac_layers, self.target, self.size)
        if self.size > 1 and not self.kfac_comm.agree(plan.signature()):
            raise RuntimeError(
                'K-FAC: the layer assignment differs between ranks '
                '(different models or parameter shapes?)')
        self._plan = plan
        if self.print_plan and self.rank == 0:
            plan_logger.info('\n'.join(plan.lines()))

    def owned_layers(self) -> list:
        """The K-FAC layers this process inverts and preconditions."""
        return [] if self._plan is None else self._plan.layers_of(self.rank)

    def primary_layers(self) -> list:
        """The K-FAC layers whose factors this process reports: those it is
        the primary owner of (one process per layer)."""
        if self._plan is None:
            return []
        return self._plan.primary_layers_of(self.rank)

    def _owns(self, block):
        return self.rank in self.assignment.owners[block.index]

    # -- stage 3 -------------------------------------------------------------
    def reduce_scatter(self, due: dict) -> None:
        """Stage 3: the averaged gradients and ``due`` factors (``{layer:
        names}``) onto their owners."""
        with self._stage('reduce_scatter'):
            pieces = self._factor_pieces(due)
            buffers = self._stage3.get(pieces)
            if buffers is None:
                buffers = self._stage3[pieces] = layout.reduce_scatter_layout(
                    self._plan, pieces, self.target.xp, self.rank)
            scales = self._agree_scales(pieces)
            for buffer in buffers:
                self._pack_stage3(buffer, scales)
                if buffer.total == 0:
                    continue
                self.kfac_comm.reduce_scatter(buffer.sendbuf,
                                              buffer.recvbuf, buffer.counts)
                self.comm_counters.count_reduce_scatter(buffer)
                self._unpack_stage3(buffer, scales)
            for piece in pieces:
                if not self._owns(piece.block):  # only owners keep factors
                    piece.layer.state[piece.name] = None
                    piece.layer.state[piece.name + '_scale'] = None
                self._built.add((piece.block.name, piece.name))

    def _factor_pieces(self, due):
        """The :class:`~chainerkfac.distributed.layout.FactorPiece` s of the
        due factors, in plan order, checked present."""
        out = []
        for layer, names in due.items():
            block = self._plan.block_of(layer)
            for name in sorted(names):
                if layer.state.get(name) is None:
                    raise RuntimeError(
                        'K-FAC: factor {} of link {} is due but was not built '
                        'on rank {}: every K-FAC link must be called in the '
                        'forward pass on every rank'.format(
                            name, layer.name, self.rank))
                out.append(layout.FactorPiece(block, name))
        return tuple(sorted(out, key=lambda p: (p.block.index, p.name)))

    def _agree_scales(self, pieces):
        """``{piece: S}``: the common scale of each due factor (float16: the
        MAX over ranks of the power-of-two scales; otherwise 1)."""
        xp = self.target.xp
        scales = {}
        half = []
        for piece in pieces:
            scale = piece.layer.state[piece.name + '_scale']
            if piece.layer.factor_dtype == factors_module.FLOAT16:
                half.append(piece)
            else:
                scales[piece] = xp.ones((), scale.dtype)
        if half:
            local = xp.stack([
                piece.layer.state[piece.name + '_scale'].astype(
                    numpy.float64) for piece in half])
            agreed = self.kfac_comm.allreduce_max(local)
            self.comm_counters.count_scale_agreement(local.size)
            for k, piece in enumerate(half):
                dtype = piece.layer.state[piece.name + '_scale'].dtype
                scales[piece] = agreed[k].astype(dtype)
        return scales

    def _pack_stage3(self, buffer, scales):
        """Every rank's segment: gradients × 1/P (mean loss), factors'
        triangles brought to the common scale and divided by P."""
        xp = self.target.xp
        coef = 1.0 / self.size if self.loss_reduction == 'mean' else 1.0
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
                    values = packed[piece] = self._scaled_triangle(
                        piece, scales[piece])
                out[...] = values  # cast to the buffer dtype

    def _scaled_triangle(self, piece, common_scale):
        """A factor's packed values × its scale / (common scale × P)."""
        data = piece.layer.state[piece.name]
        scale = piece.layer.state[piece.name + '_scale']
        coef = scale / (common_scale * self.size)
        values = packing.pack(data) if data.ndim == 2 else data.reshape(-1)
        return values.astype(scale.dtype, copy=False) * coef

    def _unpack_stage3(self, buffer, scales):
        recv = buffer.recvbuf
        for offset, piece in buffer.positions(self.rank, local=True):
            if isinstance(piece, layout.GradientPiece):
                piece.write(recv[offset:offset + piece.size])
            else:
                data, _ = packing.unpack_from(recv, offset, piece.shape)
                piece.layer.set_factor(piece.name, data, scales[piece])

    # -- stage 6 -------------------------------------------------------------
    def all_gather(self) -> None:
        """Stage 6: every rank gets every block's preconditioned gradient
        from its primary owner."""
        with self._stage('all_gather'):
            if self._stage6 is None:
                self._stage6 = layout.all_gather_layout(self._plan,
                                                        self.target.xp)
            for buffer in self._stage6:
                sendbuf = buffer.sendbuf  # in place: each fills its segment
                for offset, piece in buffer.positions(self.rank):
                    sendbuf[offset:offset + piece.size] = piece.read()
                if buffer.total == 0:
                    continue
                self.kfac_comm.all_gather(sendbuf, buffer.counts)
                self.comm_counters.count_all_gather(buffer, self.rank)
                for r in range(self.size):
                    for offset, piece in buffer.positions(r):
                        piece.write(sendbuf[offset:offset + piece.size])
            self.comm_counters['updates'] += 1
        self.comm_counters.report(self.target)

    # -- snapshots -----------------------------------------------------------
    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        """As :meth:`KFAC.serialize`, plus which factors have been built.

        A process holds the factors (with their scales and damped inverses)
        of the layers it owns only, so its serialization holds those:
        :mod:`chainerkfac.training.snapshot` writes every owner's and gives
        each process those of the layers it owns when loading, also on
        another number of processes.  The first update after a load keeps
        every loaded factor and inverse (a factor is rebuilt when its
        interval says so, as in a run that never stopped), except a built
        factor that one of its owners lacks (e.g. every rank loaded the same
        rank's file): that one is rebuilt in that update, on every rank.
        Layers a process does not own keep no factors.
        """
        super(DistributedKFAC, self).serialize(serializer)
        if not isinstance(serializer, chainer.serializer.Deserializer):
            serializer('built_factors', numpy.array(
                sorted('{}:{}'.format(*key) for key in self._built),
                dtype=numpy.str_))
            return
        try:
            built = serializer('built_factors', None)
        except KeyError:  # not recorded: every factor is rebuilt
            built = ()
        self._built = set(tuple(str(key).rsplit(':', 1))
                          for key in numpy.asarray(built).ravel())
        self._loaded = True

    def _settle_loaded(self):
        """First update after a load: drop the factors of layers this
        process does not own, and mark as not built (due now, on every
        rank) the built factors some owner lacks."""
        self.plan()
        owned = set(id(layer) for layer in self.owned_layers())
        missing = []
        for layer in self.kfac_layers:
            if id(layer) not in owned:
                for key in layer.state_keys():
                    layer.state[key] = None
                continue
            missing.extend(
                (layer.name, name) for name in layer.factor_names
                if (layer.name, name) in self._built
                and layer.state.get(name) is None)
        if self.size > 1:
            missing = [key for part in errors.as_mpi(self.comm).allgather(
                missing)
                       for key in part]
        self._warn_rebuilt_early(set(missing))
        self._built.difference_update(missing)
        self._loaded = False

    def _warn_rebuilt_early(self, missing):
        """One WARNING (rank 0) when factors missing from the loaded state
        are rebuilt before their interval says: the run then does not
        continue exactly as one that never stopped."""
        intervals = {(layer.name, name): layer.intervals[name]
                     for layer in self.kfac_layers
                     for name in layer.factor_names}
        early = [key for key in missing if self.t % int(getattr(
            self.hyperparam, intervals[key])) != 0]
        if early and self.rank == 0:
            kfac.logger.warning(
                'K-FAC: %d of the %d factors built so far are in no loaded '
                'state of a process that owns them (every process loaded '
                'one process\'s file?): they are rebuilt in update %d, '
                'before their interval says, so the run does not continue '
                'exactly; to resume exactly, save and load every process\'s '
                'state (chainermn.create_multi_node_checkpointer, or '
                'chainerkfac-train\'s snapshots)', len(early),
                len(self._built), self.t)
