"""Figure 5: how fast the Kronecker factors and the BN Fisher change."""

import collections
import json
import os
import typing

import numpy

import chainer
from chainer import backend
from chainer.training import extension
from chainer.types import NdArray

from chainerkfac import files
from chainerkfac.factors import change_norms as norms  # noqa: F401
from chainerkfac.factors import ratio  # noqa: F401

#: The percentiles over layers that Figure 5 draws.
PERCENTILES = (5, 25, 50, 75, 95)


def relative_change(new: NdArray, old: NdArray) -> float:
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
    and at the end of training (the log is replaced whole each time, never
    seen cut).  :func:`read_log` reads it; ``scripts/plot_fisher_diff.py``
    draws it.

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

    def observe(self, optimizer: chainer.Optimizer) -> typing.List[dict]:
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

    def flush(self, path: str) -> None:
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
        files.append_lines(path, (json.dumps(record) for record in records))

    def __call__(self, trainer):
        optimizer = self._optimizer or trainer.updater.get_optimizer('main')
        self.observe(optimizer)
        iteration = trainer.updater.iteration
        if iteration % self.flush_interval == 0 or _is_last(trainer):
            self.flush(os.path.join(trainer.out, self.filename))

    def finalize(self) -> None:
        # no collective here: finalize also runs when one rank failed; the
        # last records of a multi-process run are written at its last
        # iteration by __call__
        if self._comm is None or self._comm.size == 1:
            if self.records and self._out is not None:
                self.flush(os.path.join(self._out, self.filename))

    def initialize(self, trainer: chainer.training.Trainer) -> None:
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


# -- reading the log ----------------------------------------------------------

class FisherDiffLogError(ValueError):
    """A FisherDiff log that cannot be read (one line)."""


def read_log(path: str) -> typing.Dict[str, typing.Dict[int, list]]:
    """``{factor: {iteration: [diff per layer]}}`` from the log
    :class:`FisherDiff` writes.

    A record repeated for the same (iteration, layer, factor), as after a
    resume from an earlier snapshot, counts once (the last one).  A missing
    file, a line that is not a record and a log without records raise
    :class:`FisherDiffLogError`.
    """
    if not os.path.isfile(path):
        raise FisherDiffLogError('no such log: {}'.format(path))
    unique = collections.OrderedDict()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                key = int(r['iteration']), r['layer'], r['factor']
                unique[key] = float(r['diff'])
            except (ValueError, KeyError, TypeError) as e:
                raise FisherDiffLogError(
                    '{}:{}: not a FisherDiff record ({})'.format(
                        path, number, e))
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for (iteration, _, factor), diff in unique.items():
        out[factor][iteration].append(diff)
    if not out:
        raise FisherDiffLogError('{}: no records'.format(path))
    return out


def percentiles(by_iteration: typing.Dict[int, list]
                ) -> typing.Tuple[numpy.ndarray, numpy.ndarray]:
    """``(iterations, table)``: ``table[k]`` is the ``PERCENTILES[k]``-th
    percentile over layers of Diff at each iteration (Figure 5)."""
    iterations = numpy.array(sorted(by_iteration))
    table = numpy.array([
        numpy.percentile(by_iteration[i], PERCENTILES) for i in iterations])
    return iterations, table.T


def median_over(by_iteration: typing.Dict[int, list],
                iterations: typing.Iterable[int]) -> float:
    """The median Diff over all layers at ``iterations`` (nan: none)."""
    values = [d for i in iterations for d in by_iteration.get(i, ())]
    return float(numpy.median(values)) if values else float('nan')


def early_late(by_iteration: typing.Dict[int, list],
               fraction: float) -> typing.Tuple[float, float]:
    """Median Diff over the first ``fraction`` of the iterations and over
    the rest (Sec. 5.4: the factors change fast early)."""
    iterations = sorted(by_iteration)
    cut = iterations[0] + fraction * (iterations[-1] - iterations[0])
    early = [i for i in iterations if i <= cut]
    late = [i for i in iterations if i > cut]
    return median_over(by_iteration, early), median_over(by_iteration, late)


def slower(small: typing.Dict[int, list], large: typing.Dict[int, list]
           ) -> typing.Optional[typing.Tuple[int, float, float]]:
    """``(n, median small, median large)``: the median Diff of one factor
    in two logs over the ``n`` iterations both have (Sec. 5.4: larger
    batches change slower); None when they share none."""
    common = sorted(set(small) & set(large))
    if not common:
        return None
    return (len(common), median_over(small, common),
            median_over(large, common))


def summary(by_iteration: typing.Dict[int, list], fraction: float
            ) -> typing.Tuple[int, int, float, float, float]:
    """``(layers, iterations, median, median early, median late)`` of one
    factor's Diff (:func:`early_late` with ``fraction``)."""
    layers = max(len(v) for v in by_iteration.values())
    return (layers, len(by_iteration),
            median_over(by_iteration, by_iteration)) + \
        early_late(by_iteration, fraction)
