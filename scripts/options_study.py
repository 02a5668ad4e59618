#!/usr/bin/env python
"""K-FAC's options on the Fashion-MNIST protocol of the medium large-batch
study: steps to 80 % test accuracy and factor builds per variant.

Usage::

    python scripts/options_study.py [--quick] [--data DIR] [--out DIR]
        [--device auto|cpu|gpu] [--batch-sizes 128 512] [--seeds 3]
        [--variants paper adaptive ...] [--setting B,LR,DAMPING ...]
        [--shard K/N] [--report]

Each variant (``paper``, ``adaptive``, ``unit_bn``, ``sampled``,
``lr_ratio``: keyword arguments of KFAC) trains the whole budget at each B
with the K-FAC setting the medium study tuned, once per seed; every
finished run is appended to ``OUT/options.jsonl`` and the same command
resumes a stopped study.  At the end (or with ``--report``, which trains
nothing) it prints the table (B x variant: median steps and spread, seeds
that reached the target, median factor builds in total and until the
target, their ratio to ``paper``, s/step) and writes ``OUT/options.png``.
``--quick``: a smoke run (2,000 / 500 images, B = 128, one seed, paper and
unit_bn).  See :mod:`chainerkfac.examples.options_study` for the protocol.
"""

import argparse
import dataclasses
import json
import os
import sys

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac.datasets import DatasetError  # NOQA: E402
from chainerkfac.datasets import load_fashion_mnist  # NOQA: E402
from chainerkfac import devices  # NOQA: E402
from chainerkfac.examples import batch_scaling  # NOQA: E402
from chainerkfac.examples import options_study as study  # NOQA: E402


def parse_args(argv=None):
    parser = batch_scaling.study_parser(
        __doc__, 'result/options_study',
        'the smoke run (subset, B = 128, 1 seed)')
    parser.add_argument('--seeds', type=int, help='runs of each variant')
    parser.add_argument('--variants', nargs='+',
                        help='a subset of ' + ', '.join(study.VARIANTS))
    parser.add_argument('--setting', action='append', default=[],
                        metavar='B,LR,DAMPING', type=setting,
                        help='K-FAC\'s lr and damping at B (default: the '
                        'medium study\'s tuned ones)')
    parser.add_argument('--target', type=float,
                        help='test accuracy to reach')
    parser.add_argument('--n-train', type=int)
    parser.add_argument('--n-test', type=int)
    parser.add_argument('--report', action='store_true',
                        help='only print the table and draw the plot of '
                        'the runs done so far')
    parser.add_argument('--shard', metavar='K/N',
                        type=batch_scaling.parse_shard,
                        help='run only every N-th run from the K-th '
                        '(K = 0..N-1); a last run without --shard (or '
                        '--report) prints the table')
    return parser.parse_args(argv)


def setting(text):
    try:
        b, lr, damping = text.split(',')
        return int(b), (float(lr), float(damping))
    except ValueError:
        raise argparse.ArgumentTypeError(
            'expected B,LR,DAMPING, got {!r}'.format(text))


def configure(args):
    config = batch_scaling.replace_given(
        study.QUICK if args.quick else study.MEDIUM,
        batch_sizes=args.batch_sizes, seeds=args.seeds, target=args.target,
        n_train=args.n_train, n_test=args.n_test)
    variants = args.variants or (
        study.QUICK_VARIANTS if args.quick else tuple(study.VARIANTS))
    return config, variants, dict(study.TUNED, **dict(args.setting))


def main(argv=None):
    args = parse_args(argv)
    config, variants, tuned = configure(args)
    try:
        study.plan(config, variants, tuned)
        device = devices.get_device(args.device)
        train, test = (None, None) if args.report else \
            load_fashion_mnist(args.data)
    except (ValueError, devices.DeviceError, DatasetError) as e:
        sys.stderr.write('error: {}\n'.format(' '.join(str(e).split())))
        return 2
    print('options study: variants {}; batch sizes {}; {} seed(s); target '
          '{:.0%}; {} train / {} test images; results in {}'.format(
              ', '.join(variants), ', '.join(map(str, config.batch_sizes)),
              config.seeds, config.target, config.n_train, config.n_test,
              args.out))
    sys.stdout.flush()
    try:
        os.makedirs(args.out, exist_ok=True)
        if args.report:
            batch_scaling.check_settings(config, args.out)
            records = list(study.load_runs(args.out).values())
        else:
            device.use()
            train = batch_scaling.subset(train, config.n_train)
            test = batch_scaling.subset(test, config.n_test)
            records = study.run_study(config, train, test, device, args.out,
                                      variants, tuned, args.shard)
    except batch_scaling.StudyError as e:
        sys.stderr.write('error: {}\n'.format(e))
        return 2
    if args.shard is not None and not args.report:
        return 0
    rows = study.summarize(records, config, variants, tuned)
    print('\n'.join(study.format_table(rows)))
    with open(os.path.join(args.out, 'options_summary.json'), 'w') as f:
        json.dump({'config': dataclasses.asdict(config), 'rows': rows,
                   'variants': {v: study.VARIANTS[v] for v in variants}},
                  f, indent=1)
    study.plot(rows, os.path.join(args.out, 'options.png'), config.target)
    return 0


if __name__ == '__main__':
    from chainerkfac.commands import show_log
    show_log('chainerkfac.figures')  # wrote ... on stdout
    show_log('chainerkfac.options_study')  # each run as it ends
    sys.exit(main())
