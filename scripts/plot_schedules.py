#!/usr/bin/env python
"""Figure 3 (schedules): η, m, γ and the stale interval of a trainer config.

Evaluates, for every iteration of the run a config describes, exactly the
values :class:`chainerkfac.extensions.KFACSchedule` gives the optimizer
(eq. 13-16 and 20/21), plots them against the iteration (left) and the epoch
(right), and prints per config: iterations per epoch, t_warmup, γ at
t_warmup, the number of factor refreshes (iterations whose interval divides
them) and the mean interval.

Usage::

    python scripts/plot_schedules.py [--config bs32k.yaml | all]
        [--n-train N] [--out result/schedules.png]

``all`` draws the six Table 3 configs (``bs4k`` ... ``bs131k``) and
``bs32k_eq21`` on the same axes.
"""

import argparse
import os
import sys

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac import config as config_module  # NOQA: E402
from chainerkfac import schedules  # NOQA: E402
from chainerkfac.examples.schedules_figure import plot  # NOQA: E402
from chainerkfac.examples.schedules_figure import trajectory  # NOQA: E402

TABLE3 = ('bs4k', 'bs8k', 'bs16k', 'bs32k', 'bs65k', 'bs131k', 'bs32k_eq21')


def summary(name, cfg, n_train, curves):
    bs = cfg.train.batch_size
    t_warmup = schedules.warmup_iterations(cfg.optimizer.e_start, bs, n_train)
    total = len(curves['iteration'])
    gamma = curves['damping'][min(t_warmup, total - 1)]
    n = int(round(total * schedules.refresh_fraction(
        cfg.optimizer.stale, bs, cfg.train.epochs, n_train)))
    return ('{:<12} {:>8} {:>9.2f} {:>7} {:>8} {:>11.3e} {:>10.3e} {:>9} '
            '{:>8.3f}'.format(name, bs, n_train / bs, total, t_warmup,
                              cfg.optimizer.damping, gamma, n, total / n))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='bs32k.yaml',
                        help="a config (path or packaged name), or 'all'")
    parser.add_argument('--n-train', type=int,
                        help='training set size (default: the config\'s '
                        'data.n_train, else ImageNet\'s 1,281,167)')
    parser.add_argument('--out', default='result/schedules.png')
    args = parser.parse_args(argv)
    names = TABLE3 if args.config == 'all' else (args.config,)
    print('{:<12} {:>8} {:>9} {:>7} {:>8} {:>11} {:>10} {:>9} {:>8}'.format(
        'config', 'BS', 'it/epoch', 'iters', 't_warmup', 'γ(0)',
        'γ(t_warm)', 'refreshes', 'mean int'))
    results = []
    for name in names:
        try:
            cfg = config_module.load_config(name)
        except config_module.ConfigError as e:
            raise SystemExit(str(e))
        n_train = args.n_train or cfg.data.n_train or \
            schedules.IMAGENET_TRAIN_SIZE
        curves = trajectory(cfg, n_train)
        label = os.path.splitext(os.path.basename(name))[0]
        print(summary(label, cfg, n_train, curves))
        results.append((label, curves))
    plot(results, args.out)


if __name__ == '__main__':
    from chainerkfac.commands import show_log
    show_log('chainerkfac.figures')  # wrote ... on stdout
    sys.exit(main())
