"""When each factor is rebuilt: fixed intervals, or intervals set from how
much the factor changes.

Stage 2 of Algorithm 1 (Osawa et al. 2019) builds every factor at every
update unless it is *stale*: eq. 20 / 21 (Sec. 5.4) set one interval for all
G factors and BN Fishers (``g_interval``) and one for all A factors
(``a_interval``), from the iteration and epoch only.  Figure 5 shows that
factors change at different rates, layer by layer and over training; the
paper's follow-up (SP-NGD, Osawa et al. 2020) refreshes statistics on an
adaptive schedule instead.

* :class:`FixedRefresh` (``refresh='fixed'``, the default): factor X is
  rebuilt at update t when ``t % interval == 0`` (the hyperparameters
  ``a_interval`` / ``g_interval``, set by
  :class:`~chainerkfac.extensions.KFACSchedule` from eq. 20 or 21).
* :class:`AdaptiveRefresh` (``refresh='adaptive'``): every factor (A, G, BN
  Fisher of every layer) has its own interval k.  When X is rebuilt at t,
  its relative change since its last build, the quantity of Figure 5,

      c = ‖X(t) − X(t−k)‖_F / ‖X(t−k)‖_F,

  sets the next interval: ``min(2k, max_interval)`` when c ≤
  ``refresh_tolerance``, else ``min_interval`` (a factor that jumps is
  rebuilt at the next update when ``min_interval`` is 1).  A factor starts
  at ``min_interval``.  The rule (double while steady, back to the minimum
  on a jump) is this library's; SP-NGD describes the idea, not one rule.

Distributed: the averaged factor exists on its owners only, so the primary
owner of each layer (:meth:`~chainerkfac.distributed.plan.Plan.
primary_layers_of`) decides its factors' intervals; the decision travels in
stage 6 of the same update (:class:`IntervalPiece`, a few values appended to
the layer's preconditioned gradients), so every process knows every factor's
next build before the next update begins.  On one process the decision is
taken and used in place.
"""

import dataclasses
import logging
import typing

import numpy

import chainer
from chainer import backend

from chainerkfac import factors as factors_module

logger = logging.getLogger('chainerkfac')


def check_options(tolerance: float, max_interval: int,
                  min_interval: int) -> None:
    """Raises ValueError (one line) unless the adaptive refresh's options
    are valid (checked in either mode, so that a wrong value never waits
    for the switch to ``'adaptive'``)."""
    if not float(tolerance) > 0:
        raise ValueError('refresh_tolerance must be positive, got '
                         '{!r}'.format(tolerance))
    for key, value in (('min_interval', min_interval),
                       ('max_interval', max_interval)):
        if int(value) != value or value < 1:
            raise ValueError('{} must be an integer >= 1, got {!r}'
                             .format(key, value))
    if max_interval < min_interval:
        raise ValueError('max_interval ({}) must be >= min_interval ({})'
                         .format(max_interval, min_interval))
    if max_interval > 2048:
        # stage 6 carries intervals in the gradients' dtype: float16
        # holds integers exactly up to 2048
        raise ValueError('max_interval must be <= 2048, got {}'
                         .format(max_interval))


class FixedRefresh(object):
    """Eq. 20/21's stale factors: ``t % interval == 0``, the interval being
    the hyperparameter named in the layer's ``intervals`` (``a_interval`` or
    ``g_interval``)."""

    mode = 'fixed'

    def __init__(self, hyperparam: typing.Any) -> None:
        self.hyperparam = hyperparam

    def interval(self, layer: typing.Any, name: str) -> int:
        """The current interval of factor ``name`` of ``layer``."""
        return int(getattr(self.hyperparam, layer.intervals[name]))

    def due(self, layer: typing.Any, name: str, t: int) -> bool:
        """Whether factor ``name`` of ``layer`` is rebuilt at update ``t``
        (once built: a factor never built is due anyway)."""
        return t % self.interval(layer, name) == 0

    def mean_interval(self, layers: typing.Sequence) -> float:
        """The G factors' and BN Fishers' interval (``g_interval``); under
        adaptive refresh, the mean over every factor of ``layers``."""
        return float(self.hyperparam.g_interval)

    def keep_previous(self, keys: typing.Iterable[tuple]) -> None:
        """Before stage 2's factors are stored: nothing to keep."""

    def decide(self, keys: typing.Iterable[tuple]) -> None:
        """After stage 3: nothing to decide."""

    def built(self, keys: typing.Iterable[tuple], t: int) -> None:
        """The factors ``keys`` ((layer, name)) were rebuilt at update
        ``t``."""

    def pieces(self, block: typing.Any) -> tuple:
        """What stage 6 carries for ``block`` besides its gradients."""
        return ()

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        """Nothing of its own: the intervals are hyperparameters."""


class AdaptiveRefresh(FixedRefresh):
    """Per-factor intervals from the factors' relative change (see the
    module's docstring).

    Args:
        tolerance (float): the relative change c at or below which a
            factor's interval doubles (> 0).
        max_interval (int): the largest interval (≥ ``min_interval``).
        min_interval (int): the interval of a new factor and of one whose
            change exceeds the tolerance (≥ 1).

    Attributes:
        intervals: ``{(layer name, factor name): k}``.
        last: ``{(layer name, factor name): t}`` of each factor's last build.
        changes: ``{(layer name, factor name): c}`` measured at the factor's
            last build on this process (the layers it is primary owner of).
    """

    mode = 'adaptive'

    def __init__(self, tolerance: float = 0.1, max_interval: int = 20,
                 min_interval: int = 1) -> None:
        check_options(tolerance, max_interval, min_interval)
        self.tolerance = float(tolerance)
        self.max_interval = int(max_interval)
        self.min_interval = int(min_interval)
        self.intervals = {}
        self.last = {}
        self.changes = {}
        self._previous = {}
        self._received = []

    @staticmethod
    def _key(layer, name):
        return layer.name, name

    def interval(self, layer: typing.Any, name: str) -> int:
        self._settle_received()
        return self.intervals.get(self._key(layer, name), self.min_interval)

    def due(self, layer: typing.Any, name: str, t: int) -> bool:
        last = self.last.get(self._key(layer, name))
        return last is None or t - last >= self.interval(layer, name)

    def mean_interval(self, layers: typing.Sequence) -> float:
        values = [self.interval(layer, name) for layer in layers
                  for name in layer.factor_names]
        return sum(values) / float(len(values)) if values else \
            float(self.min_interval)

    def keep_previous(self, keys: typing.Iterable[tuple]) -> None:
        """Keeps X(t−k) of the due factors ``keys`` ((layer, name)) of the
        layers this process decides for, before the new ones are stored
        (references to the stored arrays, which a new factor replaces
        rather than writes into: until :meth:`decide`, the process holds
        both)."""
        self._previous = {}
        for layer, name in keys:
            data = layer.state.get(name)
            if data is not None:
                self._previous[(layer, name)] = (
                    data, layer.state[name + '_scale'])

    def decide(self, keys: typing.Iterable[tuple]) -> None:
        """After stage 3, on the primary owner: the next interval of each
        rebuilt factor ``keys`` ((layer, name)) from its relative change
        (one transfer to the host for all of them)."""
        keys = [key for key in keys if key in self._previous]
        previous, self._previous = self._previous, {}
        if not keys:
            return
        pairs = [factors_module.change_norms(
            layer.factor(name), factors_module.dense(*previous[(layer, name)]))
            for layer, name in keys]
        xp = backend.get_array_module(pairs[0][0])
        values = backend.CpuDevice().send(
            xp.stack([v for pair in pairs for v in pair]))
        for (layer, name), (num, den) in zip(keys, values.reshape(-1, 2)):
            change = factors_module.ratio(num, den)
            key = self._key(layer, name)
            self.changes[key] = change
            k = self.intervals.get(key, self.min_interval)
            self.intervals[key] = min(2 * k, self.max_interval) \
                if change <= self.tolerance else self.min_interval

    def built(self, keys: typing.Iterable[tuple], t: int) -> None:
        for layer, name in keys:
            self.last[self._key(layer, name)] = t

    def pieces(self, block: typing.Any) -> tuple:
        if block.layer is None:
            return ()
        return (IntervalPiece(block, self),)

    # -- stage 6 -------------------------------------------------------------
    def read(self, layer: typing.Any, xp: typing.Any,
             dtype: numpy.dtype) -> typing.Any:
        """The intervals of ``layer``'s factors, to send."""
        return xp.asarray([self.interval(layer, name)
                           for name in layer.factor_names], dtype)

    def receive(self, layer: typing.Any, values: typing.Any) -> None:
        """The intervals of ``layer``'s factors from its primary owner (read
        on the host when next needed: one transfer for all layers)."""
        self._received.append((layer, values.copy()))

    def _settle_received(self):
        if not self._received:
            return
        received, self._received = self._received, []
        xp = backend.get_array_module(received[0][1])
        values = backend.CpuDevice().send(
            xp.concatenate([v.astype(numpy.float32) for _, v in received]))
        offset = 0
        for layer, part in received:
            for name in layer.factor_names:
                self.intervals[self._key(layer, name)] = int(values[offset])
                offset += 1

    # -- snapshots -----------------------------------------------------------
    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        """Saves or loads every factor's interval and last build (the same
        on every process)."""
        self._settle_received()
        if isinstance(serializer, chainer.serializer.Deserializer):
            try:
                keys = serializer('keys', None)
                values = serializer('values', None)
            except KeyError:  # a snapshot of a run with fixed refresh
                keys = values = None
            if keys is None or values is None:
                logger.info(
                    'K-FAC: the loaded state has no adaptive refresh state '
                    "(a run with refresh='fixed'?): every factor starts at "
                    'interval %d and is rebuilt at the next update',
                    self.min_interval)
                self.intervals, self.last = {}, {}
                return
            self.intervals, self.last = {}, {}
            for key, (k, last) in zip(numpy.asarray(keys).ravel(),
                                      numpy.asarray(values).reshape(-1, 2)):
                key = tuple(str(key).rsplit(':', 1))
                self.intervals[key] = int(k)
                if last >= 0:
                    self.last[key] = int(last)
            return
        keys = sorted(set(self.intervals) | set(self.last))
        serializer('keys', numpy.array(['{}:{}'.format(*key)
                                        for key in keys], dtype=numpy.str_))
        serializer('values', numpy.array(
            [[self.intervals.get(key, self.min_interval),
              self.last.get(key, -1)] for key in keys],
            dtype=numpy.int64).reshape(-1, 2))


@dataclasses.dataclass(frozen=True)
class IntervalPiece(object):
    """The refresh intervals of ``block``'s factors, decided by its primary
    owner and carried by stage 6 in the buffer of the block's gradients."""

    block: typing.Any
    refresh: AdaptiveRefresh

    @property
    def layer(self) -> typing.Any:
        return self.block.layer

    @property
    def dtype(self) -> numpy.dtype:
        return numpy.dtype(self.block.params[0].dtype)

    @property
    def size(self) -> int:
        return len(self.layer.factor_names)

    def read(self) -> typing.Any:
        param = self.block.params[0]
        return self.refresh.read(self.layer, param.device.xp, self.dtype)

    def write(self, values: typing.Any) -> None:
        self.refresh.receive(self.layer, values)


def make_refresh(mode: str, hyperparam: typing.Any, tolerance: float,
                 max_interval: int, min_interval: int) -> FixedRefresh:
    """The refresh rule of ``mode`` (``'fixed'`` or ``'adaptive'``)."""
    check_options(tolerance, max_interval, min_interval)
    if mode == 'adaptive':
        return AdaptiveRefresh(tolerance, max_interval, min_interval)
    return FixedRefresh(hyperparam)
