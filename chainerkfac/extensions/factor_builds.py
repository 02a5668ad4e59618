"""The number of factor builds per epoch (stage 2's cost under stale or
adaptive refresh, :mod:`chainerkfac.refresh`)."""

import logging
import typing

import chainer
from chainer.training import extension

logger = logging.getLogger('chainerkfac')


class FactorBuilds(extension.Extension):

    """Logs, at the end of every epoch, how many factors (each A, G or BN
    Fisher of a layer counts 1) the optimizer built in it, out of the
    ``updates × factors`` of refreshing every factor at every update::

        epoch 3: 412 factor builds in 50 updates (0.515 of every factor at
        every update)

    (INFO, logger ``chainerkfac`` or ``log``, on the process that reports:
    rank 0).
    ``records`` keeps ``{'epoch', 'builds', 'updates', 'fraction'}`` per
    epoch.  The counts at the last epoch's end are in the trainer's
    snapshots, so a resumed run counts its first epoch right.

    Args:
        optimizer: the K-FAC optimizer; ``None``: the updater's main one.
        log: the logger (``chainerkfac-train`` passes its own, which it
            prints).
    """

    trigger = 1, 'epoch'
    priority = extension.PRIORITY_READER
    name = 'FactorBuilds'

    def __init__(self, optimizer: typing.Optional[chainer.Optimizer] = None,
                 log: typing.Optional[logging.Logger] = None) -> None:
        self._optimizer = optimizer
        self._log = log or logger
        self._builds = None
        self._t = None
        self.records = []

    def initialize(self, trainer: chainer.training.Trainer) -> None:
        optimizer = self._get(trainer)
        self._builds, self._t = optimizer.factor_builds, optimizer.t

    def _get(self, trainer):
        return self._optimizer or trainer.updater.get_optimizer('main')

    def __call__(self, trainer: chainer.training.Trainer) -> None:
        optimizer = self._get(trainer)
        if self._builds is None:
            self.initialize(trainer)
            return
        builds = optimizer.factor_builds - self._builds
        updates = optimizer.t - self._t
        factors = sum(len(layer.factor_names)
                      for layer in optimizer.kfac_layers)
        fraction = builds / float(updates * factors) \
            if updates and factors else float('nan')
        record = {'epoch': trainer.updater.epoch, 'builds': builds,
                  'updates': updates, 'fraction': fraction}
        self.records.append(record)
        if getattr(optimizer, '_reports', lambda: True)():
            self._log.info('epoch %d: %d factor builds in %d updates (%.3g of '
                        'every factor at every update)', record['epoch'],
                        builds, updates, fraction)
        self._builds, self._t = optimizer.factor_builds, optimizer.t

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        """Saves or loads the counts at the last epoch's end."""
        if isinstance(serializer, chainer.serializer.Deserializer):
            try:
                builds = serializer('builds', -1)
                t = serializer('t', -1)
            except KeyError:  # a snapshot from before the extension
                return
            if int(builds) >= 0:
                self._builds, self._t = int(builds), int(t)
            return
        serializer('builds', -1 if self._builds is None else self._builds)
        serializer('t', -1 if self._t is None else self._t)
