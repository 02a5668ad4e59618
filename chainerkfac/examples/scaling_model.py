"""
"""

import json
import os
import typing

from chainerkfac import plotting
from chainerkfac import scaling

PROCESSES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: The paper's Figure 2: 1 GPU ≈ 0.72 s per iteration, 64 GPUs 1.31× faster.
PAPER_T1 = 0.72
PAPER_SPEEDUP_64 = 1.311
CURVES = ('sgd', 'dense fp32, every step', 'packed fp16, every step',
          'packed fp16, stale', 'replicated, every step')
#: The curves of the last line (``T(1024)/min``).
TARGET_CURVES = (('every-step', 'packed fp16, every step'),
                 ('stale', 'packed fp16, stale'))


def resnet50_layers() -> list:
    """:class:`~chainerkfac.scaling.LayerInfo` of ResNet-50's 107 layers
    (diagonal BN Fisher)."""
    from chainerkfac.links import ResNet50
    from chainerkfac.optimizers import KFAC
    optimizer = KFAC(bn_fisher='diagonal')
    optimizer.setup(ResNet50())
    return scaling.layer_infos(optimizer)


def curves(layers: list, costs: scaling.StageCosts,
           network: scaling.Network, fraction: float,
           processes: typing.Sequence[int]) -> dict:
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


def curve_lines(title: str, processes: typing.Sequence[int],
                values: dict) -> typing.List[str]:
    """The table of the curves: one row per P."""
    lines = [title, '{:>6} '.format('P') + ' '.join(
        '{:>24}'.format(c) for c in CURVES)]
    for k, p in enumerate(processes):
        lines.append('{:>6} '.format(p) + ' '.join(
            '{:>24.3f}'.format(values[c][k]) for c in CURVES))
    return lines


def stage_lines(layers: list, costs: scaling.StageCosts,
                network: scaling.Network,
                processes: typing.Sequence[int]) -> typing.List[str]:
    """The seconds of each stage of a refresh iteration, one row per P."""
    stages = [scaling.iteration_stages(p, layers, costs, network,
                                       scaling.PACKED_FP16)
              for p in processes]
    keys = list(stages[0])
    lines = ['stages of a refresh iteration, packed fp16 (s):']
    lines.append('{:>6} '.format('P') + ' '.join('{:>10}'.format(
        k.replace('forward_backward', 'fwd+bwd').replace(
            'reduce_scatter', 'RS').replace('all_gather', 'AG').replace(
                'precondition', 'precond')) for k in keys))
    for p, row in zip(processes, stages):
        lines.append('{:>6} '.format(p) + ' '.join(
            '{:>10.4f}'.format(row[k]) for k in keys))
    return lines


def megabytes(counts: typing.Sequence[int]) -> str:
    return '{:.1f}'.format(sum(counts) / 1e6)


def byte_lines(layers: list,
               processes: typing.Sequence[int]) -> typing.List[str]:
    """Stage 3 (a refresh, packed fp16) and stage 6 per process: the whole
    vector each process takes part in and the largest segment, for the
    one-owner plan and the replicated one; and NCCL's padding."""
    lines = ['bytes per process, refresh, packed fp16 (MB): stage 3 vector / '
             'largest segment, stage 6 vector']
    lines.append('{:>6} {:>24} {:>24}'.format('P', 'one owner per layer',
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
        lines.append('{:>6} {:>24} {:>24}'.format(p, *cells))
    lines.append('NCCL equal-count collectives (every segment padded to the '
                 'largest) vs payload, one owner per layer:')
    lines.append('{:>6} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}'.format(
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
        lines.append('{:>6} {:>12.1f} {:>12.1f} {:>7.2f} {:>12.1f} '
                     '{:>12.1f} {:>7.2f}'.format(p, *cells))
    lines.append('grouped reduce / broadcast (NcclCommunicator): the payload '
                 'alone, ratio 1.00 at every P')
    return lines


def target_line(processes: typing.Sequence[int], values: dict) -> str:
    """``T(1024)/min: every-step X.XXX, stale X.XXX`` (T at the largest P
    evaluated over the minimum of the same curve)."""
    largest = max(processes)
    parts = []
    for label, curve in TARGET_CURVES:
        t = values[curve]
        parts.append('{} {:.3f}'.format(
            label, t[processes.index(largest)] / min(t)))
    return 'T({})/min: {}'.format(largest, ', '.join(parts))


def shape_lines(processes: typing.Sequence[int], values: dict,
                curve: str) -> typing.List[str]:
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


def measured_costs(path: str) -> tuple:
    """(StageCosts, {P: measured seconds}) from bench_distributed --json."""
    from chainerkfac.distributed import assignment
    if not os.path.isfile(path):
        raise ValueError('no such file: {}'.format(path))
    with open(path) as f:
        record = json.load(f)
    if record.get('processes') != 2 or 'alone' not in record:
        raise ValueError('{}: expected the output of `mpiexec -n 2 python '
                         'scripts/bench_distributed.py --json`'.format(path))
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


def plot(panels: list, processes: typing.Sequence[int],
         path: str) -> typing.Any:
    """One panel per ``(title, values, measured points)``: seconds per
    iteration against the processes, log-log, the legend under the axes
    (it covers no curve).  Returns the (closed) figure."""
    pyplot = plotting.pyplot()
    from matplotlib import ticker

    fig, axes = pyplot.subplots(1, len(panels), squeeze=False,
                                figsize=(6.5 * len(panels), 4.5))
    for ax, (title, values, points) in zip(axes[0], panels):
        for name in CURVES:
            ax.plot(processes, values[name], marker='.', label=name,
                    linestyle=':' if name.startswith('replicated') else '-')
        if points:
            ps = sorted(points)
            ax.plot(ps, [points[p] for p in ps], 'k*', markersize=12,
                    linestyle='none', label='measured here')
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        plain = ticker.FuncFormatter(lambda v, _: '{:g}'.format(v))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel('processes P (one GPU each on a cluster), 32 images '
                      'each')
        ax.set_ylabel('time per iteration (s)')
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc='upper center', ncol=3,
                  bbox_to_anchor=(0.5, -0.15), frameon=False)
    plotting.save_figure(fig, path)
    return fig
