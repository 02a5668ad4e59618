"""Memory held by the Fisher blocks of ResNet-50 (Figure 4 of the paper).

For each configuration (BN Fisher full / diagonal × factor dtype float32 /
float16), one real update of ResNet-50 with K-FAC, then the bytes of the
factors it holds, dense and packed, by layer type, and the bar chart of
Figure 4 (:mod:`chainerkfac.examples.fisher_memory`; the paper: 1017 MiB
full vs 587 MiB diagonal BN Fisher, fp32).

Usage::

    python scripts/fisher_memory.py [--size 64] [--batch 2] [--n-class 1000]
        [--out result/fisher_memory.png]
"""

import argparse
import collections
import time

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac import commands
from chainerkfac import devices
from chainerkfac.examples import fisher_memory as figure4


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=64,
                        help='input height and width (>= 32)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--n-class', type=int, default=1000)
    parser.add_argument('--out', default='result/fisher_memory.png',
                        help='the bar chart (PNG)')
    parser.add_argument('--device', default='auto', choices=devices.CHOICES)
    args = parser.parse_args(argv)
    device = commands.use_device(parser, args.device)

    results = collections.OrderedDict()
    counts = None
    for bn_fisher, dtype in figure4.CONFIGS:
        start = time.time()
        optimizer = figure4.run_one_update(
            bn_fisher, dtype, args.size, args.batch, args.n_class,
            device=device)
        measure = figure4.fisher_memory(optimizer)
        measure['seconds'] = time.time() - start
        results[(bn_fisher, dtype)] = measure
        counts = measure['counts']
        del optimizer

    print('ResNet-50 K-FAC layers: {total} ({conv} conv, {fc} FC, {bn} BN); '
          'input {s}x{s}, batch {b}, {c} classes'.format(
              s=args.size, b=args.batch, c=args.n_class, **counts))
    print('Fisher blocks held by the optimizer after one update (MiB):')
    for line in figure4.format_table(results):
        print(line)
    for (bn_fisher, dtype), measure in results.items():
        print('{}/{}: factor dtypes {}, one update {:.1f} s'.format(
            bn_fisher, dtype, ','.join(sorted(measure['dtypes'])),
            measure['seconds']))
    full = results[('full', 'float32')]['dense']['total'] / figure4.MIB
    diagonal = results[('diagonal', 'float32')]['dense']['total'] / \
        figure4.MIB
    unit = results[('unit', 'float32')]['dense']['total'] / figure4.MIB
    print('figure4: full {:.1f} MiB, diagonal {:.1f} MiB, unit-wise {:.1f} '
          'MiB'.format(full, diagonal, unit))
    figure4.plot_bars(results, args.out)


if __name__ == '__main__':
    from chainerkfac.commands import show_log
    show_log('chainerkfac.figures')  # wrote ... on stdout
    main()
