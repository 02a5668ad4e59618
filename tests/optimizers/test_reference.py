"""Pin chainerkfac.optimizers.KFAC to the independent reference in
tests/reference.py (float64 models, tight tolerances).

The first block self-checks the reference (Kronecker / vec conventions,
patches vs. chainer's convolution, gradient reconstruction, finite
differences); the second compares the optimizer with it.
"""

import copy
import math

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

from tests import nets
from tests import reference as ref




# ---------------------------------------------------------------------------
# Models (float64, explicit forward routed through ref.run)
# ---------------------------------------------------------------------------

_randomize = nets.randomize


class MLP(chainer.Chain):
    """Linear(6->4) on a 3-D input (flattened by Linear) -> tanh -> Linear."""

    def __init__(self, bias1=True, bias2=False):
        super(MLP, self).__init__()
        with chainer.using_config('dtype', np.float64), self.init_scope():
            self.l1 = L.Linear(6, 4, nobias=not bias1)
            self.l2 = L.Linear(4, 3, nobias=not bias2)

    def forward(self, x, tape=None):
        h = F.tanh(ref.run(tape, self.l1, x))
        return ref.run(tape, self.l2, h)


class ConvNet(chainer.Chain):
    """Conv(3->4, k3) -> relu -> Linear(->3)."""

    def __init__(self, stride, pad, bias, in_hw=(7, 6)):
        super(ConvNet, self).__init__()
        oh = (in_hw[0] + 2 * pad - 3) // stride + 1
        ow = (in_hw[1] + 2 * pad - 3) // stride + 1
        with chainer.using_config('dtype', np.float64), self.init_scope():
            self.conv = L.Convolution2D(3, 4, 3, stride=stride, pad=pad,
                                        nobias=not bias)
            self.fc = L.Linear(4 * oh * ow, 3)

    def forward(self, x, tape=None):
        h = F.relu(ref.run(tape, self.conv, x))
        return ref.run(tape, self.fc, h)


class BNNet(chainer.Chain):
    """``first`` -> BN(channels) -> relu -> Linear(fc_in -> 3)."""

    def __init__(self, first, channels, fc_in):
        super(BNNet, self).__init__()
        with chainer.using_config('dtype', np.float64), self.init_scope():
            self.first = first()
            self.bn = L.BatchNormalization(channels)
            self.fc = L.Linear(fc_in, 3)

    def forward(self, x, tape=None):
        h = ref.run(tape, self.first, x)
        h = F.relu(ref.run(tape, self.bn, h))
        return ref.run(tape, self.fc, h)


def ConvBNNet():
    """Conv(3->4, k3, pad1, bias) -> BN -> relu -> Linear(->3)."""
    return BNNet(lambda: L.Convolution2D(3, 4, 3, pad=1), 4, 4 * 7 * 6)


def LinBNNet():
    """Linear(6->5, no bias) -> BN -> relu -> Linear(->3)."""
    return BNNet(lambda: L.Linear(6, 5, nobias=True), 5, 5)


FullNet = nets.ConvBNConvNet


def _data(shape, n_classes=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.standard_normal(shape).astype(np.float64)
    t = rng.randint(0, n_classes, size=shape[0]).astype(np.int32)
    return x, t


def _lossfun(model, loss_reduction='mean'):
    def lossfun(x, t):
        y = model(x)
        if loss_reduction == 'sum':
            return F.sum(F.softmax_cross_entropy(y, t, reduce='no'))
        return F.softmax_cross_entropy(y, t)
    return lossfun


def _close(actual, expected, rtol, atol_rel=1e-12, what=''):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape,
                                            expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = np.abs(actual - expected)
    tol = rtol * np.abs(expected) + atol_rel * scale
    nz = np.abs(expected) > 0
    worst = float(np.max(err[nz] / np.abs(expected[nz]))) if nz.any() else 0.
    assert np.all(err <= tol), (
        '%s: max abs err %.3e, max rel err %.3e (rtol %.1e), |expected| '
        'max %.3e' % (what, float(err.max()), worst, rtol, scale))


# ---------------------------------------------------------------------------
# Self-checks of the reference
# ---------------------------------------------------------------------------

def _random_spd(rng, k):
    M = rng.standard_normal((k, k))
    return M @ M.T + 0.5 * np.eye(k)


def test_kron_vec_convention():
    """G^-1 grad A^-1 == unvec((A kron G)^-1 vec(grad)), vec column-stacked."""
    rng = np.random.RandomState(0)
    A = _random_spd(rng, 5)
    G = _random_spd(rng, 3)
    grad = rng.standard_normal((3, 5))
    direct = np.linalg.solve(G, grad) @ np.linalg.inv(A)
    vec = grad.reshape(-1, order='F')
    kron = np.linalg.solve(np.kron(A, G), vec).reshape((3, 5), order='F')
    np.testing.assert_allclose(kron, direct, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.kron_direction(grad, A, G), direct,
                               rtol=1e-10, atol=1e-12)
    # (B^T kron C) vec(X) = vec(C X B) pins column stacking.
    B = rng.standard_normal((5, 4))
    X = grad
    np.testing.assert_allclose(np.kron(B.T, G) @ ref.vec(X),
                               ref.vec(G @ X @ B), rtol=1e-12)
    # row stacking would give a different answer (the check is not vacuous)
    wrong = np.linalg.solve(np.kron(A, G), grad.reshape(-1)).reshape(3, 5)
    assert not np.allclose(wrong, direct)


def test_reference_kron_is_exact_fisher_for_one_sample():
    """For one sample, the empirical Fisher of vec(grad W) is A kron G."""
    model = _randomize(MLP(bias1=True), 1)
    x, t = _data((1, 2, 3), seed=1)
    grads, layers, _ = ref.capture(model, x, t, per_sample=True)
    fac = ref.layer_factors(layers['/l1'])
    gmat = np.concatenate([grads['/l1/W'], grads['/l1/b'][:, None]], axis=1)
    v = ref.vec(gmat)
    np.testing.assert_allclose(np.kron(fac['A'], fac['G']), np.outer(v, v),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize('stride,pad', [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_reference_patches_match_convolution(stride, pad):
    rng = np.random.RandomState(2)
    x = rng.standard_normal((2, 3, 7, 6))
    W = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    y = F.convolution_2d(x, W, b, stride=stride, pad=pad).array
    for i in range(2):
        P, oh, ow = ref.conv_patches(x[i], (3, 3), (stride, stride),
                                     (pad, pad))
        assert (oh, ow) == y.shape[2:]
        out = P @ W.reshape(4, -1).T + b       # (T, O)
        np.testing.assert_allclose(out.T.reshape(4, oh, ow), y[i],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('stride,pad', [(1, 0), (2, 1)])
def test_reference_per_sample_gradients_rebuild_batch_gradient(
        stride, pad, bias):
    """(1/n) sum_{i,t} g a^T == [grad W | grad b] and per-sample g equals
    n x batch g without BN."""
    model = _randomize(ConvNet(stride, pad, bias), 3)
    x, t = _data((4, 3, 7, 6), seed=3)
    grads, ls, _ = ref.capture(model, x, t, per_sample=True)
    _, lb, _ = ref.capture(model, x, t, per_sample=False)
    for name in ('/conv', '/fc'):
        np.testing.assert_allclose(ls[name]['g'], lb[name]['g'], rtol=1e-10,
                                   atol=1e-13)
    info = ls['/conv']
    n = x.shape[0]
    acc = 0
    for i in range(n):
        P, oh, ow = ref.conv_patches(info['x'][i], (3, 3), (stride,) * 2,
                                     (pad,) * 2)
        if bias:
            P = np.concatenate([P, np.ones((P.shape[0], 1))], axis=1)
        gi = info['g'][i].reshape(4, -1)       # (O, T), t row-major
        acc = acc + gi @ P
    acc = acc / n
    expect = grads['/conv/W'].reshape(4, -1)
    if bias:
        expect = np.concatenate([expect, grads['/conv/b'][:, None]], axis=1)
    np.testing.assert_allclose(acc, expect, rtol=1e-10, atol=1e-13)
    info = ls['/fc']
    acc = sum(np.outer(info['g'][i], np.append(info['x'][i].reshape(-1), 1))
              for i in range(n)) / n
    expect = np.concatenate([grads['/fc/W'], grads['/fc/b'][:, None]], 1)
    np.testing.assert_allclose(acc, expect, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize('net,shape', [(ConvBNNet, (5, 3, 7, 6)),
                                       (LinBNNet, (5, 6))])
def test_reference_bn_per_sample_terms_sum_to_gradient(net, shape):
    model = _randomize(net(), 4)
    x, t = _data(shape, seed=4)
    grads, layers, _ = ref.capture(model, x, t)
    info = layers['/bn']
    xhat = ref.bn_xhat(info['x'], info['link'].eps)
    uv = ref.bn_per_sample(xhat, info['g'])
    C = info['g'].shape[1]
    np.testing.assert_allclose(uv.mean(axis=0)[:C], grads['/bn/gamma'],
                               rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(uv.mean(axis=0)[C:], grads['/bn/beta'],
                               rtol=1e-10, atol=1e-13)
    # the reference's x_hat is the one chainer's BN uses
    link = info['link']
    y = F.batch_normalization(info['x'], link.gamma.array, link.beta.array,
                              eps=link.eps).array
    shp = [1, C] + [1] * (info['x'].ndim - 2)
    np.testing.assert_allclose(
        xhat * link.gamma.array.reshape(shp) + link.beta.array.reshape(shp),
        y, rtol=1e-10, atol=1e-12)


def test_reference_gradient_finite_differences():
    model = _randomize(FullNet(), 5)
    x, t = _data((4, 3, 7, 6), seed=5)
    grads, _, _ = ref.capture(model, x, t)
    params = dict(model.namedparams())

    def loss():
        with chainer.no_backprop_mode():
            return float(F.softmax_cross_entropy(model(x), t).array)

    rng = np.random.RandomState(5)
    h = 1e-6
    for pname in ('/conv1/W', '/bn1/gamma', '/bn1/beta', '/conv2/W',
                  '/conv2/b', '/fc/W'):
        p = params[pname]
        for _ in range(2):
            idx = tuple(rng.randint(0, s) for s in p.shape)
            old = p.array[idx]
            p.array[idx] = old + h
            lp = loss()
            p.array[idx] = old - h
            lm = loss()
            p.array[idx] = old
            fd = (lp - lm) / (2 * h)
            assert abs(fd - grads[pname][idx]) <= 1e-6 * max(
                1.0, abs(fd)), (pname, idx, fd, grads[pname][idx])


def test_reference_damping_and_rescale():
    rng = np.random.RandomState(6)
    A = _random_spd(rng, 4)
    G = _random_spd(rng, 3) * 1e-3
    gamma = 1e-2
    Ab, Gb = ref.damp_kfac(A, G, gamma)
    pi = math.sqrt((np.trace(A) / 4) / (np.trace(G) / 3))
    np.testing.assert_allclose(Ab - A, pi * math.sqrt(gamma) * np.eye(4),
                               atol=1e-14)
    np.testing.assert_allclose(Gb - G, math.sqrt(gamma) / pi * np.eye(3),
                               atol=1e-14)
    W = rng.standard_normal((5, 2, 3, 3))
    Wr = ref.rescale(W)
    assert abs(np.linalg.norm(Wr.ravel()) - math.sqrt(10)) < 1e-8
    np.testing.assert_allclose(Wr / np.linalg.norm(Wr.ravel()),
                               W / np.linalg.norm(W.ravel()), rtol=1e-12)


def test_reference_stale_refresh_pattern():
    model = _randomize(MLP(), 7)
    r = ref.ReferenceKFAC(model, a_interval=2, g_interval=3)
    for k in range(6):
        x, t = _data((3, 2, 3), seed=100 + k)
        r.update(x, t)
    assert r.refreshed == [(True, True), (False, False), (True, False),
                           (False, True), (True, False), (False, False)]


# ---------------------------------------------------------------------------
# The optimizer against the reference
# ---------------------------------------------------------------------------

def _kfac_module():
    try:
        import chainerkfac.optimizers as opts
    except Exception as e:  # pragma: no cover - optimizer being written
        pytest.fail('chainerkfac.optimizers does not import: %r' % (e,))
    return opts


def _make_opt(model, **kw):
    opts = _kfac_module()
    args = dict(lr=0.1, momentum=0.9, damping=1e-3, bn_damping_ratio=1.0,
                a_interval=1, g_interval=1, weight_rescaling=False,
                bn_fisher='full', factor_dtype='float32',
                loss_reduction='mean', accumulation_steps=1)
    args.update(kw)
    opt = opts.KFAC(**args)
    opt.setup(model)
    return opt


def _layers_by_name(opt):
    return {layer.name: layer for layer in opt.kfac_layers}


def _unit_blocks(F):
    """The 2C × 2C matrix of the unit-wise BN Fisher kept as the 3C values
    [F_γγ; F_γβ; F_ββ] (zeros outside the 2 × 2 blocks of (γ_c, β_c))."""
    C = F.shape[0] // 3
    gg, gb, bb = np.diag(F[:C]), np.diag(F[C:2 * C]), np.diag(F[2 * C:])
    return np.block([[gg, gb], [gb, bb]])


def _check_factors(opt, expected, rtol=1e-6, what=''):
    """expected: {link path: dict of factor name -> array}."""
    layers = _layers_by_name(opt)
    assert set(layers) == set(expected), (sorted(layers), sorted(expected))
    for name, facs in expected.items():
        for fname, fexp in facs.items():
            got = layers[name].factor(fname)
            assert got is not None, (what, name, fname)
            if getattr(layers[name], 'unit', False):
                got = _unit_blocks(np.asarray(got))
            _close(np.asarray(got, dtype=np.float64), fexp, rtol,
                   what='%s %s factor %s' % (what, name, fname))


def _check_params(model, expected, rtol, what=''):
    for pname, p in model.namedparams():
        _close(p.array, expected[pname], rtol, what='%s %s' % (what, pname))


def _ref_factors(model, x, t, loss_reduction='mean', per_sample=False,
                 bn_mode='full'):
    _, layers, order = ref.capture(model, x, t, loss_reduction, per_sample)
    return {name: ref.layer_factors(layers[name], bn_mode) for name in order}


def test_kfac_layers_names_and_links():
    model = _randomize(FullNet(), 8)
    opt = _make_opt(model)
    layers = _layers_by_name(opt)
    assert sorted(layers) == ['/bn1', '/conv1', '/conv2', '/fc']
    links = dict(model.namedlinks())
    for name, layer in layers.items():
        assert layer.link is links[name]
        for f in ('A', 'G') if name != '/bn1' else ('F',):
            assert layer.factor(f) is None


@pytest.mark.parametrize('bias1,bias2', [(True, False), (False, True)])
def test_factors_linear(bias1, bias2):
    model = _randomize(MLP(bias1, bias2), 10)
    x, t = _data((5, 2, 3), seed=10)
    expected = _ref_factors(copy.deepcopy(model), x, t, per_sample=True)
    opt = _make_opt(model)
    opt.update(_lossfun(model), x, t)
    _check_factors(opt, expected, what='linear')


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('stride,pad', [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_factors_conv(stride, pad, bias):
    model = _randomize(ConvNet(stride, pad, bias), 11)
    x, t = _data((4, 3, 7, 6), seed=11)
    expected = _ref_factors(copy.deepcopy(model), x, t, per_sample=True)
    opt = _make_opt(model)
    opt.update(_lossfun(model), x, t)
    _check_factors(opt, expected, what='conv s%d p%d b%d' % (stride, pad,
                                                             bias))


def test_factors_are_float64_for_float64_model():
    model = _randomize(FullNet(), 12)
    x, t = _data((3, 3, 7, 6), seed=12)
    opt = _make_opt(model)
    opt.update(_lossfun(model), x, t)
    for layer in opt.kfac_layers:
        for f in (('F',) if isinstance(layer.link, L.BatchNormalization)
                  else ('A', 'G')):
            assert np.asarray(layer.factor(f)).dtype == np.float64, (
                layer.name, f, np.asarray(layer.factor(f)).dtype)


@pytest.mark.parametrize('bn_fisher', ['full', 'diagonal', 'unit'])
@pytest.mark.parametrize('net,shape', [(ConvBNNet, (5, 3, 7, 6)),
                                       (LinBNNet, (5, 6))])
def test_factors_bn(net, shape, bn_fisher):
    """Against the per-sample Fisher of (γ, β) built explicitly (unit-wise:
    its 2 × 2 blocks of (γ_c, β_c))."""
    model = _randomize(net(), 13)
    x, t = _data(shape, seed=13)
    expected = _ref_factors(copy.deepcopy(model), x, t, bn_mode=bn_fisher)
    assert expected['/bn']['F'].ndim == (1 if bn_fisher == 'diagonal'
                                         else 2)
    opt = _make_opt(model, bn_fisher=bn_fisher)
    opt.update(_lossfun(model), x, t)
    _check_factors(opt, expected, rtol=1e-10, what='bn ' + bn_fisher)


@pytest.mark.parametrize('bn_fisher', ['full', 'diagonal', 'unit'])
def test_one_update_full_model(bn_fisher):
    model = _randomize(FullNet(), 14)
    x, t = _data((6, 3, 7, 6), seed=14)
    hp = dict(lr=0.1, momentum=0.9, damping=1e-3, bn_damping_ratio=4.0)
    rmodel = copy.deepcopy(model)
    r = ref.ReferenceKFAC(rmodel, bn_fisher=bn_fisher, **hp)
    r.update(x, t)
    opt = _make_opt(model, bn_fisher=bn_fisher, **hp)
    opt.update(_lossfun(model), x, t)
    _check_factors(opt, {k: {f: v for f, v in st.items()
                             if f in ('A', 'G', 'F')}
                         for k, st in r.state.items()},
                   rtol=1e-8, what='full model')
    _check_params(model, r.params(), rtol=1e-8, what='one update ' +
                  bn_fisher)


def _step_both(model, r, opt, seeds, what):
    """One update of the reference ``r`` and of ``opt`` per seed's batch of
    (6, 3, 7, 6) inputs, the parameters compared after each."""
    for k, seed in enumerate(seeds):
        x, t = _data((6, 3, 7, 6), seed=seed)
        r.update(x, t)
        opt.update(_lossfun(model), x, t)
        _check_params(model, r.params(), rtol=1e-8,
                      what='{} {}'.format(what, k))


def test_three_updates_momentum_rescaling():
    model = _randomize(FullNet(), 15)
    hp = dict(lr=0.05, momentum=0.9, damping=1e-3, bn_damping_ratio=2.0,
              weight_rescaling=True, bn_fisher='diagonal')
    r = ref.ReferenceKFAC(copy.deepcopy(model), **hp)
    opt = _make_opt(model, **hp)
    _step_both(model, r, opt, seeds=range(150, 153), what='step')


def test_stale_factors_and_changing_damping():
    model = _randomize(FullNet(), 16)
    hp = dict(lr=0.05, momentum=0.9, damping=1e-2, bn_damping_ratio=3.0,
              a_interval=2, g_interval=3, bn_fisher='full')
    dampings = [1e-2, 3e-3, 2e-2, 1e-3, 5e-3, 4e-2]
    r = ref.ReferenceKFAC(copy.deepcopy(model), **hp)
    opt = _make_opt(model, **hp)
    for k in range(6):
        r.damping = dampings[k]
        opt.damping = dampings[k]
        x, t = _data((6, 3, 7, 6), seed=160 + k)
        r.update(x, t)
        opt.update(_lossfun(model), x, t)
        _check_factors(opt, {n: {f: v for f, v in st.items()
                                 if f in ('A', 'G', 'F')}
                             for n, st in r.state.items()},
                       rtol=1e-8, what='stale step %d' % k)
        _check_params(model, r.params(), rtol=1e-8, what='stale step %d' % k)


@pytest.mark.parametrize('net,shape,per_sample', [
    (ConvNet, (4, 3, 7, 6), True),
    (FullNet, (5, 3, 7, 6), False),
    (LinBNNet, (5, 6), False)])
def test_loss_reduction_sum_factors(net, shape, per_sample):
    model = _randomize(net(2, 1, True) if net is ConvNet else net(), 17)
    x, t = _data(shape, seed=17)
    expected = _ref_factors(copy.deepcopy(model), x, t, loss_reduction='sum',
                            per_sample=per_sample)
    # g_i = dl_i/ds does not depend on the reduction
    mean_f = _ref_factors(copy.deepcopy(model), x, t, loss_reduction='mean',
                          per_sample=per_sample)
    for name in expected:
        for f in expected[name]:
            np.testing.assert_allclose(expected[name][f], mean_f[name][f],
                                       rtol=1e-10, atol=1e-14)
    opt = _make_opt(model, loss_reduction='sum')
    opt.update(_lossfun(model, 'sum'), x, t)
    _check_factors(opt, expected, what='sum')


def test_loss_reduction_sum_update():
    model = _randomize(FullNet(), 18)
    x, t = _data((5, 3, 7, 6), seed=18)
    hp = dict(lr=0.01, momentum=0.9, damping=1e-2, bn_damping_ratio=2.0,
              bn_fisher='full', loss_reduction='sum')
    r = ref.ReferenceKFAC(copy.deepcopy(model), **hp)
    r.update(x, t)
    opt = _make_opt(model, **hp)
    opt.update(_lossfun(model, 'sum'), x, t)
    _check_params(model, r.params(), rtol=1e-8, what='sum update')


class FullNetExtra(FullNet):
    """FullNet with a parameter outside any K-FAC link (logit scale)."""

    def __init__(self):
        super(FullNetExtra, self).__init__()
        with self.init_scope():
            self.temp = chainer.Parameter(np.array([1.3, 0.7, 1.1]))

    def forward(self, x, tape=None):
        y = super(FullNetExtra, self).forward(x, tape)
        return y * F.broadcast_to(self.temp, y.shape)


def test_other_parameters_take_raw_gradient():
    model = _randomize(FullNetExtra(), 19)
    model.temp.array[...] = [1.3, 0.7, 1.1]
    hp = dict(lr=0.05, momentum=0.9, damping=1e-3, bn_damping_ratio=2.0,
              weight_rescaling=True, bn_fisher='full')
    r = ref.ReferenceKFAC(copy.deepcopy(model), **hp)
    opt = _make_opt(model, **hp)
    assert '/temp' not in _layers_by_name(opt)
    _step_both(model, r, opt, seeds=range(190, 192), what='extra step')


def test_hyperparameters_changed_between_updates():
    model = _randomize(FullNet(), 20)
    hp = dict(lr=0.05, momentum=0.9, damping=1e-3, bn_damping_ratio=2.0,
              bn_fisher='diagonal')
    r = ref.ReferenceKFAC(copy.deepcopy(model), **hp)
    opt = _make_opt(model, **hp)
    changes = [{}, {'lr': 0.02}, {'momentum': 0.5, 'weight_rescaling': True},
               {'g_interval': 2, 'a_interval': 3}, {'lr': 0.03}]
    for k, ch in enumerate(changes):
        for key, val in ch.items():
            setattr(r, key, val)
            setattr(opt, key, val)
        x, t = _data((6, 3, 7, 6), seed=200 + k)
        r.update(x, t)
        opt.update(_lossfun(model), x, t)
        _check_params(model, r.params(), rtol=1e-8, what='hp step %d' % k)
    # steps 3, 4 with a_interval 3, g_interval 2: A stale, G fresh at 4
    assert r.refreshed[3:] == [(True, False), (False, True)]
