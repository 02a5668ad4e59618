"""The console commands: argument parsing, then library calls.

- ``chainerkfac-train`` (:mod:`~chainerkfac.commands.train`): the ImageNet
  trainer (``scripts/train_imagenet.py`` from a checkout);
- ``chainerkfac-make-synthetic``
  (:mod:`~chainerkfac.commands.make_synthetic`): the demo's data;
- :mod:`~chainerkfac.commands.gpu_check`: the runner of
  ``scripts/gpu_check.sh`` (standard library only).

The library logs (logger ``chainerkfac``); a command shows that log as its
output with :func:`show_log`.
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
