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
import os
import sys

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac.examples.fisher_diff_figure import plot  # NOQA: E402
from chainerkfac.examples.fisher_diff_figure import report  # NOQA: E402
from chainerkfac.extensions import fisher_diff  # NOQA: E402


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
    try:
        logs = [fisher_diff.read_log(p) for p in args.logs]
    except fisher_diff.FisherDiffLogError as e:
        raise SystemExit('plot_fisher_diff.py: {}'.format(e))
    report(logs, labels, args.early)
    plot(logs, labels, args.out, args.mark)


if __name__ == '__main__':
    from chainerkfac.commands import show_log
    show_log('chainerkfac.figures')  # wrote ... on stdout
    sys.exit(main())
