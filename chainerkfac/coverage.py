"""Which links K-FAC covers, and what stays on the raw gradient and why.

:func:`plan_coverage` walks a model once at ``optimizer.setup(model)``: every
link with parameters of its own is

* *covered*: a K-FAC block of :mod:`chainerkfac.layers` preconditions it;
* *skipped*: the user's opt-out, ``skip_layers`` (link names or link types),
  keeps it on the raw gradient;
* *not covered*: no block covers its type, or its block does not cover this
  configuration (the reason says which), so it stays on the raw gradient.

:class:`Coverage` keeps the outcome and says it in one report (two lines at
most), which the optimizers log (``logging``, logger ``chainerkfac``) as soon
as every parameter is initialized: at setup, or after the first update for
lazily sized links (``L.Linear(None, n)``).  Nothing K-FAC does not cover
passes unsaid.
"""

import collections
import logging
import typing

from chainerkfac import framework
from chainerkfac import layers as layers_module

logger = logging.getLogger('chainerkfac')


def skip_matches(entry: typing.Union[type, str], name: str,
                 link: typing.Any) -> bool:
    """Whether a ``skip_layers`` entry names the link ``name``: a link type
    (the link is an instance of it), or a string equal to the link's name
    (``'/block/fc'``, with or without the leading ``'/'``) or to its class
    name (``'Linear'``)."""
    if isinstance(entry, type):
        return isinstance(link, entry)
    entry = str(entry)
    return entry in (name, name.lstrip('/'), type(link).__name__)


class Entry(object):
    """One link with parameters: its name, link, status and reason."""

    def __init__(self, name, link, status, layer_type=None, reason=None):
        self.name = name
        self.link = link
        self.status = status  # 'covered', 'skipped' or 'not covered'
        self.layer_type = layer_type
        self.reason = reason
        #: the K-FAC block made for a covered link (set by the optimizer)
        self.layer = None

    @property
    def params(self) -> list:
        return framework.own_params(self.link)

    def size(self, params: typing.Optional[typing.Iterable] = None) -> int:
        return sum(p.size for p in (self.params if params is None
                                    else params) if p.array is not None)

    def preconditioned(self) -> list:
        """The parameters its block preconditions (all of a covered link's
        unless its block leaves one out, e.g. Deconvolution2D's bias)."""
        if self.status != 'covered':
            return []
        return self.params if self.layer is None else self.layer.params

    def left_out(self) -> list:
        kept = set(id(p) for p in self.preconditioned())
        return [p for p in self.params if id(p) not in kept]


def plan_coverage(model: typing.Any,
                  skip_layers: typing.Sequence = ()) -> 'Coverage':
    """The :class:`Coverage` of ``model`` with the opt-out ``skip_layers``."""
    entries = []
    for name, link in model.namedlinks():
        if not framework.has_own_params(link):
            continue
        layer_type = layers_module.layer_type_of(link)
        if any(skip_matches(e, name, link) for e in skip_layers):
            entries.append(Entry(name, link, 'skipped', layer_type,
                                 'skip_layers'))
        elif layer_type is None:
            entries.append(Entry(name, link, 'not covered', None,
                                 'no K-FAC block for {}'.format(
                                     type(link).__name__)))
        else:
            reason = layer_type.unsupported(link)
            if reason is None:
                entries.append(Entry(name, link, 'covered', layer_type))
            else:
                entries.append(Entry(name, link, 'not covered', layer_type,
                                     reason))
    unused = [e for e in skip_layers
              if not any(skip_matches(e, x.name, x.link) for x in entries)]
    if unused:
        raise ValueError('skip_layers: {} names no link with parameters of '
                         'the model'.format(', '.join(
                             getattr(e, '__name__', str(e)) for e in unused)))
    return Coverage(entries)


class Coverage(object):
    """The outcome of :func:`plan_coverage`.

    Attributes:
        entries: one :class:`Entry` per link with parameters of its own.
    """

    def __init__(self, entries):
        self.entries = entries
        self.reported = False

    def covered(self) -> list:
        return [e for e in self.entries if e.status == 'covered']

    def initialized(self) -> bool:
        return all(p.array is not None
                   for e in self.entries for p in e.params)

    def lines(self) -> list:
        """The report: what K-FAC covers, by type, then (when any) what
        stays on the raw gradient, by reason."""
        covered = self.covered()
        by_type = collections.Counter(type(e.link).__name__ for e in covered)
        total = sum(e.size() for e in self.entries)
        done = sum(e.size(e.preconditioned()) for e in covered)
        lines = ['K-FAC covers {} link{} ({}): {:,} of {:,} parameters'.format(
            len(covered), '' if len(covered) == 1 else 's',
            ', '.join('{} {}'.format(k, v) for k, v in sorted(
                by_type.items())) or 'none', done, total)]
        reasons = collections.OrderedDict()  # reason: [(name, size)]
        for e in self.entries:
            if e.status == 'skipped':
                reasons.setdefault('skipped by skip_layers', []).append(
                    (e.name, e.size()))
            elif e.status == 'not covered':
                reasons.setdefault(e.reason, []).append((e.name, e.size()))
            elif e.left_out():
                reasons.setdefault('outside its {} block'.format(
                    type(e.link).__name__), []).append(
                        (e.name + '/' + '/'.join(p.name for p in e.left_out()),
                         e.size(e.left_out())))
        if reasons:
            parts = []
            for reason, group in reasons.items():
                names = ', '.join(name for name, _ in group[:4])
                if len(group) > 4:
                    names += ', ... ({} links)'.format(len(group))
                parts.append('{:,} ({}: {})'.format(
                    sum(size for _, size in group), reason, names))
            lines.append('raw gradient: {:,} parameter{}: {}'.format(
                total - done, '' if total - done == 1 else 's',
                '; '.join(parts)))
        return lines

    def __repr__(self) -> str:
        return '\n'.join(self.lines())

    def report(self, log: bool = True) -> None:
        """Logs :meth:`lines` once (INFO; WARNING when a link is not covered
        without being skipped by the user)."""
        if self.reported:
            return
        self.reported = True
        if not log:
            return
        lines = self.lines()
        level = logging.WARNING if any(
            e.status == 'not covered' for e in self.entries) \
            else logging.INFO
        for line in lines:
            logger.log(level, line)
