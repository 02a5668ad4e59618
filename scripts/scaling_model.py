#!/usr/bin/env python
"""

The model and its tables: :mod:`chainerkfac.examples.scaling_model` (its
docstring tells the curves and the defaults).  The last line is
``T(1024)/min: every-step X.XXX, stale X.XXX``.

Usage::

    python scripts/scaling_model.py [--measured result/bench_p2.json]
        [--algorithm grouped|ring|halving] [--bandwidth GB/s] [--latency µs]
        [--out result/scaling.png]
"""

import argparse
import os
import sys

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac import config as config_module  # NOQA: E402
from chainerkfac.examples import scaling_model as model  # NOQA: E402
from chainerkfac import scaling  # NOQA: E402
from chainerkfac import schedules  # NOQA: E402


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    net = parser.add_argument_group('network (α–β)')
    net.add_argument('--algorithm', default='grouped',
                     choices=scaling.ALGORITHMS,
                     help='grouped: NCCL, one rooted reduce / broadcast per '
                     'owner (the GPU path, default); ring, halving: MPI')
    net.add_argument('--latency', type=float, default=5.0,
                     help='α, µs per message (default 5: InfiniBand EDR)')
    net.add_argument('--bandwidth', type=float, default=12.5,
                     help='1/β, GB/s per GPU (default 12.5: EDR 100 Gb/s)')
    cost = parser.add_argument_group('per-GPU costs (default: V100, 1 GPU '
                                     '≈ 0.72 s as in Figure 2)')
    cost.add_argument('--forward-backward', type=float, default=0.30,
                      help='s, forward + backward of 32 images')
    cost.add_argument('--factors', type=float, default=0.15,
                      help='s, building every factor')
    cost.add_argument('--update', type=float, default=0.02, help='s')
    cost.add_argument('--inverse-rate', type=float, default=1.2,
                      help='TFLOP/s of the Cholesky factorizations')
    cost.add_argument('--precondition-rate', type=float, default=1.2,
                      help='TFLOP/s of the triangular solves')
    parser.add_argument('--config', default='bs32k.yaml',
                        help='the schedule of the stale curve')
    parser.add_argument('--processes', type=int, nargs='+',
                        default=list(model.PROCESSES))
    parser.add_argument('--measured', metavar='JSON',
                        help='stage costs measured here (bench_distributed '
                        '--json, P = 2): adds the panel of this machine')
    parser.add_argument('--local-latency', type=float, default=1.0,
                        help='µs, this machine (shared memory)')
    parser.add_argument('--local-bandwidth', type=float, default=2.0,
                        help='GB/s, this machine (shared memory)')
    parser.add_argument('--local-algorithm', default='halving',
                        choices=scaling.ALGORITHMS,
                        help='this machine\'s collectives (MPI on the CPU)')
    parser.add_argument('--out', default='result/scaling.png')
    args = parser.parse_args(argv)

    try:
        cfg = config_module.load_config(args.config)
    except config_module.ConfigError as e:
        raise SystemExit(str(e))
    n_train = cfg.data.n_train or schedules.IMAGENET_TRAIN_SIZE
    fraction = schedules.refresh_fraction(
        cfg.optimizer.stale, cfg.train.batch_size, cfg.train.epochs, n_train)
    layers = model.resnet50_layers()
    processes = sorted(set(args.processes))
    network = scaling.Network(args.latency * 1e-6, args.bandwidth * 1e9,
                              args.algorithm)
    costs = scaling.StageCosts(
        args.forward_backward, args.factors, args.update,
        args.inverse_rate * 1e12, args.precondition_rate * 1e12)
    print('ResNet-50: {} K-FAC layers, {:,} parameters; stale curve: {} '
          '(refresh fraction {:.3f})'.format(
              len(layers), sum(x.grad_elements for x in layers),
              os.path.basename(cfg.source), fraction))
    print('network: {}, latency {:g} µs, bandwidth {:g} GB/s; {}'.format(
        args.algorithm, args.latency, args.bandwidth, costs))
    values = model.curves(layers, costs, network, fraction, processes)
    title = 'V100 + InfiniBand EDR (model, {})'.format(args.algorithm)
    lines = (model.curve_lines(title + ', seconds per iteration:',
                               processes, values) +
             model.stage_lines(layers, costs, network, processes) +
             model.byte_lines(layers, processes) +
             model.shape_lines(processes, values, 'packed fp16, every step'))
    print('\n'.join(lines))
    panels = [(title, values, None)]
    if args.measured:
        try:
            local_costs, points = model.measured_costs(args.measured)
        except ValueError as e:
            raise SystemExit('scaling_model.py: {}'.format(e))
        local = scaling.Network(args.local_latency * 1e-6,
                                args.local_bandwidth * 1e9,
                                args.local_algorithm)
        local_values = model.curves(layers, local_costs, local, fraction,
                              processes)
        local_title = 'this machine (measured stage costs, model)'
        print('\n'.join(model.curve_lines(
            local_title + ', seconds per iteration:', processes,
            local_values)))
        dense = local_values['dense fp32, every step']
        for p in sorted(points):
            if p in processes:
                print('P = {}: measured {:.2f} s, model {:.2f} s (dense '
                      'fp32, every step)'.format(
                          p, points[p], dense[processes.index(p)]))
        panels.append((local_title, local_values, points))
    model.plot(panels, processes, args.out)
    print(model.target_line(processes, values))


if __name__ == '__main__':
    from chainerkfac.commands import show_log
    show_log('chainerkfac.figures')  # wrote ... on stdout
    sys.exit(main())
