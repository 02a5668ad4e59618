"""The two collectives of distributed K-FAC (Sec. 3.3) over one flat buffer.

:class:`chainerkfac.optimizers.DistributedKFAC` lays out every stage as ONE
flat buffer per dtype, split into one *segment* per rank (rank r's segment
holds what r receives in stage 3, or what r sends in stage 6), and calls:

* ``reduce_scatter(sendbuf, recvbuf, counts)``: stage 3, ReduceScatterV with
  SUM: ``recvbuf[:counts[rank]]`` = Σ over ranks of their segment ``rank``;
* ``all_gather(buf, counts)``: stage 6, AllGatherV in place: each rank's
  segment of ``buf`` is filled in by that rank, afterwards every rank holds
  every segment;
* ``allreduce_max(array)``: the tiny agreement on the float16 factor scales.

Where the segments sit in the buffer is the communicator's business
(:meth:`displacements`): MPI packs them back to back (true variable counts),
NCCL, which only has equal-count collectives, pads every segment to the
largest count.  One class per strategy, as in ChainerMN:

* :class:`MpiCommunicator`: mpi4py on ``comm.mpi_comm``, ``Reduce_scatter``
  with per-rank counts and ``Allgatherv`` with counts and displacements.
  MPI has no float16 type: float16 buffers travel as 16-bit words reduced by a
  user-defined op (``MPI.Op.Create``) that adds in float32 and rounds back.
  CuPy buffers are staged through host memory.
* :class:`NcclCommunicator`: NCCL through a ChainerMN ``pure_nccl``
  communicator, padded equal-count ``reduceScatter`` / ``allGather``
  (float16 is native in NCCL).  **Not exercised by the tests** (no GPU).
"""

import numpy

from chainer import backend


def create_communicator(comm):
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


class CommunicatorBase(object):
    """What :class:`~chainerkfac.optimizers.DistributedKFAC` needs."""

    rank = 0
    size = 1

    def displacements(self, counts):
        """``(displs, total)``: where each rank's segment starts in a full
        buffer of ``total`` values."""
        raise NotImplementedError

    def reduce_scatter(self, sendbuf, recvbuf, counts):
        raise NotImplementedError

    def all_gather(self, buf, counts):
        raise NotImplementedError

    def allreduce_max(self, array):
        raise NotImplementedError

    def agree(self, obj):
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


def _to_host(array):
    return array if isinstance(array, numpy.ndarray) else array.get()


class MpiCommunicator(CommunicatorBase):
    """Variable-count collectives through mpi4py.

    Args:
        mpi_comm: an ``mpi4py.MPI.Comm`` (ChainerMN's ``comm.mpi_comm``).
    """

    def __init__(self, mpi_comm):
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.rank
        self.size = mpi_comm.size

    def displacements(self, counts):
        displs = [0] * len(counts)
        for r in range(1, len(counts)):
            displs[r] = displs[r - 1] + counts[r - 1]
        return displs, sum(counts)

    def reduce_scatter(self, sendbuf, recvbuf, counts):
        mpi_type = _mpi_type(sendbuf.dtype)
        host_send = _to_host(sendbuf)
        host_recv = recvbuf if isinstance(recvbuf, numpy.ndarray) else \
            numpy.empty(recvbuf.shape, recvbuf.dtype)
        self.mpi_comm.Reduce_scatter(
            [host_send, mpi_type], [host_recv, mpi_type],
            [int(c) for c in counts], _sum_op(sendbuf.dtype))
        if host_recv is not recvbuf:
            recvbuf.set(host_recv)

    def all_gather(self, buf, counts):
        from mpi4py import MPI
        host = _to_host(buf)
        displs, _ = self.displacements(counts)
        self.mpi_comm.Allgatherv(
            MPI.IN_PLACE, [host, [int(c) for c in counts],
                           [int(d) for d in displs], _mpi_type(buf.dtype)])
        if host is not buf:
            buf.set(host)

    def allreduce_max(self, array):
        from mpi4py import MPI
        host = numpy.ascontiguousarray(_to_host(array), dtype=numpy.float64)
        out = numpy.empty_like(host)
        self.mpi_comm.Allreduce([host, MPI.DOUBLE], [out, MPI.DOUBLE],
                                MPI.MAX)
        return backend.get_array_module(array).asarray(out).astype(
            array.dtype)


# -- NCCL --------------------------------------------------------------------

class NcclCommunicator(CommunicatorBase):
    """Equal-count NCCL collectives on segments padded to the largest count.

    Padding is left zero by the optimizer, so it adds nothing to the sums.
    Not exercised by the tests (they run on CPU).

    Args:
        comm: a ChainerMN ``pure_nccl`` communicator.
    """

    def __init__(self, comm):
        self.comm = comm
        self.mpi_comm = comm.mpi_comm
        self.rank = comm.rank
        self.size = comm.size

    def _nccl(self):
        self.comm._init_comms()
        return self.comm.nccl_comm

    def displacements(self, counts):
        width = max(counts) if counts else 0
        return [r * width for r in range(len(counts))], width * len(counts)

    @staticmethod
    def _type(dtype):
        from chainermn.communicators import _communication_utility
        return _communication_utility._get_nccl_type_id(numpy.dtype(dtype))

    def reduce_scatter(self, sendbuf, recvbuf, counts):
        import cupy
        from cupy.cuda import nccl
        width = max(counts)
        if recvbuf.size < width:  # NCCL writes the padding too
            padded = cupy.empty(width, recvbuf.dtype)
        else:
            padded = recvbuf
        stream = cupy.cuda.get_current_stream()
        self._nccl().reduceScatter(sendbuf.data.ptr, padded.data.ptr, width,
                                   self._type(sendbuf.dtype), nccl.NCCL_SUM,
                                   stream.ptr)
        if padded is not recvbuf:
            recvbuf[...] = padded[:recvbuf.size]

    def all_gather(self, buf, counts):
        import cupy
        width = max(counts)
        own = buf[self.rank * width:(self.rank + 1) * width]  # in place
        stream = cupy.cuda.get_current_stream()
        self._nccl().allGather(own.data.ptr, buf.data.ptr, width,
                               self._type(buf.dtype), stream.ptr)

    def allreduce_max(self, array):
        import cupy
        from cupy.cuda import nccl
        array = cupy.ascontiguousarray(array)
        out = cupy.empty_like(array)
        stream = cupy.cuda.get_current_stream()
        self._nccl().allReduce(array.data.ptr, out.data.ptr, array.size,
                               self._type(array.dtype), nccl.NCCL_MAX,
                               stream.ptr)
        return out
