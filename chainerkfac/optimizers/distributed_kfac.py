"""Distributed K-FAC: Algorithm 1 of Osawa et al. (CVPR 2019) over P processes.

One update, on every process (``comm.size`` = P, per-process batch b):

1. (first update only) the parameters are broadcast from rank 0 (those of
   lazily sized links as soon as the first forward initializes them, so the
   first gradients are already those of rank 0's weights);
2. stages 1-2: forward / backward with the factor hooks on the local batch
   (inherited from :class:`~chainerkfac.optimizers.KFAC`, accumulation
   included);
3. stage 3: ONE ReduceScatterV per dtype of the gradients and of the due
   factors (A, G, the BN Fisher): every *block* (a K-FAC layer, or the
   pseudo-block of the parameters outside K-FAC layers) has owners
   (:func:`chainerkfac.distributed.assignment.assign`); its averaged gradient and factors
   land only on them.  Factors travel as upper triangles (N(N+1)/2 values;
   the diagonal BN Fisher as its 2C values); a stale step sends only the
   gradients;
4. stages 4-5: each owner inverts its layers' factors and preconditions their
   gradients (inherited ``precondition()`` over :meth:`owned_layers`);
5. stage 6: ONE AllGatherV per dtype of the preconditioned gradients, each
   block taken from its primary owner;
6. every process applies the same update rule (eq. 17/18) to the same
   directions, so the parameters stay identical on every process.

Averages: every process's factors and (mean-loss) gradients are averages over
its local batch, so those over the combined batch P·b are their mean: every
value is multiplied by 1/P before the sum (a sum-reduced loss sums the
gradients).  Float16 factors (``factor_dtype='float16'``) are stored as
data × scale with a power-of-two scale per process; a tiny MAX all-reduce
agrees on one scale per factor, the data are brought to it (exact: a power of
two) and divided by P before the float16 sum, so the sum stays ≤ 1 and never
overflows.  They are inverted in float32 by their owner.
"""

import collections
import sys

import numpy

import chainer

from chainerkfac.distributed import assignment as assignment_module
from chainerkfac.distributed import communicator as communicator_module
from chainerkfac import factors as factors_module
from chainerkfac import framework
from chainerkfac.distributed import packing
from chainerkfac.optimizers import kfac


#: Keys of :attr:`DistributedKFAC.comm_counters` (all cumulative).
COUNTER_KEYS = (
    'updates',                   # real updates (collective rounds)
    'reduce_scatter_calls',      # stage 3 collective calls
    'all_gather_calls',          # stage 6 collective calls
    'scale_allreduce_calls',     # float16 scale agreements
    'gradient_elements',         # stage 3: gradient values sent
    'gradient_bytes',
    'factor_elements',           # stage 3: packed factor values sent
    'factor_bytes',
    'factor_dense_fp32_bytes',   # the same factors as dense float32 arrays
    'scale_bytes',               # float16 scale agreement (float64 values)
    'preconditioned_elements',   # stage 6: preconditioned values sent
    'preconditioned_bytes',
)

#: The per-update deltas reported to an active Chainer reporter.
REPORTED_KEYS = ('gradient_bytes', 'factor_bytes', 'preconditioned_bytes')

OTHER_BLOCK_NAME = '(other)'


class Block(object):
    """A unit of the plan: a K-FAC layer, or the parameters of no layer.

    Attributes:
        name (str): the layer name, or ``'(other)'``.
        layer: the :class:`~chainerkfac.layers.Layer`, or None for the
            pseudo-block (identity preconditioning).
        params (list): the parameters whose gradients it carries.
    """

    def __init__(self, name, layer, params):
        self.name = name
        self.layer = layer
        self.params = list(params)

    def cost(self):
        if self.layer is not None:
            return assignment_module.layer_cost(self.layer.factor_shapes())
        return assignment_module.layer_cost(
            [(sum(p.size for p in self.params),)])

    def __repr__(self):
        return '<Block {}>'.format(self.name)


class _Group(object):
    """One flat buffer of one dtype, a segment per rank."""

    def __init__(self, dtype, size):
        self.dtype = numpy.dtype(dtype)
        self.entries = [[] for _ in range(size)]  # per rank: (piece, n)
        self.counts = [0] * size
        self.displs = None
        self.total = 0
        self.sendbuf = None
        self.recvbuf = None

    def add(self, rank, piece, n):
        self.entries[rank].append((piece, n))
        self.counts[rank] += n

    def finish(self, comm, xp):
        self.displs, self.total = comm.displacements(self.counts)
        # one buffer per layout, reused at every update
        self.sendbuf = xp.zeros(self.total, self.dtype)

    def positions(self, rank):
        """``(offset in a full buffer, piece, n)`` of rank's segment."""
        offset = self.displs[rank]
        for piece, n in self.entries[rank]:
            yield offset, piece, n
            offset += n


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
        print_plan (bool): print the layer assignment on rank 0 when it
            is made.

    Attributes:
        assignment: the :class:`chainerkfac.distributed.assignment.Assignment` of the
            blocks (K-FAC layers, then the pseudo-block ``'(other)'`` when
            some parameters are outside K-FAC layers), made at the first
            update or by :meth:`plan`; ``blocks`` lists them in that order.
        comm_counters (dict): cumulative counts of what this process sent,
            see :data:`COUNTER_KEYS` (a stage's bytes are the size of this
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
        self.blocks = None
        self.assignment = None
        self.plan_lines = None
        self.comm_counters = collections.OrderedDict(
            (key, 0) for key in COUNTER_KEYS)
        self._reported = dict(self.comm_counters)
        self._synced = False
        self._built = set()
        self._loaded = False
        self._due = {}
        self._owned = frozenset()
        self._stage3 = {}
        self._stage6 = None

    # -- the iteration -------------------------------------------------------
    def _before_pass(self):
        """Before the first pass: rank 0's parameters onto every rank (a
        lazily sized link's as soon as its first forward initializes it);
        after a load: the loaded factors settled."""
        if not self._synced:
            self._sync_parameters()
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
        self._synced = True

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

    def _settle_active(self):
        """The covered links with a gradient in this update, agreed by all
        ranks: a link is active when it got one on every rank, left alone
        (factors kept, zero gradient) when on none; on some ranks only, every
        rank raises the same one-line error."""
        super(DistributedKFAC, self)._settle_active()
        if self.size > 1:
            from mpi4py import MPI
            mask = numpy.array([layer in self._active
                                for layer in self.kfac_layers], numpy.int32)
            self.kfac_comm.mpi_comm.Allreduce(MPI.IN_PLACE, mask, op=MPI.SUM)
            partial = [layer.name for layer, n in zip(self.kfac_layers, mask)
                       if 0 < n < self.size]
            if partial:
                raise RuntimeError(
                    'K-FAC: link {} got gradients on some processes but not '
                    'on others in update {}: a covered link must be used on '
                    'every process or on none in an update (or kept on the '
                    'raw gradient with skip_layers)'.format(
                        ', '.join(partial[:5]), self.t))
            self._active = set(layer for layer, n in
                               zip(self.kfac_layers, mask) if n)
        self._due = dict((layer, names) for layer, names in self._due.items()
                         if layer in self._active)

    def _reports(self):
        return self.rank == 0

    def due_factors(self):
        """Due factors by the same rule on every rank.

        A factor is due when ``t`` is a multiple of its interval, or when it
        has never gone through stage 3: not by the local state, which only
        owners keep.
        """
        hp = self.hyperparam
        due = {}
        for layer in self.kfac_layers:
            names = set(
                name for name in layer.factor_names
                if (layer.name, name) not in self._built
                or self.t % int(getattr(hp, layer.intervals[name])) == 0)
            if names:
                due[layer] = names
        self._due = due
        return due

    def owned_layers(self):
        """The K-FAC layers this process inverts and preconditions."""
        return self._kfac_layers_of('layers_of')

    def primary_layers(self):
        """The K-FAC layers whose factors this process reports: those it is
        the primary owner of (one process per layer)."""
        return self._kfac_layers_of('primary_layers_of')

    def _kfac_layers_of(self, method):
        if self.assignment is None:
            return []
        return [self.kfac_layers[i]
                for i in getattr(self.assignment, method)(self.rank)
                if self.blocks[i].layer is not None]

    # -- the plan ------------------------------------------------------------
    def plan(self):
        """The layer assignment (:attr:`assignment`), made now if it is not
        yet.  Call it on every rank; the model's parameters must be
        initialized (the first update makes it otherwise)."""
        if self.assignment is None:
            if any(p.array is None
                   for p in self.target.params(include_uninit=True)):
                raise RuntimeError(
                    'K-FAC: the layer assignment needs initialized '
                    'parameters (run one forward pass first)')
            self._make_plan()
        return self.assignment

    def _make_plan(self):
        covered = set(id(p) for layer in self.kfac_layers
                      for p in layer.params)
        blocks = [Block(layer.name, layer, layer.params)
                  for layer in self.kfac_layers]
        other = [p for _, p in self.target.namedparams(include_uninit=False)
                 if id(p) not in covered]
        if other:
            blocks.append(Block(OTHER_BLOCK_NAME, None, other))
        costs = [b.cost() for b in blocks]
        plan = assignment_module.assign(costs, self.size)
        signature = (tuple(b.name for b in blocks), plan.owners, plan.primary)
        if self.size > 1:
            if not self.kfac_comm.agree(signature):
                raise RuntimeError(
                    'K-FAC: the layer assignment differs between ranks '
                    '(different models or parameter shapes?)')
        self.blocks = blocks
        self.assignment = plan
        self._owned = frozenset(plan.layers_of(self.rank))
        self.plan_lines = assignment_module.format_plan(
            plan, [b.name for b in blocks], costs)
        if self.print_plan and self.rank == 0:
            print('\n'.join(self.plan_lines))
            sys.stdout.flush()

    def _due_pieces(self):
        """``[(block index, factor name)]`` due now, checked present."""
        index = {id(b.layer): i for i, b in enumerate(self.blocks)
                 if b.layer is not None}
        out = []
        for layer, names in self._due.items():
            for name in layer.factor_names:
                if name not in names:
                    continue
                if layer.state.get(name) is None:
                    raise RuntimeError(
                        'K-FAC: factor {} of link {} is due but was not built '
                        'on rank {}: every K-FAC link must be called in the '
                        'forward pass on every rank'.format(
                            name, layer.name, self.rank))
                out.append((index[id(layer)], name))
        return tuple(sorted(out))

    def _stage3_groups(self, due):
        """Stage-3 buffers (one per dtype) for the due factors ``due``."""
        groups = self._stage3.get(due)
        if groups is not None:
            return groups
        names_of = collections.defaultdict(list)
        for i, name in due:
            names_of[i].append(name)
        by_dtype = {}

        def group(dtype):
            dtype = numpy.dtype(dtype)
            if dtype not in by_dtype:
                by_dtype[dtype] = _Group(dtype, self.size)
            return by_dtype[dtype]

        for r in range(self.size):
            for i in self.assignment.layers_of(r):
                block = self.blocks[i]
                for j, p in enumerate(block.params):
                    group(p.dtype).add(r, ('grad', i, j), p.size)
                if block.layer is None:
                    continue
                shapes = block.layer.factor_shapes()
                for name in names_of.get(i, ()):
                    group(block.layer.factor_dtype).add(
                        r, ('factor', i, name),
                        packing.packed_size(shapes[name]))
        groups = [by_dtype[d] for d in sorted(by_dtype, key=str)]
        xp = self.target.xp
        for g in groups:
            g.finish(self.kfac_comm, xp)
            g.recvbuf = xp.empty(g.counts[self.rank], g.dtype)
        self._stage3[due] = groups
        return groups

    def _stage6_groups(self):
        if self._stage6 is None:
            by_dtype = {}
            for r in range(self.size):
                for i in self.assignment.primary_layers_of(r):
                    for j, p in enumerate(self.blocks[i].params):
                        dtype = numpy.dtype(p.dtype)
                        if dtype not in by_dtype:
                            by_dtype[dtype] = _Group(dtype, self.size)
                        by_dtype[dtype].add(r, ('grad', i, j), p.size)
            self._stage6 = [by_dtype[d] for d in sorted(by_dtype, key=str)]
            for g in self._stage6:
                g.finish(self.kfac_comm, self.target.xp)
        return self._stage6

    # -- stage 3 -------------------------------------------------------------
    def reduce_scatter(self):
        """Stage 3: averaged gradients and factors onto their owners."""
        with self._stage('reduce_scatter'):
            if self.assignment is None:
                self._make_plan()
            due = self._due_pieces()
            groups = self._stage3_groups(due)
            scales = self._agree_scales(due)
            grad_coef = 1.0 / self.size if self.loss_reduction == 'mean' \
                else 1.0
            counters = self.comm_counters
            for g in groups:
                self._pack_stage3(g, scales, grad_coef)
                if g.total == 0:
                    continue
                self.kfac_comm.reduce_scatter(g.sendbuf, g.recvbuf, g.counts)
                counters['reduce_scatter_calls'] += 1
                self._unpack_stage3(g, scales)
                self._count_stage3(g)
            self._drop_foreign_factors(due)
            for i, name in due:
                self._built.add((self.blocks[i].name, name))

    def _agree_scales(self, due):
        """``{(i, name): S}``: the common scale of each due factor (float16:
        the MAX over ranks of the power-of-two scales; otherwise 1)."""
        xp = self.target.xp
        scales = {}
        half = []
        for i, name in due:
            layer = self.blocks[i].layer
            scale = layer.state[name + '_scale']
            if layer.factor_dtype == factors_module.FLOAT16:
                half.append((i, name))
            else:
                scales[(i, name)] = xp.ones((), scale.dtype)
        if half:
            local = xp.stack([
                self.blocks[i].layer.state[name + '_scale'].astype(
                    numpy.float64) for i, name in half])
            agreed = self.kfac_comm.allreduce_max(local)
            self.comm_counters['scale_allreduce_calls'] += 1
            self.comm_counters['scale_bytes'] += local.size * 8
            for k, key in enumerate(half):
                dtype = self.blocks[key[0]].layer.state[
                    key[1] + '_scale'].dtype
                scales[key] = agreed[k].astype(dtype)
        return scales

    def _pack_stage3(self, g, scales, grad_coef):
        """Every rank's segment: gradients × coef, factors' triangles
        brought to the common scale and divided by P."""
        xp = self.target.xp
        buf = g.sendbuf
        packed = {}  # a factor with several owners is packed once
        for r in range(self.size):
            for offset, piece, n in g.positions(r):
                out = buf[offset:offset + n]
                kind, i, x = piece
                block = self.blocks[i]
                if kind == 'grad':
                    grad = block.params[x].grad.reshape(-1)
                    if grad_coef == 1.0:
                        out[...] = grad
                    else:
                        xp.multiply(grad, grad_coef, out=out,
                                    casting='unsafe')
                    continue
                values = packed.get((i, x))
                if values is None:
                    layer = block.layer
                    data = layer.state[x]
                    scale = layer.state[x + '_scale']
                    coef = scale / (scales[(i, x)] * self.size)
                    tri = packing.pack(data) if data.ndim == 2 else \
                        data.reshape(-1)
                    values = tri.astype(scale.dtype, copy=False) * coef
                    packed[(i, x)] = values
                out[...] = values  # cast to the buffer dtype

    def _unpack_stage3(self, g, scales):
        recv = g.recvbuf
        offset = 0
        for piece, n in g.entries[self.rank]:
            kind, i, x = piece
            block = self.blocks[i]
            if kind == 'grad':
                param = block.params[x]
                param.grad[...] = recv[offset:offset + n].reshape(
                    param.grad.shape)
            else:
                shape = block.layer.factor_shapes()[x]
                data, _ = packing.unpack_from(recv, offset, shape)
                block.layer.set_factor(x, data, scales[(i, x)])
            offset += n

    def _count_stage3(self, g):
        counters = self.comm_counters
        itemsize = g.dtype.itemsize
        for r in range(self.size):
            for piece, n in g.entries[r]:
                if piece[0] == 'grad':
                    counters['gradient_elements'] += n
                    counters['gradient_bytes'] += n * itemsize
                else:
                    counters['factor_elements'] += n
                    counters['factor_bytes'] += n * itemsize
                    shape = self.blocks[piece[1]].layer.factor_shapes()[
                        piece[2]]
                    counters['factor_dense_fp32_bytes'] += 4 * int(
                        numpy.prod(shape))

    def _drop_foreign_factors(self, due):
        """Non-owners keep no factors of a layer (only its owners do)."""
        for i, name in due:
            if i not in self._owned:
                layer = self.blocks[i].layer
                layer.state[name] = None
                layer.state[name + '_scale'] = None

    # -- stage 6 -------------------------------------------------------------
    def all_gather(self):
        """Stage 6: every rank gets every block's preconditioned gradient
        from its primary owner."""
        with self._stage('all_gather'):
            counters = self.comm_counters
            for g in self._stage6_groups():
                buf = g.sendbuf  # in place: each rank fills its segment
                for offset, piece, n in g.positions(self.rank):
                    _, i, j = piece
                    buf[offset:offset + n] = \
                        self.blocks[i].params[j].grad.reshape(-1)
                if g.total == 0:
                    continue
                self.kfac_comm.all_gather(buf, g.counts)
                counters['all_gather_calls'] += 1
                for r in range(self.size):
                    for offset, piece, n in g.positions(r):
                        _, i, j = piece
                        param = self.blocks[i].params[j]
                        param.grad[...] = buf[offset:offset + n].reshape(
                            param.grad.shape)
                mine = g.counts[self.rank]
                counters['preconditioned_elements'] += mine
                counters['preconditioned_bytes'] += mine * g.dtype.itemsize
            counters['updates'] += 1
        self._report()

    def _report(self):
        """Per-update byte counts to the active reporter, if any."""
        values = {'comm/' + key: self.comm_counters[key] - self._reported[key]
                  for key in REPORTED_KEYS}
        self._reported = dict(self.comm_counters)
        framework.report_to_observer(values, self.target)

    # -- snapshots -----------------------------------------------------------
    def serialize(self, serializer):
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
            mpi_comm = getattr(self.comm, 'mpi_comm', self.comm)
            missing = [key for part in mpi_comm.allgather(missing)
                       for key in part]
        self._built.difference_update(missing)
        self._loaded = False
