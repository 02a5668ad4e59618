#!/usr/bin/env python
"""K-FAC vs MomentumSGD on scikit-learn's digits (real 8×8 images).

Trains the same small conv net with BatchNormalization (same seed, same
batches) with both optimizers and prints the test accuracy after every epoch.
"""

import argparse
import math
import os
import time

from chainerkfac import commands
from chainerkfac import devices
from chainerkfac.examples import digits
from chainerkfac import extensions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--batchsize', type=int, default=digits.BATCHSIZE)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--sgd-lr', type=float, default=0.1)
    parser.add_argument('--kfac-lr', type=float,
                        default=digits.KFAC_HYPERPARAMS['lr'])
    parser.add_argument('--race', type=float, metavar='ACC',
                        help='instead: iterations to test accuracy ACC '
                        '(evaluated every 5) for KFAC and each SGD learning '
                        'rate of the grid, per seed of --seeds')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--fisher-diff', metavar='LOG',
                        help='instead: train K-FAC only (factors refreshed '
                        'every iteration) and write Diff(t) of every factor '
                        'to LOG (JSON lines, see scripts/plot_fisher_diff.py)')
    parser.add_argument('--device', default='auto', choices=devices.CHOICES)
    args = parser.parse_args(argv)
    args.device = commands.use_device(parser, args.device)
    if args.race:
        return race(args)
    if args.fisher_diff:
        return fisher_diff(args)

    data = digits.datasets.get_digits()
    per_epoch = math.ceil(len(data[0]) / args.batchsize)
    iterations = args.epochs * per_epoch
    print('digits: {} train / {} test images, batch {}, {} iterations per '
          'epoch'.format(len(data[0]), len(data[1]), args.batchsize,
                         per_epoch))
    runs = {}
    for name, kwargs in (('kfac', {'lr': args.kfac_lr}),
                         ('sgd', {'lr': args.sgd_lr})):
        start = time.time()
        runs[name] = dict(digits.train(
            name, args.seed, iterations, eval_every=per_epoch,
            batchsize=args.batchsize, data=data, device=args.device,
            **kwargs))
        runs[name + '_time'] = time.time() - start
    print('{:>5} {:>9} {:>12} {:>12}'.format(
        'epoch', 'iteration', 'KFAC acc', 'SGD acc'))
    for epoch in range(1, args.epochs + 1):
        i = min(epoch * per_epoch, iterations)
        print('{:>5} {:>9} {:>12.4f} {:>12.4f}'.format(
            epoch, i, runs['kfac'][i], runs['sgd'][i]))
    print('wall time: KFAC {:.1f} s, SGD {:.1f} s'.format(
        runs['kfac_time'], runs['sgd_time']))


def fisher_diff(args):
    data = digits.datasets.get_digits()
    per_epoch = math.ceil(len(data[0]) / args.batchsize)
    recorder = extensions.FisherDiff()
    history = digits.train('kfac', args.seed, args.epochs * per_epoch,
                           eval_every=per_epoch, batchsize=args.batchsize,
                           data=data, callback=recorder.observe,
                           device=args.device, lr=args.kfac_lr)
    if os.path.exists(args.fisher_diff):
        os.remove(args.fisher_diff)
    n = len(recorder.records)
    recorder.flush(args.fisher_diff)
    print('digits, batch {}: {} iterations, final test accuracy {:.4f}; {} '
          'Diff records written to {}'.format(
              args.batchsize, history[-1][0], history[-1][1], n,
              args.fisher_diff))


def race(args, max_iterations=400, eval_every=5):
    data = digits.datasets.get_digits()
    runs = [('kfac', {})] + [('sgd', {'lr': lr}) for lr in digits.SGD_LRS]
    print('iterations to {:.1%} test accuracy (batch {}, evaluated every {}; '
          '- = not within {})'.format(args.race, args.batchsize, eval_every,
                                      max_iterations))
    print('{:>5} '.format('seed') + ' '.join(
        '{:>10}'.format(name if not kw else 'sgd {:g}'.format(kw['lr']))
        for name, kw in runs))
    for seed in args.seeds:
        row = []
        for name, kwargs in runs:
            history = digits.train(name, seed, max_iterations, eval_every,
                                   target=args.race, data=data,
                                   batchsize=args.batchsize,
                                   device=args.device, **kwargs)
            row.append(digits.iterations_to(history, args.race))
        print('{:>5} '.format(seed) + ' '.join(
            '{:>10}'.format('-' if i is None else i) for i in row))


if __name__ == '__main__':
    main()
