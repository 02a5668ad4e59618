"""ResNet-50: architecture, K-FAC factor shapes and Figure 4's memory.

The expected layers are written out here from He et al. 2016 (Table 1,
50-layer column), independently of ``chainerkfac.links.model.resnet50``.
The K-FAC update runs on 2 images of 64×64: at 32×32 the last stage is 1×1
and its BatchNormalization over 2 values gives gradients that are rounding
noise (see ``chainerkfac.examples.fisher_memory``), which makes the update
slow; the factor shapes do not depend on the input size.
"""

import numpy
import pytest

import chainer
import chainer.links as L

from chainerkfac.examples import fisher_memory as fisher_memory_lib
from chainerkfac.links import ResNet50


N_CLASS = 1000
MIB = 2 ** 20

# conv1 7×7/2 (3 -> 64), then per stage: (name, blocks, C_in of the stage,
# bottleneck width, C_out = 4·width).
STEM = ('/conv1', '/bn1', 3, 64, 7)
STAGES = (
    ('res2', 3, 64, 64, 256),
    ('res3', 4, 256, 128, 512),
    ('res4', 6, 512, 256, 1024),
    ('res5', 3, 1024, 512, 2048),
)
FC = ('/fc', 2048, N_CLASS)


def expected_layers():
    """``{conv name: (C_in, C_out, k)}``, ``{bn name: C}`` of ResNet-50."""
    convs = {STEM[0]: (STEM[2], STEM[3], STEM[4])}
    bns = {STEM[1]: STEM[3]}
    for stage, blocks, c_in, width, c_out in STAGES:
        for b in range(blocks):
            prefix = '/{}/{}/'.format(stage, b)
            block_in = c_in if b == 0 else c_out
            convs[prefix + 'conv1'] = (block_in, width, 1)
            convs[prefix + 'conv2'] = (width, width, 3)
            convs[prefix + 'conv3'] = (width, c_out, 1)
            bns[prefix + 'bn1'] = width
            bns[prefix + 'bn2'] = width
            bns[prefix + 'bn3'] = c_out
            if b == 0:
                convs[prefix + 'conv4'] = (c_in, c_out, 1)
                bns[prefix + 'bn4'] = c_out
    return convs, bns


def expected_shapes(bn_fisher):
    """``{layer name: {factor name: shape}}``."""
    convs, bns = expected_layers()
    shapes = {}
    for name, (c_in, c_out, k) in convs.items():
        shapes[name] = {'A': (c_in * k * k,) * 2, 'G': (c_out,) * 2}
    for name, c in bns.items():
        shapes[name] = {'F': {'full': (2 * c,) * 2, 'diagonal': (2 * c,),
                              'unit': (3 * c,)}[bn_fisher]}
    name, d_in, d_out = FC
    shapes[name] = {'A': (d_in + 1,) * 2, 'G': (d_out,) * 2}
    return shapes


@pytest.fixture(scope='module')
def fisher_memory_module():
    return fisher_memory_lib


_RUNS = {}


@pytest.fixture(scope='module')
def run(fisher_memory_module):
    """``run(bn_fisher, dtype)``: the optimizer after one update (cached)."""
    def get(bn_fisher, dtype):
        key = (bn_fisher, dtype)
        if key not in _RUNS:
            _RUNS[key] = fisher_memory_module.run_one_update(
                bn_fisher, dtype, size=64, batch=2, n_class=N_CLASS)
        return _RUNS[key]
    yield get
    _RUNS.clear()


def test_expected_layer_list():
    convs, bns = expected_layers()
    assert len(convs) == 53 and len(bns) == 53
    # 1 (stem) + 3·16 (bottlenecks) + 1 (FC) weighted layers = 50.
    assert 1 + 3 * sum(s[1] for s in STAGES) + 1 == 50


def test_layer_counts_and_init():
    model = ResNet50(n_class=N_CLASS)
    links = dict(model.namedlinks(skipself=True))
    convs = {n: l for n, l in links.items()
             if isinstance(l, L.Convolution2D)}
    bns = {n: l for n, l in links.items()
           if isinstance(l, L.BatchNormalization)}
    fcs = {n: l for n, l in links.items() if isinstance(l, L.Linear)}
    exp_convs, exp_bns = expected_layers()
    assert len(convs) == 53 and len(bns) == 53 and len(fcs) == 1
    assert set(convs) == set(exp_convs)
    assert set(bns) == set(exp_bns)
    for name, conv in convs.items():
        c_in, c_out, k = exp_convs[name]
        assert conv.b is None, name
        assert conv.W.shape == (c_out, c_in, k, k), name
        assert isinstance(conv.W.initializer,
                          chainer.initializers.HeNormal), name
    for name, bn in bns.items():
        assert bn.gamma.shape == (exp_bns[name],), name
    fc = fcs['/fc']
    assert fc.W.shape == (N_CLASS, 2048)
    assert fc.b is not None and fc.b.shape == (N_CLASS,)
    assert isinstance(fc.W.initializer, chainer.initializers.HeNormal)
    # Strides: v1 puts them on the first 1×1 conv and on the projection.
    assert convs['/conv1'].stride == (2, 2) and convs['/conv1'].pad == (3, 3)
    for stage, stride in (('res2', 1), ('res3', 2), ('res4', 2),
                          ('res5', 2)):
        prefix = '/{}/0/'.format(stage)
        assert convs[prefix + 'conv1'].stride == (stride, stride)
        assert convs[prefix + 'conv4'].stride == (stride, stride)
        assert convs[prefix + 'conv2'].stride == (1, 1)
        assert convs[prefix + 'conv2'].pad == (1, 1)


@pytest.mark.parametrize('size', [32, 64])
def test_forward_shape(size):
    model = ResNet50(n_class=10)
    x = numpy.random.RandomState(0).standard_normal(
        (2, 3, size, size)).astype(numpy.float32)
    with chainer.using_config('train', False), \
            chainer.using_config('enable_backprop', False):
        y = model(x)
    assert y.shape == (2, 10)
    assert numpy.isfinite(y.array).all()


@pytest.mark.parametrize('bn_fisher', ['full', 'diagonal'])
@pytest.mark.slow
def test_factor_shapes_after_one_update(run, bn_fisher):
    optimizer = run(bn_fisher, 'float32')
    shapes = expected_shapes(bn_fisher)
    layers = {layer.name: layer for layer in optimizer.kfac_layers}
    assert len(layers) == 107
    assert set(layers) == set(shapes)
    for name, layer in layers.items():
        assert set(layer.factor_names) == set(shapes[name]), name
        for factor, shape in shapes[name].items():
            array = layer.state[factor]
            assert array.shape == shape, (name, factor)
            assert array.dtype == numpy.float32, (name, factor)
            assert numpy.isfinite(array).all(), (name, factor)


def _expected_bytes(bn_fisher, itemsize):
    return sum(int(numpy.prod(shape)) * itemsize
               for factors in expected_shapes(bn_fisher).values()
               for shape in factors.values())


@pytest.mark.slow
def test_figure4_memory(run, fisher_memory_module):
    measure = {key: fisher_memory_module.fisher_memory(run(*key))
               for key in [('full', 'float32'), ('diagonal', 'float32'),
                           ('unit', 'float32'), ('full', 'float16')]}
    full = measure[('full', 'float32')]
    diag = measure[('diagonal', 'float32')]
    assert full['counts'] == {'conv': 53, 'fc': 1, 'bn': 53, 'total': 107}
    # Figure 4: 1017 MiB (no approximation) -> 587 MiB (diagonal BN Fisher).
    assert round(full['dense']['total'] / MIB, 1) == 1017.3
    assert round(diag['dense']['total'] / MIB, 1) == 587.1
    assert full['dense']['total'] == _expected_bytes('full', 4)
    assert diag['dense']['total'] == _expected_bytes('diagonal', 4)
    # unit-wise: 3 values per channel (F_γγ, F_γβ, F_ββ), dense = packed
    unit = measure[('unit', 'float32')]
    assert unit['dense']['total'] == _expected_bytes('unit', 4)
    assert unit['dense']['bn'] == diag['dense']['bn'] * 3 // 2
    assert unit['packed']['bn'] == unit['dense']['bn']
    # Only the BN part differs between the two.
    for part in ('conv_A', 'conv_G', 'fc'):
        assert full['dense'][part] == diag['dense'][part]
    assert diag['dense']['bn'] == 4 * 2 * (64 + sum(
        (w + w + 4 * w) * n + 4 * w for _, n, _, w, _ in STAGES))
    # Packed upper triangles: N(N+1)/2 per square factor.
    assert full['packed']['total'] == sum(
        shape[0] * (shape[0] + 1) // 2 * 4
        for factors in expected_shapes('full').values()
        for shape in factors.values())
    # Half precision: exactly half of single precision, dense and packed
    # (every part, the BN Fisher included; the diagonal run only drops BN).
    m32, m16 = full, measure[('full', 'float16')]
    assert m16['dtypes'] == {'float16'}
    assert m32['dtypes'] == {'float32'}
    for form in ('dense', 'packed'):
        for part, nbytes in m32[form].items():
            assert 2 * m16[form][part] == nbytes, (form, part)


def test_width_scales_every_channel_count():
    """``width=1/8``: the same 107 layers, every channel count divided by 8
    (the table above scaled), and the paper's 25,557,032 parameters at 1."""
    assert sum(p.size for p in ResNet50(N_CLASS).params()) == 25557032
    model = ResNet50(n_class=4, width=1 / 8.)
    convs, bns = expected_layers()
    links = dict(model.namedlinks())
    for name, (c_in, c_out, k) in convs.items():
        c_in = 3 if name == STEM[0] else c_in // 8
        assert links[name].W.shape == (c_out // 8, c_in, k, k), name
    for name, c in bns.items():
        assert links[name].gamma.shape == (c // 8,), name
    assert model.fc.W.shape == (4, 2048 // 8)
    with pytest.raises(ValueError):
        ResNet50(width=0)
