"""Figure 5: how fast the Kronecker factors and the BN Fisher change."""

import json
import math
import os

import numpy

from chainer import backend
from chainer.training import extension


def norms(new, old):
    """``(‖X(t) − X(t−1)‖_F, ‖X(t−1)‖_F)`` as 0-d arrays on the factors'
    device, in at least float32 (float16 factors are widened first)."""
    xp = backend.get_array_module(new)
    dtype = numpy.promote_types(new.dtype, numpy.float32)
    new = new.astype(dtype, copy=False)
    old = old.astype(dtype, copy=False)
    return xp.linalg.norm((new - old).ravel()), xp.linalg.norm(old.ravel())


def ratio(numerator, denominator):
    """numerator / denominator as a float; ``nan`` for a zero denominator."""
    if denominator == 0.0:
        return math.nan
    return float(numerator) / float(denominator)


def relative_change(new, old):
    """Diff = ‖X(t) − X(t−1)‖_F / ‖X(t−1)‖_F (Sec. 5.4), as a float.

    A zero ``old`` gives ``nan``.
    """
    return ratio(*(float(v) for v in norms(new, old)))


class FisherDiff(extension.Extension):

    """Records Diff(t) of every factor (A, G, BN F) each time it is rebuilt.

    After each update, every factor of the layers this process reports
    (:meth:`~chainerkfac.optimizers.KFAC.primary_layers`: all layers on one
    process, each layer's primary owner under
    :class:`~chainerkfac.optimizers.DistributedKFAC`) whose refresh count
    moved is compared with its copy from the previous refresh:
    ``Diff = ‖X_new − X_prev‖_F / ‖X_prev‖_F``.  With refresh interval 1
    this is the paper's Diff(t) between consecutive iterations; with stale
    intervals it is the change between consecutive refreshes.  The cost is
    one norm per refreshed factor and one extra copy of the factors reported
    here.

    Records are JSON lines ``{"iteration": t, "layer": name, "factor":
    "A"|"G"|"F", "diff": value}`` (``t`` = the optimizer's update count after
    the update that rebuilt the factor) appended to ``filename`` in the
    trainer's output folder by rank 0, every ``flush_interval`` iterations
    and at the end of training.  ``scripts/plot_fisher_diff.py`` draws them.

    Args:
        optimizer: the K-FAC optimizer; ``None``: the updater's main one.
        comm: a ChainerMN communicator (records of all ranks are gathered to
            rank 0), or ``None`` on one process.
        filename (str): the log's name in the trainer's ``out``.
        flush_interval (int): iterations between writes.
    """

    trigger = 1, 'iteration'
    priority = extension.PRIORITY_WRITER
    name = 'FisherDiff'

    def __init__(self, optimizer=None, comm=None,
                 filename='fisher_diff.jsonl', flush_interval=10):
        self._optimizer = optimizer
        self._comm = comm
        self.filename = filename
        self.flush_interval = int(flush_interval)
        self._previous = {}
        #: records observed and not yet written
        self.records = []

    def observe(self, optimizer):
        """Records the factors refreshed since the last call; returns the
        new records."""
        new, pending = [], []
        for layer in optimizer.primary_layers():
            for name in layer.factor_names:
                key = layer.name, name
                count = layer.refreshes[name]
                previous = self._previous.get(key)
                if previous is not None and previous[0] == count:
                    continue
                x = layer.factor(name)
                if x is None:
                    continue
                x = x.copy()
                if previous is not None:
                    new.append({'iteration': int(optimizer.t),
                                'layer': layer.name, 'factor': name})
                    pending.extend(norms(x, previous[1]))
                self._previous[key] = count, x
        if pending:  # one transfer to the host for all factors
            xp = backend.get_array_module(pending[0])
            values = backend.CpuDevice().send(xp.stack(pending))
            for record, (num, den) in zip(new, values.reshape(-1, 2)):
                record['diff'] = ratio(num, den)
        self.records.extend(new)
        return new

    def flush(self, path):
        """Appends the pending records to ``path`` (rank 0; collective when
        a communicator was given)."""
        records, self.records = self.records, []
        if self._comm is not None and self._comm.size > 1:
            gathered = self._comm.gather_obj(records)
            if self._comm.rank != 0:
                return
            records = sorted((r for part in gathered for r in part),
                             key=lambda r: r['iteration'])
        if not records:
            return
        with open(path, 'a') as f:
            for record in records:
                f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())

    def __call__(self, trainer):
        optimizer = self._optimizer or trainer.updater.get_optimizer('main')
        self.observe(optimizer)
        iteration = trainer.updater.iteration
        if iteration % self.flush_interval == 0 or _is_last(trainer):
            self.flush(os.path.join(trainer.out, self.filename))

    def finalize(self):
        # no collective here: finalize also runs when one rank failed; the
        # last records of a multi-process run are written at its last
        # iteration by __call__
        if self._comm is None or self._comm.size == 1:
            if self.records and self._out is not None:
                self.flush(os.path.join(self._out, self.filename))

    def initialize(self, trainer):
        self._out = trainer.out

    _out = None


def _is_last(trainer):
    """Whether this is the trainer's last iteration (stop trigger by
    iterations or epochs)."""
    length = getattr(trainer.stop_trigger, 'get_training_length', None)
    if length is None:
        return False
    period, unit = length()
    updater = trainer.updater
    if unit == 'iteration':
        return updater.iteration >= period
    return updater.epoch_detail >= period
