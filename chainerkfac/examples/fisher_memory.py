"""Memory held by the Fisher blocks of ResNet-50 (Figure 4 of the paper).

ResNet-50 (1000 classes) with :class:`chainerkfac.optimizers.KFAC` after
one real update on a tiny random batch (:func:`run_one_update`), for each
configuration (BN Fisher full / diagonal / unit-wise × factor dtype float32
/ float16):
the bytes of the factor arrays the optimizer holds, dense and as packed
upper triangles (N(N+1)/2 values per square factor; a diagonal BN Fisher
stays 2C values, a unit-wise one 3C: the distinct entries of its 2 × 2
blocks), split by layer type (:func:`fisher_memory`).  The paper's
Figure 4: 1017 MiB (full BN Fisher) vs 587 MiB (diagonal BN Fisher), fp32.
``scripts/fisher_memory.py`` prints the table and draws the bars.

The sizes of the factors do not depend on the input size or the batch.  The
default input is 64×64 rather than 32×32: at 32×32 the last stage is 1×1, so
with a batch of 2 its BatchNormalization normalizes 2 values per channel, its
Jacobian is zero up to rounding, and the gradients reaching the earlier layers
are rounding noise amplified by 1/σ (G entries ~1e15); the Cholesky inversions
then need many retries and one update takes minutes instead of ~10 s.  The
damping is Table 3's γ(0) = 2.5e-2 and ρ_BN = 16 (BS 4,096).
"""

import collections
import typing

import numpy

import chainer
import chainer.functions as F

from chainerkfac import layers as layers_module
from chainerkfac.links import ResNet50
from chainerkfac.optimizers.kfac import KFAC
from chainerkfac import plotting


MIB = 2 ** 20
#: The parts of the Fisher blocks, in the order they are printed.
PARTS = ('conv_A', 'conv_G', 'fc', 'bn')
#: Configurations: (bn_fisher, factor_dtype).
CONFIGS = (('full', 'float32'), ('diagonal', 'float32'), ('unit', 'float32'),
           ('full', 'float16'), ('diagonal', 'float16'), ('unit', 'float16'))
#: How the bars name each BN Fisher.
BN_LABELS = {'full': 'no approx', 'diagonal': 'diagonal FIM',
             'unit': 'unit-wise FIM'}


KINDS = ((layers_module.Convolution2DLayer, 'conv'),
         (layers_module.LinearLayer, 'fc'),
         (layers_module.BatchNormalizationLayer, 'bn'))


def layer_kind(layer: typing.Any) -> str:
    """``'conv'``, ``'fc'`` or ``'bn'``."""
    for layer_type, kind in KINDS:
        if isinstance(layer, layer_type):
            return kind
    raise TypeError('unknown K-FAC layer {!r}'.format(layer))


def layer_counts(optimizer: KFAC) -> typing.Dict[str, int]:
    """``{'conv': n, 'fc': n, 'bn': n, 'total': n}``: the K-FAC layers."""
    counts = collections.OrderedDict((k, 0) for k in ('conv', 'fc', 'bn'))
    for layer in optimizer.kfac_layers:
        counts[layer_kind(layer)] += 1
    counts['total'] = len(optimizer.kfac_layers)
    return counts


def fisher_memory(optimizer: KFAC) -> dict:
    """Bytes held by the factors in ``optimizer``'s live state, by part
    (:meth:`KFAC.factor_nbytes <chainerkfac.optimizers.KFAC.factor_nbytes>`).

    Returns:
        ``{'dense': {part: bytes, 'total': bytes},
        'packed': {part: bytes, 'total': bytes}, 'counts': {...},
        'dtypes': set of factor dtype names}`` with parts ``conv_A``,
        ``conv_G``, ``fc`` (A and G) and ``bn`` (F).  Factors not built yet
        count 0.
    """
    out = {'counts': layer_counts(optimizer), 'dtypes': set(
        str(layer.state[name].dtype) for layer in optimizer.kfac_layers
        for name in layer.factor_names if layer.state.get(name) is not None)}
    kinds = {layer.name: layer_kind(layer)
             for layer in optimizer.kfac_layers}
    for form in ('dense', 'packed'):
        parts = collections.OrderedDict((p, 0) for p in PARTS)
        sizes = optimizer.factor_nbytes(packed=form == 'packed',
                                        by_layer=True)
        for layer, factors in sizes.items():
            kind = kinds[layer]
            for name, nbytes in factors.items():
                parts['conv_' + name if kind == 'conv' else kind] += nbytes
        parts['total'] = sum(parts[p] for p in PARTS)
        out[form] = parts
    return out


def run_one_update(bn_fisher: str, factor_dtype: str, size: int = 64,
                   batch: int = 2, n_class: int = 1000, seed: int = 0,
                   device: typing.Any = None) -> KFAC:
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


def format_table(results: dict) -> typing.List[str]:
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


def plot_bars(results: dict, path: str) -> typing.Any:
    """Figure 4 as stacked bars (MiB per part), one bar per configuration
    and form; the paper's pair (fp32 dense, full vs diagonal) comes first."""
    pyplot = plotting.pyplot()

    bars = [('{}\n{}\n{}'.format(
        BN_LABELS[bn], dtype, form),
        measure[form]) for form in ('dense', 'packed')
        for (bn, dtype), measure in results.items()]
    fig, ax = pyplot.subplots(figsize=(13, 4.5))
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
    ax.set_xlabel('BN Fisher, factor dtype, storage (dense: full '
                  'matrices; packed: upper triangles)')
    ax.set_ylabel('memory of the Fisher blocks (MiB per process)')
    ax.set_title('Fisher blocks of ResNet-50 (Figure 4: 1017 vs 587 MiB, '
                 'fp32 dense)', fontsize=10)
    ax.legend(fontsize=8, title='part')
    plotting.save_figure(fig, path)
    return fig
