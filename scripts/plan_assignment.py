"""The assignment of K-FAC layers to processes, without MPI.

Builds the model, sets up :class:`chainerkfac.optimizers.KFAC` on it (no
forward pass) and prints the plan
:class:`~chainerkfac.optimizers.DistributedKFAC` makes for ``--size``
processes (:func:`chainerkfac.distributed.plan.make_plan`: the K-FAC layers
and the ``'(other)'`` block, their costs and owners), ending with the line
``max/lower-bound: X.XXX``; or, with ``--sweep LO HI``, one line per process
count with its ratio and a final worst-case line.

Usage::

    python scripts/plan_assignment.py --model resnet50 --size 64
    python scripts/plan_assignment.py --model resnet50 --bn-fisher full \\
        --sweep 2 1024
"""

import argparse
import sys

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac.distributed import plan as plan_module
from chainerkfac.links import DigitsCNN
from chainerkfac import options
from chainerkfac.links import ResNet50
from chainerkfac.optimizers import KFAC


MODELS = {
    'resnet50': lambda: ResNet50(n_class=1000),
    'digits': lambda: DigitsCNN(),
}


def blocks_of(model_name, bn_fisher='diagonal'):
    """The plan's blocks of the model (K-FAC layers, then ``'(other)'``)."""
    optimizer = KFAC(bn_fisher=bn_fisher, log_coverage=False)
    optimizer.setup(MODELS[model_name]())
    return plan_module.make_blocks(optimizer.kfac_layers, optimizer.target)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=sorted(MODELS), default='resnet50')
    parser.add_argument('--bn-fisher', choices=options.BN_FISHER,
                        default='diagonal')
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument('--size', '-P', type=int,
                       help='number of processes')
    group.add_argument('--sweep', type=int, nargs=2, metavar=('LO', 'HI'),
                       help='every process count from LO to HI')
    parser.add_argument('--no-improve', action='store_true',
                        help='plain LPT, without the local improvement pass')
    parser.add_argument('--redundant', action='store_true',
                        help='when processes outnumber the layers, replicate '
                        'layers so that none is idle (the paper\'s layout; '
                        'default: one owner per layer)')
    args = parser.parse_args(argv)

    blocks = blocks_of(args.model, args.bn_fisher)
    assign_options = dict(redundant=args.redundant,
                   improve=not args.no_improve)
    if args.size is not None:
        if args.size < 1:
            parser.error('--size must be positive')
        plan = plan_module.assign_blocks(blocks, args.size, **assign_options)
        print('\n'.join(plan.lines()))
        return 0

    lo, hi = args.sweep
    if lo < 1 or hi < lo:
        parser.error('--sweep needs 1 <= LO <= HI')
    print('# {} ({} blocks, bn_fisher={})'.format(
        args.model, len(blocks), args.bn_fisher))
    worst = None
    for size in range(lo, hi + 1):
        ratio = plan_module.assign_blocks(
            blocks, size, **assign_options).assignment.ratio()
        print('P={} max/lower-bound: {:.3f}'.format(size, ratio))
        if worst is None or ratio > worst[0]:
            worst = (ratio, size)
    print('worst max/lower-bound: {:.3f} at P={}'.format(*worst))
    return 0


if __name__ == '__main__':
    sys.exit(main())
