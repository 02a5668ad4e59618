#!/usr/bin/env python
"""Figure 5: percentiles over layers of Diff(t) of the factors A, G and F.

Reads one or more logs written by :class:`chainerkfac.extensions.FisherDiff`
(the ImageNet trainer with ``train.fisher_diff: true``, or
``scripts/train_digits.py --fisher-diff LOG``), draws the 5/25/50/75/95th
percentiles over layers of Diff(t) = ‖X(t) − X(t−1)‖_F / ‖X(t−1)‖_F against
the iteration, one row per log and one column per factor (A and G of the
Linear/Convolution layers, F of the BatchNormalization layers), and checks
the paper's observations (Sec. 5.4):

* the factors change fast early: the median Diff over the first
  ``--early`` fraction of the iterations against the rest;
* A changes less than G: their medians over all refreshes;
* larger batches change slower: each log against the previous one (give the
  logs in increasing batch size) at the iterations both logs have.

Usage::

    python scripts/plot_fisher_diff.py LOG [LOG ...] [--labels ...]
        [--out result/fisher_diff.png]
"""

import argparse
import collections
import json
import os
import sys

import numpy

try:
    from chainerkfac import plotting
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    from chainerkfac import plotting

PERCENTILES = (5, 25, 50, 75, 95)
FACTORS = ('A', 'G', 'F')
FACTOR_TITLES = {'A': 'A (Linear/Conv input)', 'G': 'G (Linear/Conv output '
                 'gradient)', 'F': 'F (BatchNormalization)'}


def load(path):
    """``{factor: {iteration: [diff per layer]}}`` from a FisherDiff log.

    A record repeated for the same (iteration, layer, factor), as after a
    resume from an earlier snapshot, counts once (the last one).
    """
    if not os.path.isfile(path):
        raise SystemExit('plot_fisher_diff.py: no such log: {}'.format(path))
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
                raise SystemExit('plot_fisher_diff.py: {}:{}: not a '
                                 'FisherDiff record ({})'.format(
                                     path, number, e))
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for (iteration, _, factor), diff in unique.items():
        out[factor][iteration].append(diff)
    if not out:
        raise SystemExit('plot_fisher_diff.py: {}: no records'.format(path))
    return out


def percentiles(by_iteration):
    """``(iterations, table)``: ``table[k]`` is the ``PERCENTILES[k]``-th
    percentile over layers at each iteration."""
    iterations = numpy.array(sorted(by_iteration))
    table = numpy.array([
        numpy.percentile(by_iteration[i], PERCENTILES) for i in iterations])
    return iterations, table.T


def median_over(by_iteration, iterations):
    values = [d for i in iterations for d in by_iteration.get(i, ())]
    return float(numpy.median(values)) if values else float('nan')


def early_late(by_iteration, fraction):
    """Median Diff over the first ``fraction`` of the iterations and over
    the rest."""
    iterations = sorted(by_iteration)
    cut = iterations[0] + fraction * (iterations[-1] - iterations[0])
    early = [i for i in iterations if i <= cut]
    late = [i for i in iterations if i > cut]
    return median_over(by_iteration, early), median_over(by_iteration, late)


def verdict(ok):
    return 'holds' if ok else 'does not hold'


def report(logs, labels, fraction):
    """Prints the per-log table and the three observations; returns the
    observations as ``{name: bool}``."""
    print('{:<24} {:>6} {:>6} {:>11} {:>10} {:>12} {:>12} {:>11}'.format(
        'log', 'factor', 'layers', 'iterations', 'median', 'median early',
        'median late', 'early/late'))
    observed = {}
    for log, label in zip(logs, labels):
        medians = {}
        for factor in FACTORS:
            if factor not in log:
                continue
            data = log[factor]
            early, late = early_late(data, fraction)
            medians[factor] = median_over(data, data)
            layers = max(len(v) for v in data.values())
            print('{:<24} {:>6} {:>6} {:>11} {:>10.3e} {:>12.3e} {:>12.3e} '
                  '{:>11.2f}'.format(label, factor, layers, len(data),
                                     medians[factor], early, late,
                                     early / late))
            observed['{} {}: fast change early'.format(label, factor)] = \
                early > late
        if 'A' in medians and 'G' in medians:
            ok = medians['A'] < medians['G']
            print('{}: A changes less than G (median Diff A {:.3e}, G {:.3e}):'
                  ' {}'.format(label, medians['A'], medians['G'], verdict(ok)))
            observed['{}: A < G'.format(label)] = ok
    for k in range(1, len(logs)):
        for factor in FACTORS:
            small, large = logs[k - 1].get(factor), logs[k].get(factor)
            if small is None or large is None:
                continue
            common = sorted(set(small) & set(large))
            if not common:
                continue
            a, b = median_over(small, common), median_over(large, common)
            ok = b < a
            print('{} vs {}: {} changes slower with the larger batch (median '
                  'Diff over {} common iterations {:.3e} vs {:.3e}): {}'.format(
                      labels[k], labels[k - 1], factor, len(common), b, a,
                      verdict(ok)))
            observed['{} vs {} {}: slower'.format(
                labels[k], labels[k - 1], factor)] = ok
    early = [ok for name, ok in observed.items() if 'early' in name]
    print('fast change early (first {:.0%} of the iterations vs the rest): '
          '{} of {} factor logs'.format(fraction, sum(early), len(early)))
    return observed


def plot(logs, labels, path, mark):
    pyplot = plotting.pyplot()

    factors = [f for f in FACTORS if any(f in log for log in logs)]
    fig, axes = pyplot.subplots(
        len(logs), len(factors), squeeze=False,
        figsize=(4.2 * len(factors), 3.0 * len(logs)))
    styles = {5: ':', 25: '--', 50: '-', 75: '--', 95: ':'}
    for row, (log, label) in enumerate(zip(logs, labels)):
        for col, factor in enumerate(factors):
            ax = axes[row][col]
            if factor not in log:
                ax.set_visible(False)
                continue
            iterations, table = percentiles(log[factor])
            for k, q in enumerate(PERCENTILES):
                ax.plot(iterations, table[k], styles[q], color='C0',
                        label='{}th'.format(q))
            if iterations[0] <= mark <= iterations[-1]:
                ax.axvline(mark, color='red', linewidth=1)
            ax.set_yscale('log')
            ax.set_title('{}: {}'.format(label, FACTOR_TITLES[factor]),
                         fontsize=9)
            ax.set_xlabel('iteration')
            ax.set_ylabel('‖X(t) − X(t−1)‖ / ‖X(t−1)‖', fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    plotting.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('logs', nargs='+', metavar='LOG')
    parser.add_argument('--labels', nargs='+',
                        help='one per log (default: the file names)')
    parser.add_argument('--out', default='result/fisher_diff.png')
    parser.add_argument('--early', type=float, default=0.1,
                        help='the early part: this fraction of the '
                        'iterations (default 0.1)')
    parser.add_argument('--mark', type=int, default=500,
                        help='iteration of the red line (paper: 500)')
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(p) for p in args.logs]
    if len(labels) != len(args.logs):
        parser.error('--labels needs one label per log')
    logs = [load(p) for p in args.logs]
    report(logs, labels, args.early)
    plot(logs, labels, args.out, args.mark)


if __name__ == '__main__':
    sys.exit(main())
