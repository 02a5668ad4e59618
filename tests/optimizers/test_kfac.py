"""KFAC behaviour beyond the reference step: precision, robustness,
accumulation, snapshots, errors and Chainer integration."""

import copy
import warnings

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import training
from chainer.training import extensions

import chainerkfac
from chainerkfac import inverse
from chainerkfac.optimizers import KFAC


class ConvNet(chainer.Chain):
    """conv(bias) -> [BN] -> relu -> conv/2 -> relu -> linear."""

    def __init__(self, bn=True, dtype=numpy.float32):
        super(ConvNet, self).__init__()
        self.bn = bn
        w = chainer.initializers.HeNormal(dtype=dtype)
        b = chainer.initializers.Normal(0.1, dtype=dtype)
        with self.init_scope():
            self.conv1 = L.Convolution2D(2, 4, 3, pad=1, initialW=w,
                                         initial_bias=b)
            if bn:
                self.bn1 = L.BatchNormalization(4, dtype=dtype)
            self.conv2 = L.Convolution2D(4, 6, 3, stride=2, nobias=True,
                                         initialW=w)
            self.fc = L.Linear(6 * 2 * 2, 3, initialW=w, initial_bias=b)

    def forward(self, x):
        h = self.conv1(x)
        if self.bn:
            h = self.bn1(h)
        h = F.relu(h)
        return self.fc(F.relu(self.conv2(h)))


def make_model(seed=0, **kwargs):
    numpy.random.seed(seed)
    return ConvNet(**kwargs)


def batch(step, n=8, dtype=numpy.float32):
    rng = numpy.random.RandomState(100 + step)
    x = rng.randn(n, 2, 6, 6).astype(dtype)
    t = rng.randint(0, 3, n).astype(numpy.int32)
    return x, t


def loss_of(model, scale=1.0, reduce='mean'):
    def lossfun(x, t):
        return scale * F.softmax_cross_entropy(model(x), t, reduce=reduce) \
            if reduce == 'mean' else \
            scale * F.sum(F.softmax_cross_entropy(model(x), t, reduce='no'))
    return lossfun


def params_of(model):
    return {name: p.array.copy() for name, p in model.namedparams()}


def assert_params_close(a, b, rtol):
    assert a.keys() == b.keys()
    for name in a:
        numpy.testing.assert_allclose(a[name], b[name], rtol=rtol,
                                      atol=rtol * 1e-3, err_msg=name)


# -- inverse ---------------------------------------------------------------
def random_spd(n, seed=0, dtype=numpy.float64):
    rng = numpy.random.RandomState(seed)
    x = rng.randn(n, 2 * n)
    return (x.dot(x.T) / (2 * n)).astype(dtype)


@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
def test_inverse_matches_numpy_and_is_symmetric(dtype):
    m = random_spd(7, dtype=dtype)
    inv = inverse.inverse(m, damping=0.1)
    expected = numpy.linalg.inv(m.astype(numpy.float64) + 0.1 * numpy.eye(7))
    assert inv.dtype == dtype
    numpy.testing.assert_array_equal(inv, inv.T)
    rtol = 1e-4 if dtype == numpy.float32 else 1e-12
    numpy.testing.assert_allclose(inv, expected, rtol=rtol, atol=rtol)


def test_inverse_of_float16_is_float32():
    m = random_spd(5).astype(numpy.float16)
    inv = inverse.inverse(m, damping=0.01)
    assert inv.dtype == numpy.float32
    expected = numpy.linalg.inv(m.astype(numpy.float64) + 0.01 * numpy.eye(5))
    numpy.testing.assert_allclose(inv, expected, rtol=1e-4)


def test_inverse_retries_non_positive_definite_with_more_damping():
    m = numpy.diag([1.0, 2.0, -0.5])
    inverse._warned[0] = False
    with pytest.warns(RuntimeWarning, match='not positive definite'):
        inv = inverse.inverse(m, damping=1e-3)
    assert numpy.isfinite(inv).all()
    # the retried damping d made m + dI positive definite: inv = 1/(m + d)
    d = 1 / inv[2, 2] + 0.5
    assert d > 0.5
    numpy.testing.assert_allclose(numpy.diag(inv), 1 / (numpy.diag(m) + d))


def test_inverse_rejects_non_finite():
    m = random_spd(3)
    m[0, 1] = numpy.nan
    with pytest.raises(FloatingPointError, match='non-finite'):
        inverse.inverse(m, damping=1.0)


def test_non_positive_definite_factors_give_finite_update():
    # 2 samples, 30 inputs: A is singular and damping negligible (1e-30)
    numpy.random.seed(0)
    model = L.Linear(30, 40)
    opt = KFAC(lr=0.1, damping=1e-30).setup(model)
    rng = numpy.random.RandomState(0)
    x = rng.randn(2, 30).astype(numpy.float32)
    t = numpy.array([1, 3], numpy.int32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        for _ in range(3):
            opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    assert numpy.isfinite(model.W.array).all()
    assert numpy.isfinite(model.b.array).all()


# -- float16 factors ---------------------------------------------------------
def one_update_factors(factor_dtype, scale=1.0, bn_fisher='full'):
    model = make_model()
    opt = KFAC(lr=0.01, factor_dtype=factor_dtype, bn_fisher=bn_fisher)
    opt.setup(model)
    opt.update(loss_of(model, scale), *batch(0))
    return {(layer.name, name): (layer.state[name], layer.factor(name))
            for layer in opt.kfac_layers for name in layer.factor_names}


@pytest.mark.parametrize('bn_fisher', ['full', 'diagonal'])
@pytest.mark.parametrize('scale', [1.0, 1e4])
def test_float16_factors_close_to_float32_and_finite(bn_fisher, scale):
    f32 = one_update_factors('float32', scale, bn_fisher)
    f16 = one_update_factors('float16', scale, bn_fisher)
    assert f32.keys() == f16.keys()
    for key in f32:
        stored16, dense16 = f16[key]
        _, dense32 = f32[key]
        assert stored16.dtype == numpy.float16, key
        assert numpy.isfinite(stored16).all(), key
        err = numpy.linalg.norm(dense16 - dense32) / numpy.linalg.norm(dense32)
        assert err <= 1e-2, (key, err)
    if scale > 1:
        # the G factors really are beyond float16's range
        g_max = max(float(numpy.abs(f32[k][1]).max())
                    for k in f32 if k[1] == 'G')
        assert g_max > float(numpy.finfo(numpy.float16).max)


def test_float16_training_stays_finite_with_huge_gradients():
    model = make_model()
    opt = KFAC(lr=1e-6, factor_dtype='float16').setup(model)
    for step in range(3):
        opt.update(loss_of(model, 1e4), *batch(step))
    for name, p in model.namedparams():
        assert numpy.isfinite(p.array).all(), name


# -- accumulation ------------------------------------------------------------
@pytest.mark.parametrize('reduce', ['mean', 'sum'])
def test_accumulation_equals_large_batch(reduce):
    k, b = 3, 4
    hp = dict(lr=0.05, momentum=0.9, damping=1e-2, weight_rescaling=True,
              loss_reduction=reduce)
    small = make_model(bn=False, dtype=numpy.float64)
    large = copy.deepcopy(small)
    opt_small = KFAC(accumulation_steps=k, **hp).setup(small)
    opt_large = KFAC(**hp).setup(large)
    for step in range(3):
        x, t = batch(step, n=k * b, dtype=numpy.float64)
        for i in range(k):
            before = params_of(small)
            opt_small.update(loss_of(small, reduce=reduce),
                             x[i * b:(i + 1) * b], t[i * b:(i + 1) * b])
            if i < k - 1:  # no step before the k-th call
                assert_params_close(params_of(small), before, rtol=0)
        opt_large.update(loss_of(large, reduce=reduce), x, t)
        assert opt_small.t == opt_large.t == step + 1
        assert_params_close(params_of(small), params_of(large), rtol=1e-10)


# -- snapshots ---------------------------------------------------------------
def run_updates(model, opt, steps):
    for step in steps:
        opt.damping = 1e-2 / (1 + step)  # stale inverses keep an older γ
        opt.update(loss_of(model), *batch(step))


def kfac_for_resume():
    return KFAC(lr=0.05, momentum=0.9, damping=1e-2, a_interval=3,
                g_interval=2, weight_rescaling=True, bn_fisher='full')


def test_snapshot_resume_equals_uninterrupted(tmp_path):
    straight = make_model()
    opt = kfac_for_resume().setup(straight)
    run_updates(straight, opt, range(10))

    first = make_model()
    opt1 = kfac_for_resume().setup(first)
    run_updates(first, opt1, range(5))
    chainer.serializers.save_npz(str(tmp_path / 'model.npz'), first)
    chainer.serializers.save_npz(str(tmp_path / 'opt.npz'), opt1)

    resumed = make_model(seed=123)  # different initial weights
    opt2 = kfac_for_resume().setup(resumed)
    chainer.serializers.load_npz(str(tmp_path / 'model.npz'), resumed)
    chainer.serializers.load_npz(str(tmp_path / 'opt.npz'), opt2)
    assert opt2.t == 5
    run_updates(resumed, opt2, range(5, 10))
    assert_params_close(params_of(resumed), params_of(straight), rtol=1e-6)
    for a, b in zip(opt.kfac_layers, opt2.kfac_layers):
        for key in a.state_keys():
            numpy.testing.assert_allclose(a.state[key], b.state[key],
                                          rtol=1e-6, err_msg=key)


def test_snapshot_has_no_pickled_objects(tmp_path):
    model = make_model()
    opt = kfac_for_resume().setup(model)
    chainer.serializers.save_npz(str(tmp_path / 'opt.npz'), opt)  # unbuilt
    run_updates(model, opt, range(1))
    chainer.serializers.save_npz(str(tmp_path / 'opt1.npz'), opt)
    for name in ('opt.npz', 'opt1.npz'):
        with numpy.load(str(tmp_path / name), allow_pickle=False) as npz:
            assert any(k.startswith('kfac/') for k in npz.files)
            for key in npz.files:
                assert npz[key].dtype != object


# -- stale factors -----------------------------------------------------------
def test_stale_steps_build_nothing_and_reuse_inverses():
    model = make_model()
    opt = KFAC(lr=0.01, a_interval=3, g_interval=3).setup(model)
    calls = []
    for layer in opt.kfac_layers:
        build = layer.build

        def counting(*args, _build=build, _name=layer.name):
            calls.append(_name)
            return _build(*args)
        layer.build = counting
    snapshots = []
    for step in range(4):
        calls.clear()
        opt.damping = 1e-3 * (step + 1)
        opt.update(loss_of(model), *batch(step))
        snapshots.append({(layer.name, k): layer.state[k + '_inv'].copy()
                          for layer in opt.kfac_layers
                          for k in layer.factor_names})
        expected = len(opt.kfac_layers) if step % 3 == 0 else 0
        assert len(calls) == expected, step
    for key in snapshots[0]:
        numpy.testing.assert_array_equal(snapshots[1][key], snapshots[0][key])
        numpy.testing.assert_array_equal(snapshots[2][key], snapshots[0][key])
        assert not numpy.array_equal(snapshots[3][key], snapshots[0][key])


# -- errors ------------------------------------------------------------------
def test_update_without_a_pass_is_a_momentum_step():
    """Chainer's meaning of update() with no gradient: a zero gradient,
    so eq. 17 moves the weights by m·(w(t) − w(t−1)) only."""
    model = make_model()
    opt = KFAC(lr=0.05, momentum=0.9).setup(model)
    opt.update(loss_of(model), *batch(0))
    before = {n: p.array.copy() for n, p in model.namedparams()}
    prev = {n: p.update_rule.state['w_prev'].copy()
            for n, p in model.namedparams()}
    model.cleargrads()
    opt.update()
    assert opt.t == 2
    for name, p in model.namedparams():
        numpy.testing.assert_allclose(
            p.array, before[name] + 0.9 * (before[name] - prev[name]),
            rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize('kwargs,match', [
    (dict(bn_fisher='block'), 'bn_fisher'),
    (dict(factor_dtype='bfloat16'), 'factor_dtype'),
    (dict(loss_reduction='none'), 'loss_reduction'),
    (dict(accumulation_steps=0), 'accumulation_steps'),
])
def test_bad_options_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFAC(**kwargs)


def test_batch_normalization_called_twice_is_an_error():
    model = L.BatchNormalization(3)
    opt = KFAC().setup(model)
    x = numpy.random.RandomState(0).randn(4, 3).astype(numpy.float32)
    with pytest.raises(RuntimeError, match='more than once'):
        opt.update(lambda x: F.sum(model(model(x)) ** 2), x)


def test_non_finite_loss_is_an_error():
    model = make_model()
    opt = KFAC().setup(model)
    x, t = batch(0)
    x[0, 0, 0, 0] = numpy.nan
    with pytest.raises(FloatingPointError, match='non-finite loss'):
        opt.update(loss_of(model), x, t)


# -- Chainer integration -----------------------------------------------------
def test_hyperparameters_are_attributes_for_chainer_extensions(tmp_path):
    model = L.Classifier(make_model())
    opt = KFAC(lr=0.1, damping=1e-2).setup(model)
    xs, ts = batch(0, n=16)
    data = chainer.datasets.TupleDataset(xs, ts)
    it = chainer.iterators.SerialIterator(data, 8, shuffle=False)
    updater = training.updaters.StandardUpdater(it, opt)
    trainer = training.Trainer(updater, (3, 'iteration'), out=str(tmp_path))
    trainer.extend(extensions.ExponentialShift('lr', 0.5),
                   trigger=(1, 'iteration'))
    trainer.extend(extensions.observe_lr(), trigger=(1, 'iteration'))
    trainer.extend(extensions.LogReport(trigger=(1, 'iteration')))
    trainer.run()
    assert opt.lr == pytest.approx(0.1 * 0.5 ** 3)
    assert opt.t == 3
    log = trainer.get_extension('LogReport').log
    assert [entry['lr'] for entry in log] == pytest.approx(
        [0.1, 0.05, 0.025])
    assert all(numpy.isfinite(entry['main/loss']) for entry in log)
    opt.damping = 0.5
    assert opt.hyperparam.damping == 0.5


def test_public_names():
    assert chainerkfac.optimizers.KFAC is KFAC
    opt = KFAC(lr=1, momentum=0.5, damping=2, bn_damping_ratio=3,
               a_interval=4, g_interval=5, weight_rescaling=True)
    assert (opt.lr, opt.momentum, opt.damping, opt.bn_damping_ratio,
            opt.a_interval, opt.g_interval, opt.weight_rescaling) == \
        (1, 0.5, 2, 3, 4, 5, True)
