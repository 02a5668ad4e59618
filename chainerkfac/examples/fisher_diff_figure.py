"""Figure 5: percentiles over layers of Diff(t) of the factors A, G and F,
and the paper's observations about them (Sec. 5.4).

Diff(t) = ‖X(t) − X(t−1)‖_F / ‖X(t−1)‖_F of every factor, as
:class:`chainerkfac.extensions.FisherDiff` logs it.  :func:`report` checks
that the factors change fast early, that A changes less than G, and that
larger batches change slower; :func:`plot` draws the 5/25/50/75/95th
percentiles over layers against the iteration
(``scripts/plot_fisher_diff.py``).
"""

import logging
import typing

from chainerkfac.extensions import fisher_diff
from chainerkfac.extensions.fisher_diff import PERCENTILES
from chainerkfac.extensions.fisher_diff import slower
from chainerkfac import plotting

logger = logging.getLogger('chainerkfac.figures')

FACTORS = ('A', 'G', 'F')
FACTOR_TITLES = {'A': 'A (Linear/Conv input)', 'G': 'G (Linear/Conv output '
                 'gradient)', 'F': 'F (BatchNormalization)'}


def verdict(ok: bool) -> str:
    return 'holds' if ok else 'does not hold'


def report(logs: typing.Sequence[dict], labels: typing.Sequence[str],
           fraction: float) -> typing.Dict[str, bool]:
    """Logs the per-log table and the three observations; returns the
    observations as ``{name: bool}``."""
    say = logger.info
    say('{:<24} {:>6} {:>6} {:>11} {:>10} {:>12} {:>12} {:>11}'.format(
        'log', 'factor', 'layers', 'iterations', 'median', 'median early',
        'median late', 'early/late'))
    observed = {}
    for log, label in zip(logs, labels):
        medians = {}
        for factor in FACTORS:
            if factor not in log:
                continue
            layers, n, medians[factor], early, late = fisher_diff.summary(
                log[factor], fraction)
            say('{:<24} {:>6} {:>6} {:>11} {:>10.3e} {:>12.3e} {:>12.3e} '
                '{:>11.2f}'.format(label, factor, layers, n, medians[factor],
                                   early, late, early / late))
            observed['{} {}: fast change early'.format(label, factor)] = \
                early > late
        if 'A' in medians and 'G' in medians:
            ok = medians['A'] < medians['G']
            say('{}: A changes less than G (median Diff A {:.3e}, G {:.3e}): '
                '{}'.format(label, medians['A'], medians['G'], verdict(ok)))
            observed['{}: A < G'.format(label)] = ok
    for k in range(1, len(logs)):
        for factor in FACTORS:
            small, large = logs[k - 1].get(factor), logs[k].get(factor)
            found = slower(small, large) if small and large else None
            if found is None:
                continue
            n, a, b = found
            ok = b < a
            say('{} vs {}: {} changes slower with the larger batch (median '
                'Diff over {} common iterations {:.3e} vs {:.3e}): {}'
                .format(labels[k], labels[k - 1], factor, n, b, a,
                        verdict(ok)))
            observed['{} vs {} {}: slower'.format(
                labels[k], labels[k - 1], factor)] = ok
    early = [ok for name, ok in observed.items() if 'early' in name]
    say('fast change early (first {:.0%} of the iterations vs the rest): '
        '{} of {} factor logs'.format(fraction, sum(early), len(early)))
    return observed


# every percentile its own colour, line style and marker: the 5th and the
# 95th (and the 25th and the 75th) must not read alike
PERCENTILE_STYLES = {
    5: dict(color='#9ecae1', linestyle=':', marker='v'),
    25: dict(color='#4292c6', linestyle='--', marker=None),
    50: dict(color='black', linestyle='-', marker=None, zorder=3),
    75: dict(color='#d6604d', linestyle='-.', marker=None),
    95: dict(color='#b2182b', linestyle=(0, (1, 1)), marker='^'),
}


def plot(logs: typing.Sequence[dict], labels: typing.Sequence[str],
         path: str, mark: float) -> typing.Any:
    """One row per log, one column per factor: the percentiles over layers
    of Diff(t) against the iteration, on a log axis, with the iteration
    ``mark`` as a red line; one legend for the figure.  Returns the
    (closed) figure."""
    pyplot = plotting.pyplot()

    factors = [f for f in FACTORS if any(f in log for log in logs)]
    fig, axes = pyplot.subplots(
        len(logs), len(factors), squeeze=False,
        figsize=(4.2 * len(factors), 3.0 * len(logs)))
    for row, (log, label) in enumerate(zip(logs, labels)):
        for col, factor in enumerate(factors):
            ax = axes[row][col]
            if factor not in log:
                ax.set_visible(False)
                continue
            iterations, table = fisher_diff.percentiles(log[factor])
            every = max(1, len(iterations) // 15)
            for k, q in enumerate(PERCENTILES):
                style = dict(PERCENTILE_STYLES[q])
                ax.plot(iterations, table[k], linewidth=1.1,
                        markersize=4, markevery=every,
                        label='{}th percentile over layers'.format(q),
                        **style)
            if iterations[0] <= mark <= iterations[-1]:
                ax.axvline(mark, color='red', linewidth=1,
                           label='iteration {:g}'.format(mark))
            ax.set_yscale('log')
            ax.set_title('{}: {}'.format(label, FACTOR_TITLES[factor]),
                         fontsize=9)
            ax.set_xlabel('iteration t')
            ax.set_ylabel('Diff(t) = ‖X(t) − X(t−1)‖ / ‖X(t−1)‖\n'
                          '(relative, Frobenius)', fontsize=8)
    handles, names = {}, []
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in handles:
                handles[name] = handle
                names.append(name)
    fig.legend([handles[n] for n in names], names, loc='lower center',
               ncol=len(names), fontsize=8, bbox_to_anchor=(0.5, 1.0),
               frameon=False)
    plotting.save_figure(fig, path)
    return fig
