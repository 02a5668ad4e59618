"""``chainerkfac-train``: train ResNet-50 on ImageNet with distributed K-FAC
(Osawa et al., CVPR 2019).

``python scripts/train_imagenet.py`` takes the same arguments; ``--help``
(:data:`EPILOG`) says what the command does and writes.  Bad input (config,
dataset paths) stops every rank with a one-line error before any work
starts; a missing MPI library is one line naming the fix
(:func:`chainerkfac.commands.require_mpi`); SIGINT or SIGTERM ends the run
with one line naming the last complete snapshot and the command that
resumes it (:func:`resume_command`); a finished run prints where its log,
plots, layer assignment and final snapshot are.
"""

import argparse
import glob
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import textwrap
import threading
import typing

import chainerkfac  # noqa: F401 (first: makes Chainer importable)
from chainerkfac import commands
from chainerkfac import config as config_module
from chainerkfac import errors
from chainerkfac.distributed import communicator
from chainerkfac.training import snapshot
from chainerkfac.training import trainer as trainer_module
from chainerkfac.training.trainer import UsageError

DESCRIPTION = """\
Train ResNet-50 on ImageNet, or on any ImageNet-style folder tree or file
list, with distributed K-FAC (Osawa et al., CVPR 2019): one process per
GPU, or per CPU core."""

EPILOG = """\
examples:
  mpiexec -n 2 chainerkfac-train --config synthetic.yaml
  mpirun -n 1024 chainerkfac-train --config bs32k.yaml \\
      --set data.train=/data/imagenet/train data.val=/data/imagenet/val \\
      --out result/bs32k

{configs}
The global batch is the per-process batch x processes x accumulation
steps; the accumulation steps follow from the config and the number of
processes.  Under --out the run writes: log (JSON, one entry per
log_interval), the *.png plots, plan.txt (the layer assignment),
snapshot_iter_<n>/ folders and the cached mean image.  A run stopped by
Ctrl-C or SIGTERM continues with the same command plus --resume auto, on
the same or another number of processes.
"""


def parse_args(argv: typing.Optional[typing.List[str]] = None
               ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(configs=textwrap.fill(
            'Packaged configs: {} (bs4k to bs131k: Table 3 of the paper).'
            .format(', '.join(packaged_configs())), 72)))
    parser.add_argument('--config', required=True, metavar='CONFIG',
                        help='a YAML file, or the name of a packaged config '
                        '(required)')
    parser.add_argument('--set', nargs='+', action='extend', default=[],
                        metavar='KEY=VALUE',
                        help='override config keys by their dotted names, '
                        'e.g. train.epochs=2 (default: none)')
    parser.add_argument('--resume', default=None, metavar='SNAPSHOT',
                        help="continue from this snapshot folder, or 'auto': "
                        'the newest complete one in --out (default: start '
                        'anew)')
    parser.add_argument('--out', default='result', metavar='DIR',
                        help='output folder (default: result)')
    parser.add_argument('--check-data', action='store_true',
                        help='read every training and validation image as '
                        'training would (all processes, data.loaderjobs '
                        'workers each), list the unreadable ones and exit '
                        '(1 if any); nothing is written (default: off)')
    parser.add_argument('--progress-bar', action='store_true',
                        help="draw Chainer's progress bar on rank 0; it "
                        'redraws itself with terminal control codes, so '
                        'only for a terminal, not a log file (default: off)')
    parser.add_argument('--debug', action='store_true',
                        help='print the traceback of an error before its '
                        'one line (default: off)')
    return parser.parse_args(argv)


def packaged_configs() -> typing.List[str]:
    """The names ``--config`` takes without a path, by batch size."""
    names = [os.path.splitext(name)[0]
             for name in config_module.config_names()]

    def key(name):
        digits = ''.join(c for c in name.split('_')[0] if c.isdigit())
        return (not digits, int(digits or 0), name)
    return sorted(names, key=key)


def show_trainer_log() -> None:
    """Prints what the trainer logs (``chainerkfac.trainer``: the run's
    configuration, the layer assignment in one line, what was resumed)."""
    commands.show_log(trainer_module.logger.name)


def resume_command(args: argparse.Namespace, size: int,
                   argv0: typing.Optional[str] = None) -> str:
    """The command line that continues this run: this command (``argv0``,
    default ``sys.argv[0]``: its name alone when the PATH finds it; a
    script after this Python) with the same ``--config``, ``--set``,
    ``--out`` and flags, and ``--resume auto``; ``mpiexec -n P`` in front
    when the run has ``size`` > 1 processes."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    words = ['mpiexec', '-n', str(size)] if size > 1 else []
    if argv0.endswith('.py'):
        words += [sys.executable, argv0]
    else:  # the command's name when the PATH finds this very file
        name = os.path.basename(argv0)
        found = shutil.which(name)
        same = found is not None and os.path.exists(argv0) and \
            os.path.samefile(found, argv0)
        words.append(name if same else argv0)
    words += ['--config', args.config]
    if args.set:
        words += ['--set'] + list(args.set)
    words += ['--out', args.out, '--resume', 'auto']
    words += [flag for flag, name in (('--progress-bar', 'progress_bar'),
                                      ('--debug', 'debug'))
              if getattr(args, name, False)]
    return ' '.join(shlex.quote(w) for w in words)


def stop_line(args: argparse.Namespace, size: int, signum: int) -> str:
    """The line a run stopped by signal ``signum`` ends with."""
    last = snapshot.find_latest_snapshot(args.out)
    return 'stopped by {}: last complete snapshot: {}; resume with: {}'.format(
        signal.Signals(signum).name,
        last if last is not None else 'none yet (resuming starts anew)',
        resume_command(args, size))


#: launchers whose output a stopped process writes to directly
LAUNCHERS = ('mpiexec', 'mpirun', 'orterun', 'prterun')


def write_stop_line(line: str) -> None:
    """Writes ``line`` where the user sees it: Open MPI's mpiexec, on Ctrl-C
    or SIGTERM, sends SIGTERM to every process and no longer forwards their
    output, so when the launcher is this process's parent (rank 0 on the
    launching node) the line goes straight to the launcher's stderr; else
    to this process's stderr."""
    sys.stdout.flush()
    parent = os.getppid()
    try:
        launcher = os.path.basename(os.readlink(
            '/proc/{}/exe'.format(parent)))
        if launcher.startswith(LAUNCHERS):
            with open('/proc/{}/fd/2'.format(parent), 'w') as f:
                f.write(line + '\n')
            return
    except OSError:
        pass
    sys.stderr.write(line + '\n')
    sys.stderr.flush()


def install_stop_handlers(args: argparse.Namespace, rank: int,
                          size: int) -> None:
    """SIGINT and SIGTERM end the run with exit status 128 + the signal
    number; rank 0 first writes :func:`stop_line`
    (:func:`write_stop_line`).  The exit unwinds the trainer (its
    extensions and data loader workers are finalized); a second signal ends
    the process at once.

    Python runs a signal handler only between bytecodes, and rank 0 may
    wait in a collective for a rank the launcher has already ended: a
    thread woken by the signal (``signal.set_wakeup_fd``) writes the line
    then, while the main thread waits without the GIL."""
    said = []
    lock = threading.Lock()

    def say(signum):
        with lock:
            if rank == 0 and not said:
                said.append(signum)
                write_stop_line(stop_line(args, size, signum))

    def handler(signum, frame):
        if getattr(handler, 'stopping', False):
            os._exit(128 + signum)
        handler.stopping = True
        say(signum)
        sys.exit(128 + signum)

    if rank == 0:
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)

        def watch():  # the byte of every signal Python handles
            for data in iter(lambda: os.read(read, 1), b''):
                if data[0] in (signal.SIGINT, signal.SIGTERM):
                    say(data[0])
                    return
        threading.Thread(target=watch, name='stop-line',
                         daemon=True).start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def output_lines(out: str) -> typing.List[str]:
    """Where a finished run's log, plots, layer assignment and final
    snapshot are."""
    plots = sorted(glob.glob(os.path.join(out, '*.png')))
    lines = ['log: {}'.format(os.path.join(out, 'log')),
             'plots: {}'.format(', '.join(plots) if plots else
                                'none (matplotlib is not installed)')]
    plan = os.path.join(out, trainer_module.PLAN_FILE)
    if os.path.exists(plan):
        lines.append('layer assignment table: {}'.format(plan))
    lines.append('final snapshot: {}'.format(
        snapshot.find_latest_snapshot(out)))
    return lines


def run(args: argparse.Namespace) -> typing.Any:
    """The run ``args`` ask for: the trained trainer (None for
    ``--check-data``)."""
    job = trainer_module.prepare(args.config, args.set)
    comm = job.comm
    if args.check_data:
        if trainer_module.check_data(comm, job.cfg, job.pairs):
            sys.exit(1)
        return None
    trainer = trainer_module.build_trainer(job, args.out, args.resume,
                                           progress_bar=args.progress_bar)
    try:
        trainer.run(show_loop_exception_msg=args.debug)
    except FloatingPointError as e:  # non-finite loss or parameters
        last = snapshot.find_latest_snapshot(args.out)
        sys.stderr.write('error: {} (last good snapshot: {})\n'.format(
            errors.one_line(e), last))
        sys.stderr.flush()
        communicator.create_communicator(comm).abort(3)
    except snapshot.SnapshotError as e:  # raised on every rank
        if comm.rank == 0:
            sys.stderr.write('error: {} (last complete snapshot: {})\n'
                             .format(e, snapshot.find_latest_snapshot(
                                 args.out)))
        sys.exit(1)
    if comm.rank == 0:
        for line in output_lines(args.out):
            print(line)
        line = trainer_module.accuracy_line(
            trainer, job.cfg.train.accuracy_target)
        if line:
            print(line)
    return trainer


def main(argv: typing.Optional[typing.List[str]] = None) -> None:
    """The command: parses ``argv`` (default ``sys.argv[1:]``) and trains;
    bad input exits with status 2 and one ``error:`` line (rank 0)."""
    args = parse_args(argv)
    commands.require_mpi()
    world = communicator.world()
    # from here on, an error on any rank ends every rank with its one line
    communicator.install_abort_hook(debug=args.debug)
    install_stop_handlers(args, world.rank, world.size)
    # workers of the data loader must not fork an MPI process
    multiprocessing.set_start_method('forkserver', force=True)
    show_trainer_log()
    try:
        run(args)
    except UsageError as e:
        if world.rank == 0:
            sys.stderr.write('error: {}\n'.format(e))
        sys.exit(2)


if __name__ == '__main__':
    main()
