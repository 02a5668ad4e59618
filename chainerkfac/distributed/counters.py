"""What a process of distributed K-FAC sent: the counters of stages 3 and 6.

The counts are those of the buffers of :mod:`chainerkfac.distributed.layout`:
a process's stage-3 bytes are its whole send buffer (every segment), its
stage-6 bytes its own segment.  :mod:`chainerkfac.scaling` models the same
counts (a test compares them).
"""

import collections
import typing

from chainerkfac import framework
from chainerkfac.distributed import layout

#: Keys of :class:`CommCounters` (all cumulative).
COUNTER_KEYS = (
    'updates',                   # real updates (collective rounds)
    'reduce_scatter_calls',      # stage 3 collective calls
    'all_gather_calls',          # stage 6 collective calls
    'scale_allreduce_calls',     # float16 scale agreements
    'gradient_elements',         # stage 3: gradient values sent
    'gradient_bytes',
    'factor_elements',           # stage 3: packed factor values sent
    'factor_bytes',
    'factor_dense_fp32_bytes',   # the same factors as dense float32 arrays
    'scale_bytes',               # float16 scale agreement (float64 values)
    'preconditioned_elements',   # stage 6: preconditioned values sent
    'preconditioned_bytes',
)

#: The per-update deltas reported to an active Chainer reporter, as
#: ``comm/<key>``.
REPORTED_KEYS = ('gradient_bytes', 'factor_bytes', 'preconditioned_bytes')


class CommCounters(collections.OrderedDict):
    """``{key: cumulative count}`` over :data:`COUNTER_KEYS`, with the
    counting of each stage."""

    def __init__(self) -> None:
        super(CommCounters, self).__init__(
            (key, 0) for key in COUNTER_KEYS)
        self._reported = dict(self)

    def count_reduce_scatter(self, buffer: layout.Buffer) -> None:
        """One stage-3 call sending ``buffer`` whole."""
        self['reduce_scatter_calls'] += 1
        itemsize = buffer.dtype.itemsize
        for segment in buffer.segments:
            for piece in segment:
                if isinstance(piece, layout.GradientPiece):
                    self['gradient_elements'] += piece.size
                    self['gradient_bytes'] += piece.size * itemsize
                else:
                    self['factor_elements'] += piece.size
                    self['factor_bytes'] += piece.size * itemsize
                    self['factor_dense_fp32_bytes'] += 4 * piece.dense_size

    def count_scale_agreement(self, values: int) -> None:
        """One MAX all-reduce of ``values`` float64 scales."""
        self['scale_allreduce_calls'] += 1
        self['scale_bytes'] += values * 8

    def count_all_gather(self, buffer: layout.Buffer, rank: int) -> None:
        """One stage-6 call in which ``rank`` sends its segment."""
        self['all_gather_calls'] += 1
        mine = buffer.counts[rank]
        self['preconditioned_elements'] += mine
        self['preconditioned_bytes'] += mine * buffer.dtype.itemsize

    def report(self, target: typing.Any) -> None:
        """Reports the deltas of :data:`REPORTED_KEYS` since the last
        report to the active reporter, if any (``comm/<key>``)."""
        values = {'comm/' + key: self[key] - self._reported[key]
                  for key in REPORTED_KEYS}
        self._reported = dict(self)
        framework.report_to_observer(values, target)
