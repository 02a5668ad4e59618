#!/usr/bin/env python
"""Cost of a K-FAC update of ResNet-50 against MomentumSGD, stage by stage.

Runs real updates (default: 32 images of 224×224, the paper's per-process
batch) and prints per stage the wall time, the FLOP count of our model and the
achieved GFLOP/s, then the ratios KFAC/SGD at refresh interval 1 and amortized
over the paper's steady interval 20, and the inversion stage of all factors
with ``chainerkfac.inverse`` (Cholesky, plus the explicit inverses where
that method is used) against ``numpy.linalg.inv`` / ``cupy.linalg.inv``, and
preconditioning by triangular solves against explicit inverse + GEMM.
``--device gpu`` runs it on a GPU (all timings synchronize the device);
``--compare-factor-dtypes`` adds the float16 vs float32 factor build.

FLOP model (multiply-add = 2 flops): forward = Σ 2·n·T·C_out·C_in·k² over
convolutions and the FC, forward+backward = 3× forward; factor build = Σ d²·m
per factor (one triangle of the symmetric product, syrk; 2·n·d for the
diagonal BN Fisher); inversion and preconditioning are the library's
(:func:`chainerkfac.distributed.assignment.inversion_flops` and
``precondition_flops``, the model the layer assignment balances).
"""

import argparse
import collections
import json
import statistics
import time

import numpy

import chainerkfac  # noqa: F401  first: makes Chainer importable
import chainer
import chainer.functions as F

from chainerkfac import commands
from chainerkfac import devices
from chainerkfac.distributed import assignment
from chainerkfac import inverse
from chainerkfac import layers
from chainerkfac.links import ResNet50
from chainerkfac import options
from chainerkfac.optimizers import KFAC


STAGES = ('forward_backward', 'factors', 'inverse', 'precondition', 'update')


class ShapeRecorder(chainer.LinkHook):
    """Records the output shape of every link call."""

    name = 'ShapeRecorder'

    def __init__(self):
        self.shapes = {}

    def forward_postprocess(self, args):
        self.shapes[args.link] = args.out.shape


def flop_model(optimizer, out_shapes, n):
    """FLOPs per stage of one K-FAC update (interval 1)."""
    forward = build = invert = precondition = 0.0
    for layer in optimizer.kfac_layers:
        shapes = layer.factor_shapes()
        invert += assignment.inversion_flops(shapes)
        precondition += assignment.precondition_flops(shapes)
        if isinstance(layer, layers.KroneckerLayer):
            d_a, d_g = shapes['A'][0], shapes['G'][0]
            out = out_shapes[layer.link]
            positions = int(numpy.prod(out[2:])) if len(out) > 2 else 1
            m = n * positions
            forward += 2.0 * m * layer.link.W.size
            build += (d_a * d_a + d_g * d_g) * float(m)
        else:
            d = shapes['F'][0]
            build += d * d * float(n) if len(shapes['F']) == 2 else 2.0 * n * d
    return {'forward_backward': 3 * forward, 'factors': build,
            'inverse': invert, 'precondition': precondition, 'update': 0.0}


def run_update(optimizer, model, x, t, device):
    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)
    devices.synchronize(device)
    start = time.perf_counter()
    optimizer.update(lossfun, x, t)
    devices.synchronize(device)
    return time.perf_counter() - start


def timed(function, device):
    """Seconds of ``function()`` with the device's queue drained."""
    devices.synchronize(device)
    start = time.perf_counter()
    out = function()
    devices.synchronize(device)
    return time.perf_counter() - start, out


def square_factors(optimizer):
    return [(layer, name) for layer in optimizer.kfac_layers
            for name in layer.factor_names
            if len(layer.factor_shapes()[name]) == 2]


def bench_inversion(optimizer, device):
    """Seconds to invert every damped square factor: ours (one batch of
    Cholesky factorizations; plus forming the explicit inverses) vs the
    array module's ``linalg.inv`` of each damped factor."""
    xp = device.xp
    mats = [layer.factor(name) for layer, name in square_factors(optimizer)]
    damping = optimizer.damping
    cholesky, factors_ = timed(lambda: inverse.cholesky_many(
        [(m, damping) for m in mats]), device)
    explicit, _ = timed(lambda: [inverse.cholesky_inverse(c)
                                 for c in factors_], device)
    eye = {}

    def plain():
        for m in mats:
            d = m.shape[0]
            if d not in eye:
                eye[d] = xp.eye(d, dtype=m.dtype)
            xp.linalg.inv(m + damping * eye[d])
    plain_time, _ = timed(plain, device)
    return {'cholesky': cholesky, 'explicit_inverse': explicit,
            'linalg_inv': plain_time,
            'gflop_inv': sum(m.shape[0] ** 3 for m in mats) / 1e9}


def bench_precondition(optimizer, device, repeats=3):
    """Seconds of stage 5 (every layer) by each inverse method."""
    grads = [[p.grad.copy() for p in layer.params]
             for layer in optimizer.kfac_layers]

    def run(method):
        for layer, saved in zip(optimizer.kfac_layers, grads):
            for p, g in zip(layer.params, saved):
                p.grad[...] = g
            layer.precondition(method)
    out = {}
    for method in ('solve', 'explicit'):
        run(method)  # the explicit inverses are formed here, not timed
        out[method] = min(timed(lambda: run(method), device)[0]
                          for _ in range(repeats))
    return out


def bench_factor_dtypes(model, x, t, device, bn_fisher):
    """The factor-build stage with float32 and float16 factors (same weights
    and batch) and the largest relative difference of the factors."""
    out = {}
    built = {}
    for dtype in options.FACTOR_DTYPES:
        opt = KFAC(lr=0.0, damping=1e-3, bn_fisher=bn_fisher,
                   factor_dtype=dtype).setup(model)
        opt.synchronize_stages = True
        run_update(opt, model, x, t, device)  # warm up (kernels, buffers)
        opt.stage_seconds.clear()
        opt.a_interval = opt.g_interval = 1
        run_update(opt, model, x, t, device)
        out[dtype] = opt.stage_seconds['factors']
        built[dtype] = [layer.factor(name) for layer in opt.kfac_layers
                        for name in layer.factor_names]
    worst = 0.0
    for a, b in zip(built['float32'], built['float16']):
        a, b = chainer.backend.CpuDevice().send((a, b))
        scale = float(numpy.abs(a).max()) or 1.0
        worst = max(worst, float(numpy.abs(a - b).max()) / scale)
    out['max_rel_diff'] = worst
    return out


#: The goals, by device kind: KFAC/SGD update-time ratios at most, and
#: speed-ups at least (the GPU ones are the project's performance goals).
TARGETS = {
    'interval_1': {'gpu': 2.0, 'cpu': 1.8},      # KFAC(interval 1)/SGD <=
    'amortized': {'gpu': 1.15, 'cpu': 1.12},     # KFAC(interval k)/SGD <=
    'inversion_speedup': {'gpu': 3, 'cpu': 5},   # linalg.inv / ours >=
    'factor_fp16_speedup': {'gpu': 2},           # fp32 / fp16 build >=
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--n-class', type=int, default=1000)
    parser.add_argument('--bn-fisher', default='diagonal',
                        choices=options.BN_FISHER)
    parser.add_argument('--factor-dtype', default='float32',
                        choices=options.FACTOR_DTYPES)
    parser.add_argument('--inverse-method', default='auto',
                        choices=inverse.METHODS)
    parser.add_argument('--interval', type=int, default=20,
                        help='steady refresh interval to amortize over')
    parser.add_argument('--device', default='auto', choices=devices.CHOICES)
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed updates (median; default 1 on CPU, '
                        '5 on GPU)')
    parser.add_argument('--compare-factor-dtypes', action='store_true',
                        help='also time the factor build in float16 vs '
                        'float32')
    parser.add_argument('--json', default=None,
                        help='write every figure to this JSON file')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    return parser, args


def measure(args, device):
    """Every figure of one run, as a dict (what ``--json`` writes)."""
    gpu = devices.is_gpu(device)
    repeats = args.repeats or (5 if gpu else 1)
    rng = numpy.random.RandomState(args.seed)
    x = rng.rand(args.batch, 3, args.size, args.size).astype(numpy.float32)
    t = rng.randint(0, args.n_class, args.batch).astype(numpy.int32)
    numpy.random.seed(args.seed)
    model = ResNet50(args.n_class)
    recorder = ShapeRecorder()
    with recorder, chainer.no_backprop_mode():
        model(x[:1])
    out_shapes = recorder.shapes
    model.to_device(device)
    x, t = device.send((x, t))

    sgd_model = model.copy(mode='copy')
    sgd = chainer.optimizers.MomentumSGD(lr=0.1).setup(sgd_model)
    kfac = KFAC(lr=0.01, damping=1e-3, bn_fisher=args.bn_fisher,
                factor_dtype=args.factor_dtype,
                inverse_method=args.inverse_method).setup(model)
    kfac.synchronize_stages = True  # device times per stage
    method = inverse.resolve_method(args.inverse_method, device.xp)

    # warm up both code paths (on a GPU at full size: kernel compilation)
    warm = (x, t) if gpu else (x[:2, :, :32, :32], t[:2])
    run_update(sgd, sgd_model, *warm, device=device)
    run_update(kfac, model, *warm, device=device)

    sgd_times, kfac_times, stale_times, stale_fbs = [], [], [], []
    per_stage = collections.defaultdict(list)
    for _ in range(repeats):
        sgd_times.append(run_update(sgd, sgd_model, x, t, device))
        kfac.a_interval = kfac.g_interval = 1
        kfac.stage_seconds.clear()
        kfac_times.append(run_update(kfac, model, x, t, device))
        for name in STAGES:
            per_stage[name].append(kfac.stage_seconds.get(name, 0.0))
        # a stale step: no factor due; only preconditioning
        kfac.a_interval = kfac.g_interval = 10 ** 9
        kfac.stage_seconds.clear()
        stale_times.append(run_update(kfac, model, x, t, device))
        stale_fbs.append(kfac.stage_seconds['forward_backward'])
    median = statistics.median
    sgd_time, kfac_time = median(sgd_times), median(kfac_times)
    stale_time = median(stale_times)
    stages = {name: median(v) for name, v in per_stage.items()}
    every = stages['factors'] + stages['inverse']
    amortized = kfac_time - every + every / args.interval
    inversion = bench_inversion(kfac, device)
    result = {
        'device': devices.describe(device), 'gpu': gpu,
        'batch': args.batch, 'size': args.size,
        'bn_fisher': args.bn_fisher, 'factor_dtype': args.factor_dtype,
        'inverse_method': method, 'interval': args.interval,
        'repeats': repeats, 'stages': stages,
        'gflop': flop_model(kfac, out_shapes, args.batch),
        'kfac_update': kfac_time, 'sgd_update': sgd_time,
        'stale_update': stale_time, 'stale_forward_backward': median(
            stale_fbs),
        'ratios': {'stale': stale_time / sgd_time,
                   'interval_1': kfac_time / sgd_time,
                   'amortized': amortized / sgd_time},
        'inversion': dict(inversion, ours=inversion['cholesky'] + (
            inversion['explicit_inverse'] if method == 'explicit'
            else 0.0)),
        'precondition': bench_precondition(kfac, device),
        'targets': {name: goal.get('gpu' if gpu else 'cpu')
                    for name, goal in TARGETS.items()},
    }
    if args.compare_factor_dtypes:
        result['factor_dtypes'] = bench_factor_dtypes(model, x, t, device,
                                                      args.bn_fisher)
    return result


def report(result):
    """Prints the figures of :func:`measure` against :data:`TARGETS`."""
    targets, stages = result['targets'], result['stages']
    print('ResNet-50, {} images of {}x{}, bn_fisher={}, factors {}, '
          'inverse method {}, device {}, median of {}'.format(
              result['batch'], result['size'], result['size'],
              result['bn_fisher'], result['factor_dtype'],
              result['inverse_method'], result['device'],
              result['repeats']))
    print('{:<18} {:>9} {:>10} {:>9}'.format('stage', 'seconds', 'GFLOP',
                                             'GFLOP/s'))
    for name in STAGES:
        sec, gf = stages.get(name, 0.0), result['gflop'][name] / 1e9
        print('{:<18} {:>9.4f} {:>10.1f} {:>9.1f}'.format(
            name, sec, gf, gf / sec if sec > 0 and gf > 0 else float('nan')))
    sgd_time = result['sgd_update']
    print('{:<18} {:>9.4f}'.format('KFAC update', result['kfac_update']))
    sgd_gf = result['gflop']['forward_backward'] / 1e9
    print('{:<18} {:>9.4f} {:>10.1f} {:>9.1f}'.format(
        'SGD update', sgd_time, sgd_gf, sgd_gf / sgd_time))
    stale_fb = result['stale_forward_backward']
    print('{:<18} {:>9.4f} (forward+backward {:.4f} s: {:.3f}x SGD '
          'update)'.format('KFAC stale update', result['stale_update'],
                           stale_fb, stale_fb / sgd_time))
    ratios = result['ratios']
    print('KFAC(stale) / SGD: {:.3f}'.format(ratios['stale']))
    print('KFAC(interval 1) / SGD: {:.3f} (target <= {})'.format(
        ratios['interval_1'], targets['interval_1']))
    print('KFAC(interval {}) / SGD: {:.3f} (target <= {}; factors and '
          'inversion every {}th step, from the stage times)'.format(
              result['interval'], ratios['amortized'], targets['amortized'],
              result['interval']))
    inversion = result['inversion']
    print('inversion of all factors: chainerkfac.inverse ({}) {:.3f} s '
          '(Cholesky {:.3f} s + explicit inverses {:.3f} s), linalg.inv '
          '{:.3f} s: {:.1f}x (target >= {}x)'.format(
              result['inverse_method'], inversion['ours'],
              inversion['cholesky'], inversion['explicit_inverse'],
              inversion['linalg_inv'],
              inversion['linalg_inv'] / inversion['ours'],
              targets['inversion_speedup']))
    precondition = result['precondition']
    print('preconditioning of all layers: triangular solves {:.4f} s, '
          'explicit inverse + GEMM {:.4f} s: {} is faster here'.format(
              precondition['solve'], precondition['explicit'],
              min(precondition, key=precondition.get)))
    dtypes = result.get('factor_dtypes')
    if dtypes is not None:
        goal = targets['factor_fp16_speedup']
        print('factor build: float32 {:.4f} s, float16 {:.4f} s: {:.2f}x '
              '(target >= {}); factors within {:.2e} of float32'.format(
                  dtypes['float32'], dtypes['float16'],
                  dtypes['float32'] / dtypes['float16'],
                  '{}x'.format(goal) if goal else 'none on CPU',
                  dtypes['max_rel_diff']))


def main(argv=None):
    parser, args = parse_args(argv)
    device = commands.use_device(parser, args.device)
    result = measure(args, device)
    report(result)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, sort_keys=True)
        print('wrote {}'.format(args.json))


if __name__ == '__main__':
    main()
