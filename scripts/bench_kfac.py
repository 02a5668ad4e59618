#!/usr/bin/env python
"""Cost of a K-FAC update of ResNet-50 against MomentumSGD, stage by stage.

Runs real updates (default: 32 images of 224×224, the paper's per-process
batch) and prints per stage the wall time, the FLOP count of our model and the
achieved GFLOP/s, then the ratios KFAC/SGD at refresh interval 1 and amortized
over the paper's steady interval 20, and the inversion stage of all factors
with ``chainerkfac.inverse`` (Cholesky) against ``numpy.linalg.inv``.

FLOP model (multiply-add = 2 flops): forward = Σ 2·n·T·C_out·C_in·k² over
convolutions and the FC, forward+backward = 3× forward; factor build = Σ d²·m
per factor (one triangle of the symmetric product, syrk); inversion = Σ d³/3
(potrf; the explicit inverse would add potri's 2d³/3); preconditioning =
Σ 2·(d_G²·d_A + d_G·d_A²) (two pairs of triangular solves).
"""

import argparse
import time

import numpy

import chainer
import chainer.functions as F

from chainerkfac import inverse
from chainerkfac import layers
from chainerkfac.links import ResNet50
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
        if isinstance(layer, layers.KroneckerLayer):
            d_a, d_g = shapes['A'][0], shapes['G'][0]
            out = out_shapes[layer.link]
            positions = int(numpy.prod(out[2:])) if len(out) > 2 else 1
            m = n * positions
            w = layer.link.W
            forward += 2.0 * m * w.size
            build += (d_a * d_a + d_g * d_g) * float(m)
            invert += (d_a ** 3 + d_g ** 3) / 3.0
            precondition += 2.0 * (d_g * d_g * d_a + d_g * d_a * d_a)
        else:
            d = shapes['F'][0]
            build += 2.0 * n * d
            if len(shapes['F']) == 2:
                invert += d ** 3 / 3.0
                precondition += 2.0 * d * d
            else:
                precondition += d
    return {'forward_backward': 3 * forward, 'factors': build,
            'inverse': invert, 'precondition': precondition, 'update': 0.0}


def run_update(optimizer, model, x, t):
    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)
    start = time.perf_counter()
    optimizer.update(lossfun, x, t)
    return time.perf_counter() - start


def bench_inversion(optimizer):
    """Seconds to invert every damped factor: ours vs numpy.linalg.inv."""
    mats = [layer.factor(name) for layer in optimizer.kfac_layers
            for name in layer.factor_names
            if len(layer.factor_shapes()[name]) == 2]
    damping = optimizer.damping
    start = time.perf_counter()
    for m in mats:
        inverse.cholesky(m, damping)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    eye = {}
    for m in mats:
        d = m.shape[0]
        if d not in eye:
            eye[d] = numpy.eye(d, dtype=m.dtype)
        numpy.linalg.inv(m + damping * eye[d])
    plain = time.perf_counter() - start
    flops = sum(m.shape[0] ** 3 for m in mats)
    return ours, plain, flops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--n-class', type=int, default=1000)
    parser.add_argument('--bn-fisher', default='diagonal',
                        choices=('diagonal', 'full'))
    parser.add_argument('--factor-dtype', default='float32',
                        choices=('float32', 'float16'))
    parser.add_argument('--interval', type=int, default=20,
                        help='steady refresh interval to amortize over')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    rng = numpy.random.RandomState(args.seed)
    x = rng.rand(args.batch, 3, args.size, args.size).astype(numpy.float32)
    t = rng.randint(0, args.n_class, args.batch).astype(numpy.int32)
    numpy.random.seed(args.seed)
    model = ResNet50(args.n_class)
    recorder = ShapeRecorder()
    with recorder, chainer.no_backprop_mode():
        model(x[:1])
    out_shapes = recorder.shapes

    sgd_model = model.copy(mode='copy')
    sgd = chainer.optimizers.MomentumSGD(lr=0.1).setup(sgd_model)
    kfac = KFAC(lr=0.01, damping=1e-3, bn_fisher=args.bn_fisher,
                factor_dtype=args.factor_dtype).setup(model)

    # warm up both code paths on a tiny input
    run_update(sgd, sgd_model, x[:2, :, :32, :32], t[:2])
    run_update(kfac, model, x[:2, :, :32, :32], t[:2])
    kfac.stage_seconds.clear()

    sgd_time = run_update(sgd, sgd_model, x, t)
    kfac_time = run_update(kfac, model, x, t)
    stages = dict(kfac.stage_seconds)
    flops = flop_model(kfac, out_shapes, args.batch)
    # a stale step: no factor due, so no hooks; only preconditioning
    kfac.a_interval = kfac.g_interval = 10 ** 9
    kfac.stage_seconds.clear()
    stale_time = run_update(kfac, model, x, t)
    stale_fb = kfac.stage_seconds['forward_backward']

    print('ResNet-50, {} images of {}x{}, bn_fisher={}, factors {}'.format(
        args.batch, args.size, args.size, args.bn_fisher, args.factor_dtype))
    print('{:<18} {:>9} {:>10} {:>9}'.format('stage', 'seconds', 'GFLOP',
                                             'GFLOP/s'))
    for name in STAGES:
        sec, gf = stages.get(name, 0.0), flops[name] / 1e9
        print('{:<18} {:>9.3f} {:>10.1f} {:>9.1f}'.format(
            name, sec, gf, gf / sec if sec > 0 and gf > 0 else float('nan')))
    print('{:<18} {:>9.3f}'.format('KFAC update', kfac_time))
    sgd_gf = flops['forward_backward'] / 1e9
    print('{:<18} {:>9.3f} {:>10.1f} {:>9.1f}'.format(
        'SGD update', sgd_time, sgd_gf, sgd_gf / sgd_time))

    print('{:<18} {:>9.3f} (forward+backward {:.3f} s: {:.3f}x SGD '
          'update)'.format('KFAC stale update', stale_time, stale_fb,
                           stale_fb / sgd_time))
    every = stages['factors'] + stages['inverse']
    amortized = kfac_time - every + every / args.interval
    print('KFAC(stale) / SGD: {:.3f}'.format(stale_time / sgd_time))
    print('KFAC(interval 1) / SGD: {:.3f} (target <= 1.8)'.format(
        kfac_time / sgd_time))
    print('KFAC(interval {}) / SGD: {:.3f} (target <= 1.12; factors and '
          'inversion every {}th step, from the stage times)'.format(
              args.interval, amortized / sgd_time, args.interval))

    ours, plain, inv_flops = bench_inversion(kfac)
    print('inversion of all factors: chainerkfac.inverse (potrf) {:.2f} s, '
          'numpy.linalg.inv {:.2f} s: {:.1f}x (target >= 5x; numpy does '
          '{:.0f} GFLOP at {:.1f} GFLOP/s)'.format(
              ours, plain, plain / ours, inv_flops / 1e9,
              inv_flops / 1e9 / plain))


if __name__ == '__main__':
    main()
