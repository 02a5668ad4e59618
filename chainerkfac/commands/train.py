"""``chainerkfac-train``: train ResNet-50 on ImageNet with distributed K-FAC
(Osawa et al., 2019).

Usage::

    mpirun -n N chainerkfac-train --config bs32k.yaml \\
        --set data.train=/data/imagenet/train data.val=/data/imagenet/val
    mpiexec -n 2 chainerkfac-train --config synthetic.yaml

(``python scripts/train_imagenet.py`` takes the same arguments.)  CONFIG is
a path or the name of a packaged config (``bs4k`` ... ``bs131k``,
``bs32k_eq21``, ``synthetic``); ``--set`` overrides any key by its dotted
name, typed and validated like the file.  Everything the run writes goes
under ``--out`` (default ``result/``): the JSON ``log``, the ``*.png``
plots, the ``snapshot_iter_*`` folders and the cached mean image.
``--resume SNAPSHOT`` (or ``--resume auto``: the newest complete snapshot in
``--out``) continues a run: exactly on the same number of processes; on
another, with the layer assignment re-planned and all factors kept (see
:mod:`chainerkfac.training.snapshot`).  A snapshot of another config (keys
outside ``chainerkfac.config.MAY_DIFFER_ON_RESUME``) is refused.

The global batch BS = per-process batch × processes × accumulation steps:
the accumulation steps are derived from the config and the number of
processes.  Bad input (config, dataset paths) stops every rank with a one-line
error before any work starts.
"""

import argparse
import multiprocessing
import sys
import typing

import chainerkfac  # noqa: F401 (first: makes Chainer importable)
from chainerkfac import commands
from chainerkfac import errors
from chainerkfac.distributed import communicator
from chainerkfac.training import snapshot
from chainerkfac.training import trainer as trainer_module
from chainerkfac.training.trainer import UsageError


def parse_args(argv: typing.Optional[typing.List[str]] = None
               ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--config', required=True,
                        help='YAML file, or the name of a packaged config')
    parser.add_argument('--set', nargs='+', action='extend', default=[],
                        metavar='KEY=VALUE',
                        help='override config keys (dotted names)')
    parser.add_argument('--resume', default=None,
                        help="snapshot to continue from, or 'auto'")
    parser.add_argument('--out', default='result',
                        help='output directory (default: result/)')
    parser.add_argument('--check-data', action='store_true',
                        help='read every training and validation image as '
                        'training would (all processes, data.loaderjobs '
                        'workers each), list the unreadable ones and exit '
                        '(1 if any); nothing is written')
    parser.add_argument('--debug', action='store_true',
                        help='print the traceback of an error before its '
                        'one line')
    return parser.parse_args(argv)


def show_trainer_log() -> None:
    """Prints what the trainer logs (``chainerkfac.trainer``) and the layer
    assignment DistributedKFAC logs (``chainerkfac.plan``)."""
    commands.show_log(trainer_module.logger.name)
    commands.show_log('chainerkfac.plan')


def run(args: argparse.Namespace) -> typing.Any:
    """The run ``args`` ask for: the trained trainer (None for
    ``--check-data``)."""
    job = trainer_module.prepare(args.config, args.set)
    comm = job.comm
    if args.check_data:
        if trainer_module.check_data(comm, job.cfg, job.pairs):
            sys.exit(1)
        return None
    trainer = trainer_module.build_trainer(job, args.out, args.resume)
    try:
        trainer.run(show_loop_exception_msg=args.debug)
    except FloatingPointError as e:  # non-finite loss or parameters
        last = snapshot.find_latest_snapshot(args.out)
        sys.stderr.write('error: {} (last good snapshot: {})\n'.format(
            errors.one_line(e), last))
        sys.stderr.flush()
        comm.mpi_comm.Abort(3)
    except snapshot.SnapshotError as e:  # raised on every rank
        if comm.rank == 0:
            sys.stderr.write('error: {} (last complete snapshot: {})\n'
                             .format(e, snapshot.find_latest_snapshot(
                                 args.out)))
        sys.exit(1)
    if comm.rank == 0:
        print('final snapshot: {}'.format(
            snapshot.find_latest_snapshot(args.out)))
        line = trainer_module.accuracy_line(
            trainer, job.cfg.train.accuracy_target)
        if line:
            print(line)
    return trainer


def main(argv: typing.Optional[typing.List[str]] = None) -> None:
    """The command: parses ``argv`` (default ``sys.argv[1:]``) and trains;
    bad input exits with status 2 and one ``error:`` line (rank 0)."""
    args = parse_args(argv)
    # from here on, an error on any rank ends every rank with its one line
    communicator.install_abort_hook(debug=args.debug)
    # workers of the data loader must not fork an MPI process
    multiprocessing.set_start_method('forkserver', force=True)
    show_trainer_log()
    try:
        run(args)
    except UsageError as e:
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank == 0:
            sys.stderr.write('error: {}\n'.format(e))
        sys.exit(2)


if __name__ == '__main__':
    main()
