#!/usr/bin/env python
"""Figure 2: predicted time per iteration of ResNet-50 vs number of GPUs.

The model is :mod:`chainerkfac.scaling` (stage costs that do not depend on P,
stages 4-5 from the real layer assignment of each P and FLOP rates, stages 3
and 6 from an α–β model of ReduceScatterV / AllGatherV on the real per-process
byte counts).  Curves, 32 images per GPU:

* K-FAC, every step, factors sent as dense float32;
* K-FAC, every step, factors sent as packed float16 upper triangles;
* K-FAC, stale factors (the refresh fraction of ``--config``'s eq. 20/21
  schedule), packed float16;
* K-FAC, every step, packed float16, with the paper's replicated layers past
  the layer count (``assign(redundant=True)``), for comparison;
* SGD (forward + backward, an all-reduce of the gradients, the update).

Defaults describe the paper's machine (ABCI: V100 GPUs, InfiniBand EDR):
bandwidth 12.5 GB/s per GPU (EDR, 100 Gb/s), latency 5 µs per message, and
the collectives as our NCCL communicator runs them on GPUs (``grouped``: one
rooted reduce / broadcast per owner, issued together; ``--algorithm ring``
or ``halving`` model MPI's ReduceScatterV / AllGatherV instead); the
compute defaults (forward + backward
0.30 s, factors 0.15 s, update 0.02 s, 1.2 TFLOP/s for stages 4-5) are
chosen so that the model's 1-GPU time is the paper's ≈ 0.72 s (Figure 2);
see the README's "Reproducing the paper".

Also printed: the bytes of stages 3 and 6 per process for the one-owner plan
and the replicated one, and what NCCL's equal-count collectives would send
if every segment were padded to the largest (the layout the grouped calls
replace).  The last line is ``T(1024)/min: every-step X.XXX, stale X.XXX``:
T at the largest P over the minimum of that curve over the P evaluated.

With ``--measured FILE`` (written by ``mpiexec -n 2 python
scripts/bench_distributed.py --json FILE``) a second panel repeats the model
with this machine's measured stage costs and shared-memory network flags
(``--local-*``) and overlays the measured P = 1 and P = 2 iteration times.

Usage::

    python scripts/scaling_model.py [--measured result/bench_p2.json]
        [--algorithm grouped|ring|halving] [--bandwidth GB/s] [--latency µs]
        [--out result/scaling.png]
"""

import argparse
import json
import os
import sys

try:
    import chainerkfac  # NOQA: first: makes Chainer importable (compat)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    import chainerkfac  # NOQA

from chainerkfac import config as config_module  # NOQA: E402
from chainerkfac import scaling  # NOQA: E402
from chainerkfac import schedules  # NOQA: E402
from chainerkfac import plotting  # NOQA: E402

PROCESSES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: The paper's Figure 2: 1 GPU ≈ 0.72 s per iteration, 64 GPUs 1.31× faster.
PAPER_T1 = 0.72
PAPER_SPEEDUP_64 = 1.311
CURVES = ('sgd', 'dense fp32, every step', 'packed fp16, every step',
          'packed fp16, stale', 'replicated, every step')
#: The curves of the last line (``T(1024)/min``).
TARGET_CURVES = (('every-step', 'packed fp16, every step'),
                 ('stale', 'packed fp16, stale'))


def resnet50_layers():
    """:class:`~chainerkfac.scaling.LayerInfo` of ResNet-50's 107 layers
    (diagonal BN Fisher)."""
    from chainerkfac.links import ResNet50
    from chainerkfac.optimizers import KFAC
    optimizer = KFAC(bn_fisher='diagonal')
    optimizer.setup(ResNet50())
    return scaling.layer_infos(optimizer)


def curves(layers, costs, network, fraction, processes):
    """``{curve: [seconds per P]}``."""
    out = {name: [] for name in CURVES}
    for p in processes:
        out['sgd'].append(scaling.sgd_time(p, layers, costs, network))
        out['dense fp32, every step'].append(scaling.kfac_time(
            p, layers, costs, network, scaling.DENSE_FP32))
        out['packed fp16, every step'].append(scaling.kfac_time(
            p, layers, costs, network, scaling.PACKED_FP16))
        out['packed fp16, stale'].append(scaling.kfac_time(
            p, layers, costs, network, scaling.PACKED_FP16, fraction))
        out['replicated, every step'].append(scaling.kfac_time(
            p, layers, costs, network, scaling.PACKED_FP16,
            redundant=True))
    return out


def print_curves(title, processes, values):
    print(title)
    print('{:>6} '.format('P') + ' '.join('{:>24}'.format(c) for c in CURVES))
    for k, p in enumerate(processes):
        print('{:>6} '.format(p) + ' '.join(
            '{:>24.3f}'.format(values[c][k]) for c in CURVES))


def print_stages(layers, costs, network, processes):
    stages = [scaling.iteration_stages(p, layers, costs, network,
                                       scaling.PACKED_FP16)
              for p in processes]
    keys = list(stages[0])
    print('stages of a refresh iteration, packed fp16 (s):')
    print('{:>6} '.format('P') + ' '.join('{:>10}'.format(
        k.replace('forward_backward', 'fwd+bwd').replace(
            'reduce_scatter', 'RS').replace('all_gather', 'AG').replace(
                'precondition', 'precond')) for k in keys))
    for p, row in zip(processes, stages):
        print('{:>6} '.format(p) + ' '.join('{:>10.4f}'.format(row[k])
                                            for k in keys))


def megabytes(counts):
    return '{:.1f}'.format(sum(counts) / 1e6)


def print_bytes(layers, processes):
    """Stage 3 (a refresh, packed fp16) and stage 6 per process: the whole
    vector each process takes part in and the largest segment, for the
    one-owner plan and the replicated one; and NCCL's padding."""
    print('bytes per process, refresh, packed fp16 (MB): stage 3 vector / '
          'largest segment, stage 6 vector')
    print('{:>6} {:>24} {:>24}'.format('P', 'one owner per layer',
                                       'replicated (paper)'))
    for p in processes:
        cells = []
        for redundant in (False, True):
            plan = scaling.plan_of(layers, p, redundant)
            s3 = scaling.stage3_counts(plan, layers, scaling.PACKED_FP16,
                                       True)
            s6 = scaling.stage6_counts(plan, layers)
            cells.append('{} / {:.1f}, {}'.format(
                megabytes(s3), max(s3) / 1e6, megabytes(s6)))
        print('{:>6} {:>24} {:>24}'.format(p, *cells))
    print('NCCL equal-count collectives (every segment padded to the '
          'largest) vs payload, one owner per layer:')
    print('{:>6} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}'.format(
        'P', 'stage 3 MB', 'padded MB', 'ratio', 'stage 6 MB', 'padded MB',
        'ratio'))
    for p in processes:
        plan = scaling.plan_of(layers, p)
        cells = []
        for counts in (scaling.stage3_counts(plan, layers,
                                             scaling.PACKED_FP16, True),
                       scaling.stage6_counts(plan, layers)):
            padded = scaling.padded_bytes(counts)
            cells += [sum(counts) / 1e6, padded / 1e6,
                      padded / float(sum(counts))]
        print('{:>6} {:>12.1f} {:>12.1f} {:>7.2f} {:>12.1f} {:>12.1f} '
              '{:>7.2f}'.format(p, *cells))
    print('grouped reduce / broadcast (NcclCommunicator): the payload '
          'alone, ratio 1.00 at every P')


def target_line(processes, values):
    """``T(1024)/min: every-step X.XXX, stale X.XXX`` (T at the largest P
    evaluated over the minimum of the same curve)."""
    largest = max(processes)
    parts = []
    for label, curve in TARGET_CURVES:
        t = values[curve]
        parts.append('{} {:.3f}'.format(
            label, t[processes.index(largest)] / min(t)))
    return 'T({})/min: {}'.format(largest, ', '.join(parts))


def shape_lines(processes, values, curve):
    """The three claims of Figure 2, checked on one curve."""
    t = dict(zip(processes, values[curve]))
    lines = []
    if 1 in t and 64 in t:
        lines.append('{}: T(1)/T(64) = {:.2f} (paper: {:.2f}; > 1: '
                     'superlinear)'.format(curve, t[1] / t[64],
                                           PAPER_SPEEDUP_64))
    big = [p for p in processes if p >= 64]
    if big:
        low = min(t[p] for p in big)
        lines.append('{}: T(P)/min over P >= 64: {}'.format(curve, ', '.join(
            '{}: {:.2f}'.format(p, t[p] / low) for p in big)))
    return lines


def measured_costs(path):
    """(StageCosts, {P: measured seconds}) from bench_distributed --json."""
    from chainerkfac.distributed import assignment
    if not os.path.isfile(path):
        raise SystemExit('scaling_model.py: no such file: {}'.format(path))
    with open(path) as f:
        record = json.load(f)
    if record.get('processes') != 2 or 'alone' not in record:
        raise SystemExit('scaling_model.py: {}: expected the output of '
                         '`mpiexec -n 2 python scripts/bench_distributed.py '
                         '--json`'.format(path))
    alone = record['alone']

    def mean(key):
        return sum(r[key] for r in alone) / len(alone)

    layers = resnet50_layers()
    inv = sum(assignment.inversion_flops(x.factor_shapes) for x in layers)
    pre = sum(assignment.precondition_flops(x.factor_shapes) for x in layers)
    costs = scaling.StageCosts(
        forward_backward=mean('forward_backward'), factors=mean('factors'),
        update=mean('update'), inverse_rate=inv / mean('inverse'),
        precondition_rate=pre / mean('precondition'))
    points = {1: mean('total'),
              2: max(r['total'] for r in record['together'])}
    return costs, points


def plot(panels, processes, path):
    pyplot = plotting.pyplot()

    fig, axes = pyplot.subplots(1, len(panels), squeeze=False,
                                figsize=(6.5 * len(panels), 4.5))
    for ax, (title, values, points) in zip(axes[0], panels):
        for name in CURVES:
            ax.plot(processes, values[name], marker='.', label=name,
                    linestyle=':' if name.startswith('replicated') else '-')
        if points:
            ps = sorted(points)
            ax.plot(ps, [points[p] for p in ps], 'k*', markersize=12,
                    label='measured here')
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('GPUs (processes), 32 images each')
        ax.set_ylabel('seconds / iteration')
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    plotting.save_figure(fig, path)


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
                        default=list(PROCESSES))
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
    layers = resnet50_layers()
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
    values = curves(layers, costs, network, fraction, processes)
    title = 'V100 + InfiniBand EDR (model, {})'.format(args.algorithm)
    print_curves(title + ', seconds per iteration:', processes, values)
    print_stages(layers, costs, network, processes)
    print_bytes(layers, processes)
    for line in shape_lines(processes, values, 'packed fp16, every step'):
        print(line)
    panels = [(title, values, None)]
    if args.measured:
        local_costs, points = measured_costs(args.measured)
        local = scaling.Network(args.local_latency * 1e-6,
                                args.local_bandwidth * 1e9,
                                args.local_algorithm)
        local_values = curves(layers, local_costs, local, fraction,
                              processes)
        local_title = 'this machine (measured stage costs, model)'
        print_curves(local_title + ', seconds per iteration:', processes,
                     local_values)
        model = local_values['dense fp32, every step']
        for p in sorted(points):
            if p in processes:
                print('P = {}: measured {:.2f} s, model {:.2f} s (dense '
                      'fp32, every step)'.format(
                          p, points[p], model[processes.index(p)]))
        panels.append((local_title, local_values, points))
    plot(panels, processes, args.out)
    print(target_line(processes, values))


if __name__ == '__main__':
    sys.exit(main())
