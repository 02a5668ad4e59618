#!/usr/bin/env python
"""Steps to a test accuracy target vs mini-batch size on Fashion-MNIST:
K-FAC (the paper's schemes) against MomentumSGD (linear scaling + warmup)
and LARS, each tuned per batch size on the same number of trials.

Usage::

    python scripts/batch_scaling.py [--quick] [--data DIR] [--out DIR]
        [--device auto|cpu|gpu] [--batch-sizes 128 512 ...] [--target 0.88]

Every finished trial is appended to ``OUT/trials.jsonl``; running the same
command again resumes where it stopped.  At the end it prints the table
(B × optimizer: steps, epochs, tuned learning rate and damping, seeds that
reached the target, seconds per step), each optimizer's critical batch size
(the largest B within 2× of perfect scaling from the smallest B) and writes
``OUT/steps_vs_batch.png``.  ``--quick`` runs a small study (a subset of the
data, three batch sizes, one seed) in about 14 minutes on 2 CPU cores.  See
:mod:`chainerkfac.examples.batch_scaling` for the protocol.
"""

import dataclasses
import json
import os
import sys

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac.datasets import DatasetError  # NOQA: E402
from chainerkfac.datasets import load_fashion_mnist  # NOQA: E402
from chainerkfac import devices  # NOQA: E402
from chainerkfac.examples import batch_scaling as study  # NOQA: E402


def parse_args(argv=None):
    parser = study.study_parser(__doc__, 'result/batch_scaling',
                                'the small study (subset, 3 batch sizes)')
    parser.add_argument('--target', type=float,
                        help='test accuracy to reach')
    parser.add_argument('--budget-epochs', type=float)
    parser.add_argument('--seeds', type=int,
                        help='runs of each tuned setting')
    parser.add_argument('--n-train', type=int,
                        help='a balanced subset of the training set')
    parser.add_argument('--n-test', type=int,
                        help='a balanced subset of the test set')
    parser.add_argument('--width', type=int, help='ResNet-8 width')
    parser.add_argument('--min-steps', type=int,
                        help='step budget at least this (large batches)')
    parser.add_argument('--evals-per-epoch', type=int)
    parser.add_argument('--optimizers', nargs='+', choices=study.OPTIMIZERS,
                        default=list(study.OPTIMIZERS))
    parser.add_argument('--report', action='store_true',
                        help='only print the table and draw the plot of '
                        'the trials done so far (nothing is trained)')
    parser.add_argument('--shard', metavar='K/N', type=study.parse_shard,
                        help='run only every N-th (batch size, optimizer) '
                        'cell from the K-th (K = 0..N-1): N processes '
                        'share a study; a last run without --shard prints '
                        'the table')
    return parser.parse_args(argv)


def configure(args):
    return study.replace_given(
        study.QUICK if args.quick else study.FULL,
        batch_sizes=args.batch_sizes, target=args.target,
        budget_epochs=args.budget_epochs, seeds=args.seeds,
        n_train=args.n_train, n_test=args.n_test, width=args.width,
        min_steps=args.min_steps, evals_per_epoch=args.evals_per_epoch)


def main(argv=None):
    args = parse_args(argv)
    config = configure(args)
    try:
        device = devices.get_device(args.device)
        train, test = load_fashion_mnist(args.data)
    except (devices.DeviceError, DatasetError) as e:
        sys.stderr.write('error: {}\n'.format(e))
        return 2
    device.use()
    train = study.subset(train, config.n_train)
    test = study.subset(test, config.n_test)
    os.makedirs(args.out, exist_ok=True)
    path = study.results_path(args.out, args.shard)
    print('Fashion-MNIST: {} train / {} test images; ResNet-8 (width {}); '
          'target {:.0%}; batch sizes {}; {} trials per optimizer and batch '
          'size, {} seed(s); device {}; results in {}'.format(
              len(train), len(test), config.width, config.target,
              ', '.join(map(str, config.batch_sizes)),
              config.trials_per_optimizer(), config.seeds,
              devices.describe(device), path))
    sys.stdout.flush()
    try:
        if args.report:
            study.check_settings(config, args.out)
            records = list(study.load_records(args.out).values())
        else:
            records = study.run_study(config, train, test, device, args.out,
                                      optimizers=args.optimizers,
                                      shard=args.shard)
    except study.StudyError as e:
        sys.stderr.write('error: {}\n'.format(e))
        return 2
    if args.shard is not None and not args.report:
        return 0
    for batch_size, name, done, size in study.incomplete_cells(
            records, config, args.optimizers):
        print('not finished: {} at B = {} ({} of {} grid trials)'.format(
            name, batch_size, done, size))
    rows = study.summarize(records, config)
    print('\n'.join(study.format_table(rows)))
    print('(* tuned learning rate at the edge of its grid of 3 or more)')
    critical = {name: study.critical_batch_size(rows, name)
                for name in args.optimizers}
    for name, value in critical.items():
        print('critical batch size (within 2x of perfect scaling): {} {}'
              .format(name, value if value is not None else
                      '- (smallest B missed the target)'))
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump({'config': dataclasses.asdict(config), 'rows': rows,
                   'critical_batch_size': critical}, f, indent=1,
                  default=str)
    study.plot(rows, os.path.join(args.out, 'steps_vs_batch.png'),
               config.target)
    return 0


if __name__ == '__main__':
    from chainerkfac.commands import show_log
    show_log('chainerkfac.figures')  # wrote ... on stdout
    sys.exit(main())
