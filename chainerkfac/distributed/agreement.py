"""Agreement on an outcome: one line, raised on every process.

A step that can fail on some processes only (reading a file list on rank 0,
choosing a device, writing a rank's snapshot file) must not leave the other
processes waiting in the next collective: :func:`agree` runs the step (on
rank 0, or on every rank), exchanges the outcome, and when any process
failed every process raises the same exception with the same one line
(:func:`chainerkfac.errors.one_line`).  The collectives of the optimizer
and the snapshots go through :mod:`chainerkfac.distributed.communicator`;
this module's two (a broadcast, a gather of objects) run on the processes'
mpi4py communicator, or on one process without MPI.
"""

import typing

from chainerkfac.errors import one_line

__all__ = ['agree', 'on_root', 'as_mpi']


class _OneProcess(object):
    """The mpi4py calls :func:`agree` makes, on one process."""

    rank = 0
    size = 1

    def bcast(self, obj: typing.Any, root: int = 0) -> typing.Any:
        return obj

    def allgather(self, obj: typing.Any) -> list:
        return [obj]


def as_mpi(comm: typing.Any) -> typing.Any:
    """An mpi4py-like communicator: ChainerMN's ``mpi_comm``, an mpi4py
    communicator as is, or one process for None."""
    if comm is None:
        return _OneProcess()
    return getattr(comm, 'mpi_comm', comm)


def agree(comm: typing.Any, function: typing.Callable[[], typing.Any],
          root: typing.Optional[int] = None,
          catch: typing.Any = Exception,
          error: typing.Type[Exception] = RuntimeError,
          what: typing.Optional[str] = None,
          name_rank: bool = False) -> typing.Any:
    """``function()`` on rank ``root`` of ``comm`` (None: on every rank),
    its outcome known to every rank.

    Returns ``function()``'s result (``root`` given) or the list of every
    rank's results (``root=None``).  When it raises a ``catch`` exception
    on some rank, every rank raises ``error`` with the same line:
    ``[<what>: ][rank <r>: ]<one_line(exception)>``, naming the first rank
    that failed unless only ``root`` ran or every rank failed alike (and
    ``name_rank`` is false).

    Args:
        comm: a ChainerMN or mpi4py communicator, or None (one process).
        function: the step, called without arguments.
        root (int): the one rank that runs it, or None: every rank.
        catch: the exception type(s) turned into ``error``; others
            propagate on the rank that raised them.
        error: the exception type raised on every rank.
        what (str): what failed, at the start of the line.
        name_rank (bool): name the first rank that failed even when every
            rank failed alike (a rank's own file, disk or state).
    """
    mpi = as_mpi(comm)
    result = message = None
    if root is None or mpi.rank == root:
        try:
            result = function()
        except catch as e:
            message = one_line(e)
    if root is not None:
        result, message = mpi.bcast((result, message), root=root)
        failed = [(root, message)] if message is not None else []
        alike = True
    else:
        reports = mpi.allgather((result, message))
        failed = [(r, m) for r, (_, m) in enumerate(reports) if m is not None]
        alike = len(failed) == len(reports) and \
            len(set(m for _, m in failed)) == 1
        result = [r for r, _ in reports]
    if not failed:
        return result
    rank, message = failed[0]
    if not alike or (name_rank and root is None):
        message = 'rank {}: {}'.format(rank, message)
    if what is not None:
        message = '{}: {}'.format(what, message)
    raise error(message)


def on_root(comm: typing.Any, function: typing.Callable[[], typing.Any],
            catch: typing.Any = Exception,
            error: typing.Type[Exception] = RuntimeError) -> typing.Any:
    """``function()`` on rank 0 (:func:`agree` with ``root=0``): its
    result on every rank, or ``error`` with its exception's line."""
    return agree(comm, function, root=0, catch=catch, error=error)
