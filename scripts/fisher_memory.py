"""Memory held by the Fisher blocks of ResNet-50 (Figure 4 of the paper).

Builds ResNet-50 (1000 classes) with :class:`chainerkfac.optimizers.KFAC`,
runs one real update on a tiny random batch for each configuration
(BN Fisher full / diagonal × factor dtype float32 / float16) and reports the
bytes of the factor arrays the optimizer actually holds
(``layer.state[name]``), dense and as packed upper triangles
(N(N+1)/2 values per square factor; a diagonal BN Fisher stays 2C values),
split by layer type.  The paper's Figure 4: 1017 MiB (full BN Fisher) vs
587 MiB (diagonal BN Fisher), fp32.

Usage::

    python scripts/fisher_memory.py [--size 64] [--batch 2] [--n-class 1000]
        [--out result/fisher_memory.png]

and draws the bar chart of Figure 4 (every configuration, stacked by part)
to ``--out``.

The sizes of the factors do not depend on the input size or the batch.  The
default input is 64×64 rather than 32×32: at 32×32 the last stage is 1×1, so
with a batch of 2 its BatchNormalization normalizes 2 values per channel, its
Jacobian is zero up to rounding, and the gradients reaching the earlier layers
are rounding noise amplified by 1/σ (G entries ~1e15); the Cholesky inversions
then need many retries and one update takes minutes instead of ~10 s.  The
damping is Table 3's γ(0) = 2.5e-2 and ρ_BN = 16 (BS 4,096).
"""

import argparse
import collections
import time

import numpy

import chainerkfac  # NOQA: first: makes Chainer importable (compat)
import chainer
import chainer.functions as F

from chainerkfac import devices
from chainerkfac import layers as layers_module
from chainerkfac.distributed import packing
from chainerkfac.links import ResNet50
from chainerkfac.optimizers.kfac import KFAC
from chainerkfac import plotting


MIB = 2 ** 20
#: The parts of the Fisher blocks, in the order they are printed.
PARTS = ('conv_A', 'conv_G', 'fc', 'bn')
#: Configurations: (bn_fisher, factor_dtype).
CONFIGS = (('full', 'float32'), ('diagonal', 'float32'),
           ('full', 'float16'), ('diagonal', 'float16'))


def layer_kind(layer):
    """``'conv'``, ``'fc'`` or ``'bn'``."""
    if isinstance(layer, layers_module.Convolution2DLayer):
        return 'conv'
    if isinstance(layer, layers_module.LinearLayer):
        return 'fc'
    if isinstance(layer, layers_module.BatchNormalizationLayer):
        return 'bn'
    raise TypeError('unknown K-FAC layer {!r}'.format(layer))


def packed_nbytes(array):
    """Bytes of a factor kept as its upper triangle (a vector stays as is)."""
    if array is None:
        return 0
    return packing.packed_size(array.shape) * array.itemsize


def layer_counts(optimizer):
    """``{'conv': n, 'fc': n, 'bn': n, 'total': n}``: the K-FAC layers."""
    counts = collections.OrderedDict((k, 0) for k in ('conv', 'fc', 'bn'))
    for layer in optimizer.kfac_layers:
        counts[layer_kind(layer)] += 1
    counts['total'] = len(optimizer.kfac_layers)
    return counts


def fisher_memory(optimizer):
    """Bytes held by the factors in ``optimizer``'s live state.

    Returns:
        ``{'dense': {part: bytes, 'total': bytes},
        'packed': {part: bytes, 'total': bytes}, 'counts': {...},
        'dtypes': set of factor dtype names}`` with parts ``conv_A``,
        ``conv_G``, ``fc`` (A and G) and ``bn`` (F).  Factors not built yet
        count 0.
    """
    dense = collections.OrderedDict((p, 0) for p in PARTS)
    packed = collections.OrderedDict((p, 0) for p in PARTS)
    dtypes = set()
    for layer in optimizer.kfac_layers:
        kind = layer_kind(layer)
        for name in layer.factor_names:
            array = layer.state.get(name)
            part = 'conv_' + name if kind == 'conv' else kind
            if array is not None:
                dtypes.add(str(array.dtype))
                dense[part] += array.nbytes
                packed[part] += packed_nbytes(array)
    dense['total'] = sum(dense[p] for p in PARTS)
    packed['total'] = sum(packed[p] for p in PARTS)
    return {'dense': dense, 'packed': packed,
            'counts': layer_counts(optimizer), 'dtypes': dtypes}


def run_one_update(bn_fisher, factor_dtype, size=64, batch=2, n_class=1000,
                   seed=0, device=None):
    """ResNet-50 with a KFAC optimizer after one update on a random batch
    (on ``device``, default the CPU)."""
    device = device or chainer.get_device('@numpy')
    rng = numpy.random.RandomState(seed)
    numpy.random.seed(seed)  # HeNormal draws from NumPy's global generator
    model = ResNet50(n_class=n_class)
    model.to_device(device)
    optimizer = KFAC(lr=1e-3, damping=2.5e-2, bn_damping_ratio=16.0,
                     bn_fisher=bn_fisher, factor_dtype=factor_dtype)
    optimizer.setup(model)
    x = rng.standard_normal((batch, 3, size, size)).astype(numpy.float32)
    t = rng.randint(0, n_class, size=batch).astype(numpy.int32)
    x, t = device.send((x, t))

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)

    with chainer.using_config('train', True), \
            chainer.using_config('type_check', False):
        optimizer.update(lossfun, x, t)
    return optimizer


def _mib(nbytes):
    return nbytes / MIB


def format_table(results):
    """Lines of the table; ``results`` maps (bn_fisher, dtype) to measures."""
    header = '{:<17} {:>6} {:>9} {:>9} {:>8} {:>8} {:>10}'.format(
        'config', 'form', 'conv A', 'conv G', 'FC', 'BN', 'total')
    lines = [header, '-' * len(header)]
    for (bn_fisher, dtype), measure in results.items():
        for form in ('dense', 'packed'):
            m = measure[form]
            lines.append(
                '{:<17} {:>6} {:>9.1f} {:>9.1f} {:>8.1f} {:>8.1f} {:>10.1f}'
                .format('{}/{}'.format(bn_fisher, dtype), form,
                        *[_mib(m[p]) for p in PARTS + ('total',)]))
    return lines


def plot_bars(results, path):
    """Figure 4 as stacked bars (MiB per part), one bar per configuration
    and form; the paper's pair (fp32 dense, full vs diagonal) comes first."""
    pyplot = plotting.pyplot()

    bars = [('{}\n{}\n{}'.format(
        'no approx' if bn == 'full' else 'diagonal FIM', dtype, form),
        measure[form]) for form in ('dense', 'packed')
        for (bn, dtype), measure in results.items()]
    fig, ax = pyplot.subplots(figsize=(10, 4.5))
    x = numpy.arange(len(bars))
    bottom = numpy.zeros(len(bars))
    for part in PARTS:
        heights = numpy.array([_mib(m[part]) for _, m in bars])
        ax.bar(x, heights, bottom=bottom, label=part.replace('_', ' '))
        bottom += heights
    for i, total in enumerate(bottom):
        ax.text(i, total, '{:.0f}'.format(total), ha='center',
                va='bottom', fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([label for label, _ in bars], fontsize=7)
    ax.set_ylabel('MiB per process')
    ax.set_title('Fisher blocks of ResNet-50 (Figure 4: 1017 vs 587 MiB, '
                 'fp32 dense)', fontsize=10)
    ax.legend(fontsize=8)
    plotting.save_figure(fig, path)


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
    try:
        device = devices.get_device(args.device)
    except devices.DeviceError as e:
        parser.error('--device: {}'.format(e))
    device.use()

    results = collections.OrderedDict()
    counts = None
    for bn_fisher, dtype in CONFIGS:
        start = time.time()
        optimizer = run_one_update(bn_fisher, dtype, args.size, args.batch,
                                   args.n_class, device=device)
        measure = fisher_memory(optimizer)
        measure['seconds'] = time.time() - start
        results[(bn_fisher, dtype)] = measure
        counts = measure['counts']
        del optimizer

    print('ResNet-50 K-FAC layers: {total} ({conv} conv, {fc} FC, {bn} BN); '
          'input {s}x{s}, batch {b}, {c} classes'.format(
              s=args.size, b=args.batch, c=args.n_class, **counts))
    print('Fisher blocks held by the optimizer after one update (MiB):')
    for line in format_table(results):
        print(line)
    for (bn_fisher, dtype), measure in results.items():
        print('{}/{}: factor dtypes {}, one update {:.1f} s'.format(
            bn_fisher, dtype, ','.join(sorted(measure['dtypes'])),
            measure['seconds']))
    full = _mib(results[('full', 'float32')]['dense']['total'])
    diagonal = _mib(results[('diagonal', 'float32')]['dense']['total'])
    print('figure4: full {:.1f} MiB, diagonal {:.1f} MiB'.format(
        full, diagonal))
    plot_bars(results, args.out)


if __name__ == '__main__':
    main()
