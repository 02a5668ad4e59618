"""Distributed K-FAC: Algorithm 1 of Osawa et al. (CVPR 2019) over P processes.

:class:`DistributedKFAC` is :class:`~chainerkfac.optimizers.KFAC` given the
exchange of P processes
(:class:`chainerkfac.distributed.exchange.CollectiveExchange`): one update
runs the same code for any P, on every process (per-process batch b):

1. (at ``setup``) the parameters are broadcast from rank 0 (those of lazily
   sized links as soon as the first forward initializes them, so the first
   gradients are already those of rank 0's weights);
2. the due factors (:meth:`~KFAC.due_factors`: by the same rule on every
   rank), then stages 1-2: forward / backward on the local batch, run by
   ``update(lossfun)`` or by the caller, whose backward builds them
   (accumulation included);
3. the plan, made once (:mod:`chainerkfac.distributed.plan`): every *block*
   (a K-FAC layer, or the pseudo-block ``'(other)'`` of the parameters
   outside K-FAC layers) has owners
   (:func:`chainerkfac.distributed.assignment.assign`);
4. stage 3, :meth:`~KFAC.reduce_scatter` (due): ONE ReduceScatterV per dtype
   of the gradients and of the due factors (A, G, the BN Fisher), laid out
   by :mod:`chainerkfac.distributed.layout`: a block's averaged gradient and
   factors land only on its owners.  Factors travel as upper triangles
   (N(N+1)/2 values; the diagonal BN Fisher as its 2C values); a stale step
   sends only the gradients;
5. stage 4, :meth:`~KFAC.invert`, and stage 5, :meth:`~KFAC.precondition`:
   each owner inverts its layers' factors and preconditions their gradients
   (over :meth:`~KFAC.owned_layers`);
6. stage 6, :meth:`~KFAC.all_gather`: ONE AllGatherV per dtype of the
   preconditioned gradients, each block taken from its primary owner;
7. every process runs the optimizer hooks on the same directions (with
   ``kl_clip``, scaled by the ν of the summed Σ 𝒢·∇L) and applies the same
   update rule (eq. 17/18), so the parameters stay identical on every
   process.

What each process sent is counted in :attr:`~KFAC.comm_counters`
(:class:`chainerkfac.distributed.counters.CommCounters`).  Float16 factors
(``factor_dtype='float16'``) are stored as data × scale with a power-of-two
scale per process; a tiny MAX all-reduce agrees on one scale per factor, the
data are brought to it (exact: a power of two) and divided by P before the
float16 sum, so the sum stays ≤ 1 and never overflows.  They are inverted in
float32 by their owner.
"""

import typing

from chainerkfac.distributed import communicator as communicator_module
from chainerkfac.distributed import exchange as exchange_module
from chainerkfac.optimizers import kfac

# re-exported: their home is the distribution package
from chainerkfac.distributed.counters import COUNTER_KEYS  # NOQA
from chainerkfac.distributed.counters import REPORTED_KEYS  # NOQA
from chainerkfac.distributed.plan import Block  # NOQA
from chainerkfac.distributed.plan import OTHER_BLOCK_NAME  # NOQA
from chainerkfac.optimizers.kfac import plan_logger  # NOQA


class DistributedKFAC(kfac.KFAC):
    """K-FAC over the processes of a ChainerMN communicator (Algorithm 1).

    Use it instead of ``chainermn.create_multi_node_optimizer`` (which would
    all-reduce raw gradients): this optimizer owns the whole iteration.  Call
    ``setup`` and then ``update(lossfun, *args)`` (or ``loss.backward();
    update()``) on every process with its local batch.

    Args:
        comm: a ChainerMN communicator (``'naive'`` on CPU, ``'pure_nccl'``
            on GPU; one process per GPU).
        *args, **kwargs: the arguments of :class:`KFAC` (``lr``,
            ``momentum``, ``damping``, ``bn_damping_ratio``, ``a_interval``,
            ``g_interval``, ``weight_rescaling``, ``kl_clip``, ``bn_fisher``,
            ``factor_dtype``, ``loss_reduction``, ``accumulation_steps``...).
        abort_on_exception (bool): when P > 1, an uncaught exception on any
            rank ends all of them with one line
            (:func:`chainerkfac.distributed.communicator.install_abort_hook`).
        print_plan (bool): log the layer assignment (logger
            ``chainerkfac.plan``, INFO) on rank 0 when it is made.

    Attributes:
        comm: the ChainerMN communicator.
        stage_seconds: as in :class:`KFAC`, with ``'reduce_scatter'`` and
            ``'all_gather'`` (packing, the collective and unpacking).
    """

    def __init__(self, comm: typing.Any, *args, **kwargs):
        abort_on_exception = kwargs.pop('abort_on_exception', True)
        print_plan = kwargs.pop('print_plan', True)
        exchange = exchange_module.CollectiveExchange(comm)
        super(DistributedKFAC, self).__init__(*args, exchange=exchange,
                                              **kwargs)
        self.comm = comm
        self.print_plan = print_plan
        if abort_on_exception and exchange.size > 1:
            communicator_module.install_abort_hook()

    @property
    def kfac_comm(self) -> communicator_module.CommunicatorBase:
        """The K-FAC communicator of stages 3 and 6 (MPI or NCCL)."""
        return self.exchange.communicator

    @kfac_comm.setter
    def kfac_comm(self, value: communicator_module.CommunicatorBase) -> None:
        self.exchange.communicator = value

    @property
    def rank(self) -> int:
        return self.exchange.rank

    @property
    def size(self) -> int:
        return self.exchange.size
