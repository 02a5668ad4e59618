"""Run under mpiexec -n 2 by ``tests/test_errors.py``: rank 1 fails in
:func:`chainerkfac.distributed.agreement.agree` (on every rank) and rank 0
in :func:`~chainerkfac.distributed.agreement.on_root`; each rank prints the
lines it raised."""

import chainerkfac  # NOQA: F401 (before chainer)
from chainerkfac.distributed import agreement
from mpi4py import MPI


def fail_on(rank):
    def step():
        if MPI.COMM_WORLD.rank == rank:
            raise OSError('disk\nfull')
        return MPI.COMM_WORLD.rank
    return step


def main():
    world = MPI.COMM_WORLD
    lines = []
    for run in (lambda: agreement.agree(world, fail_on(1), what='step'),
                lambda: agreement.on_root(world, fail_on(0),
                                          error=ValueError)):
        try:
            run()
            lines.append('no error')
        except (RuntimeError, ValueError) as e:
            lines.append('{}: {}'.format(type(e).__name__, e))
    print('rank {}: {}'.format(world.rank, ' | '.join(lines)), flush=True)
    results = agreement.agree(world, lambda: world.rank * 10)
    print('results: {}'.format(results))


if __name__ == '__main__':
    main()
