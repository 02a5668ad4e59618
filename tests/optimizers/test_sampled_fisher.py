"""``fisher='sampled'``: G from labels drawn from the model's softmax
(:mod:`chainerkfac.sampled_fisher`), against the exact expectation over the
labels (every class enumerated, per example) and its predicted variance;
the A factors and the gradient stay those of the data's labels.  The
equality of P = 2 and P = 1 is the ``sampled_fisher`` check of
``tests/mpi/worker.py``."""

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L

from chainerkfac.optimizers import KFAC
from chainerkfac import sampled_fisher

N, D, H, C = 6, 4, 5, 3


class Net(chainer.Chain):
    def __init__(self):
        super(Net, self).__init__()
        with self.init_scope():
            self.l1 = L.Linear(D, H)
            self.l2 = L.Linear(H, C)

    def forward(self, x):
        return self.l2(F.tanh(self.l1(x)))


def make(seed=0, **kwargs):
    numpy.random.seed(seed)
    model = Net()
    for p in model.params():
        p.array = p.array.astype(numpy.float64)
    opt = KFAC(lr=kwargs.pop('lr', 0.0), log_coverage=False,
               **kwargs).setup(model)
    return model, opt


def data(seed=1):
    rng = numpy.random.RandomState(seed)
    return rng.standard_normal((N, D)), rng.randint(0, C, N).astype('i')


def per_class_output_gradients(model, x):
    """For example i and label c, the gradients of −log p(c|x_i) w.r.t.
    each layer's output, by hand: (p_i − e_c), and back through W2 and
    tanh; and p_i."""
    W1, b1 = model.l1.W.array, model.l1.b.array
    W2, b2 = model.l2.W.array, model.l2.b.array
    h = numpy.tanh(x @ W1.T + b1)
    z = h @ W2.T + b2
    p = numpy.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g2 = p[:, None, :] - numpy.eye(C)[None, :, :]        # (N, C, C)
    g1 = (g2 @ W2) * (1 - h ** 2)[:, None, :]             # (N, C, H)
    return p, {'l1': g1, 'l2': g2}


def exact_moments(model, x):
    """E[G] and Var[G] (elementwise) of a one-sample-per-example G =
    (1/N) Σ_i g_i g_iᵀ, by enumerating the labels."""
    p, grads = per_class_output_gradients(model, x)
    out = {}
    for name, g in grads.items():
        outer = g[:, :, :, None] * g[:, :, None, :]      # (N, C, k, k)
        mean_i = numpy.einsum('ic,ickl->ikl', p, outer)
        second_i = numpy.einsum('ic,ickl->ikl', p, outer ** 2)
        out[name] = (mean_i.mean(axis=0),
                     (second_i - mean_i ** 2).sum(axis=0) / N ** 2)
    return out


def test_the_mean_of_sampled_g_is_the_fisher_and_its_variance_as_predicted():
    model, opt = make(fisher='sampled')
    x, t = data()
    draws = {'l1': [], 'l2': []}
    for _ in range(3000):    # lr = 0: the model stays, the labels change
        opt.update(lambda: F.softmax_cross_entropy(model(x), t))
        for layer in opt.kfac_layers:
            draws[layer.name.strip('/')].append(layer.factor('G'))
    exact = exact_moments(model, x)
    for name, values in draws.items():
        values = numpy.array(values)
        mean, var = exact[name]
        error = numpy.abs(values.mean(axis=0) - mean)
        # within 4.5 standard errors of the Monte Carlo mean, everywhere
        bound = 4.5 * numpy.sqrt(var / len(values)) + 1e-12
        assert (error <= bound).all(), (name, (error / bound).max())
        # the variance of one draw: the total over entries within 10%
        assert values.var(axis=0).sum() == pytest.approx(var.sum(),
                                                         rel=0.1), name
    # the empirical Fisher (the data's labels) is not this
    _, empirical = make(fisher='empirical')
    empirical.update(lambda: F.softmax_cross_entropy(
        empirical.target(x), t))
    g = empirical.kfac_layers[1].factor('G')
    assert numpy.abs(g - exact['l2'][0]).max() > \
        10 * numpy.sqrt(exact['l2'][1] / 3000).max()


def test_a_and_the_gradient_are_the_data_labels_g_the_sampled_labels():
    """One update: A and ∇L from the data's labels, G exactly the
    empirical G at the labels drawn from the same uniforms."""
    x, t = data()
    model, opt = make(fisher='sampled', fisher_seed=7, momentum=0.0,
                      lr=0.1)
    opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    z = make()[0](x).array
    u = sampled_fisher.uniforms(N, 7, 0, 0, 0)
    cdf = numpy.cumsum(numpy.exp(z) / numpy.exp(z).sum(1, keepdims=True), 1)
    labels = (cdf < u[:, None]).sum(axis=1).astype('i')   # by hand
    at_data, opt_d = make(momentum=0.0, lr=0.1)
    empirical_g = KFAC(lr=0.0, log_coverage=False).setup(make()[0])
    empirical_g.update(lambda: F.softmax_cross_entropy(
        empirical_g.target(x), labels))
    opt_d.update(lambda: F.softmax_cross_entropy(at_data(x), t))
    for layer, g_ref, d_ref in zip(opt.kfac_layers, empirical_g.kfac_layers,
                                   opt_d.kfac_layers):
        numpy.testing.assert_allclose(layer.factor('G'), g_ref.factor('G'),
                                      rtol=1e-12, atol=1e-15)
        numpy.testing.assert_array_equal(layer.factor('A'),
                                         d_ref.factor('A'))
    # the step: G_s⁻¹ ∇L A⁻¹ with the data's ∇L, γ split by
    # π = sqrt((tr A / dim A) / (tr G / dim G)) (eq. 12-14)
    m0 = make()[0]
    loss = F.softmax_cross_entropy(m0(x), t)
    m0.cleargrads()
    loss.backward()
    for layer, link0 in zip(opt.kfac_layers, (m0.l1, m0.l2)):
        grad = numpy.concatenate([link0.W.grad, link0.b.grad[:, None]], 1)
        A, G = layer.factor('A'), layer.factor('G')
        pi = numpy.sqrt((numpy.trace(A) / len(A)) / (numpy.trace(G) / len(G)))
        da, dg = pi * numpy.sqrt(opt.damping), numpy.sqrt(opt.damping) / pi
        expected = numpy.linalg.solve(G + dg * numpy.eye(len(G)), grad) @ \
            numpy.linalg.inv(A + da * numpy.eye(len(A)))
        step = numpy.concatenate([link0.W.array - layer.link.W.array,
                                  (link0.b.array - layer.link.b.array)
                                  [:, None]], 1) / 0.1
        numpy.testing.assert_allclose(step, expected, rtol=1e-8, atol=1e-12)


def test_the_extra_backward_runs_only_when_g_is_due(monkeypatch):
    calls = []
    original = sampled_fisher.sampled_loss
    monkeypatch.setattr(sampled_fisher, 'sampled_loss',
                        lambda *a: calls.append(1) or original(*a))
    model, opt = make(fisher='sampled', a_interval=1, g_interval=3)
    x, t = data()
    for step in range(7):
        before = len(calls)
        opt.update(lambda: F.softmax_cross_entropy(model(x), t))
        assert len(calls) - before == (step % 3 == 0), step


def test_own_backward_with_sampled_backward_equals_update_lossfun():
    x, t = data()
    m1, o1 = make(fisher='sampled', lr=0.1)
    m2, o2 = make(fisher='sampled', lr=0.1)
    for _ in range(3):
        o1.update(lambda: F.softmax_cross_entropy(m1(x), t))
        m2.cleargrads()
        loss = F.softmax_cross_entropy(m2(x), t)
        o2.sampled_backward(loss)
        for p in m2.params():   # the gradients are left alone
            assert p.grad is None
        loss.backward()
        o2.update()
    for (name, p), (_, q) in zip(sorted(m1.namedparams()),
                                 sorted(m2.namedparams())):
        numpy.testing.assert_array_equal(p.array, q.array, err_msg=name)


def test_a_backward_without_the_sampled_one_is_one_line():
    x, t = data()
    model, opt = make(fisher='sampled')
    model.cleargrads()
    F.softmax_cross_entropy(model(x), t).backward()
    with pytest.raises(RuntimeError) as info:
        opt.update()
    assert 'sampled_backward(loss)' in str(info.value)
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('lossfun, count', [
    (lambda y, t: F.mean_squared_error(y, F.softmax(y).array), '0'),
    (lambda y, t: F.softmax_cross_entropy(y, t)
     + F.softmax_cross_entropy(2 * y, t), '2'),
])
def test_other_losses_are_refused_in_one_line(lossfun, count):
    x, t = data()
    model, opt = make(fisher='sampled')
    with pytest.raises(sampled_fisher.SampledFisherError) as info:
        opt.update(lambda: lossfun(model(x), t))
    message = str(info.value)
    assert 'this loss has {}'.format(count) in message
    assert '\n' not in message


def test_class_weights_are_refused():
    x, t = data()
    model, opt = make(fisher='sampled')
    with pytest.raises(sampled_fisher.SampledFisherError) as info:
        opt.update(lambda: F.softmax_cross_entropy(
            model(x), t, class_weight=numpy.ones(C)))
    assert 'class_weight' in str(info.value)


def test_ignored_rows_stay_out():
    """Rows with the ignored label give no G: G of the model on 6 rows with
    two ignored equals (4/6)·G over the 4 others (the per-example mean is
    over n = 6 rows, as the loss's)."""
    x, t = data()
    t_ignored = t.copy()
    t_ignored[:2] = -1
    m1, o1 = make(fisher='sampled', fisher_seed=3)
    o1.update(lambda: F.softmax_cross_entropy(m1(x), t_ignored))
    u = sampled_fisher.uniforms(N, 3, 0, 0, 0)
    z = make()[0](x).array
    labels = sampled_fisher.sample_labels(z, u)
    ref = KFAC(lr=0.0, log_coverage=False).setup(make()[0])
    ref.update(lambda: F.softmax_cross_entropy(ref.target(x[2:]),
                                               labels[2:]))
    for layer, r in zip(o1.kfac_layers, ref.kfac_layers):
        numpy.testing.assert_allclose(layer.factor('G'),
                                      r.factor('G') * 4 / 6, rtol=1e-12)


def test_a_soft_target_loss_samples_from_the_same_softmax():
    """Mixup's loss, −Σ_c t_c log softmax(z)_c through F.log_softmax: the
    same labels are drawn as for a softmax cross-entropy on the same
    scores, so G is the same; the gradient is the soft targets'."""
    from chainerkfac.training.classifier import soft_cross_entropy
    x, t = data()
    soft = numpy.eye(C)[t] * 0.7 + 0.1
    m1, o1 = make(fisher='sampled', fisher_seed=5)
    o1.update(lambda: soft_cross_entropy(m1(x), soft))
    m2, o2 = make(fisher='sampled', fisher_seed=5)
    o2.update(lambda: F.softmax_cross_entropy(m2(x), t))
    for a, b in zip(o1.kfac_layers, o2.kfac_layers):
        numpy.testing.assert_allclose(a.factor('G'), b.factor('G'),
                                      rtol=1e-12, atol=1e-16)
        numpy.testing.assert_array_equal(a.factor('A'), b.factor('A'))


def own_loop(model, opt, x, t, loss_scale=None):
    model.cleargrads()
    loss = F.softmax_cross_entropy(model(x), t)
    opt.sampled_backward(loss)
    loss.backward(loss_scale=loss_scale)
    opt.update()


@pytest.mark.parametrize('own, optimizer_scale', [(128.0, None),
                                                  (None, 64.0),
                                                  (32.0, 256.0)])
def test_loss_scales_change_nothing(own, optimizer_scale):
    """The pass at sampled labels and the user's backward may use other
    loss scales: each pass's factors are unscaled by its own."""
    x, t = data()
    m1, o1 = make(fisher='sampled', lr=0.1)
    own_loop(m1, o1, x, t)
    m2, o2 = make(fisher='sampled', lr=0.1)
    if optimizer_scale is not None:
        o2.loss_scaling(scale=optimizer_scale)
    own_loop(m2, o2, x, t, loss_scale=own)
    for a, b in zip(o1.kfac_layers, o2.kfac_layers):
        for name in ('A', 'G'):
            numpy.testing.assert_allclose(a.factor(name), b.factor(name),
                                          rtol=1e-12)
    for (name, p), (_, q) in zip(sorted(m1.namedparams()),
                                 sorted(m2.namedparams())):
        numpy.testing.assert_allclose(p.array, q.array, rtol=1e-10,
                                      err_msg=name)


def test_an_overflow_in_the_sampled_pass_skips_the_update(monkeypatch):
    """Dynamic loss scaling: a non-finite G from the pass at sampled
    labels skips the update and halves the scale, as a non-finite
    gradient does."""
    x, t = data()
    model, opt = make(fisher='sampled', lr=0.1)
    opt.loss_scaling()   # dynamic (Chainer's floor is 1: start at 4)
    opt._loss_scale = 4.0
    original = sampled_fisher.sampled_loss
    monkeypatch.setattr(sampled_fisher, 'sampled_loss',
                        lambda *a: original(*a) * float('inf'))
    before = {n: p.array.copy() for n, p in model.namedparams()}
    opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    assert opt.t == 1
    assert opt._loss_scale == 2.0
    for name, p in model.namedparams():
        numpy.testing.assert_array_equal(p.array, before[name])


class NetBN(chainer.Chain):
    def __init__(self):
        super(NetBN, self).__init__()
        with self.init_scope():
            self.l1 = L.Linear(D, H)
            self.bn = L.BatchNormalization(H)
            self.l2 = L.Linear(H, C)
            self.aux = L.Linear(D, 1)

    def forward(self, x):
        return self.l2(F.tanh(self.bn(self.l1(x))))


def test_a_forgotten_sampled_backward_names_it_for_every_layer_type():
    """Also where only G or the BN Fisher is due (a_interval = 2)."""
    x, t = data()
    numpy.random.seed(0)
    model = NetBN()
    opt = KFAC(fisher='sampled', a_interval=2, log_coverage=False,
               skip_layers=['aux']).setup(model)
    opt.update(lambda: F.softmax_cross_entropy(model(x.astype('f')), t))
    for _ in range(3):   # t = 1: only G and F are due
        model.cleargrads()
        F.softmax_cross_entropy(model(x.astype('f')), t).backward()
        with pytest.raises(RuntimeError) as info:
            opt.update()
        assert 'no backward pass at sampled labels ran' in str(info.value)


def test_a_link_the_sampled_pass_cannot_reach_is_named():
    """A second head feeding another loss: the pass at sampled labels does
    not reach it, which is one line naming it."""
    x, t = data()
    numpy.random.seed(0)
    model = NetBN()
    opt = KFAC(fisher='sampled', log_coverage=False).setup(model)

    def lossfun():
        return F.softmax_cross_entropy(model(x.astype('f')), t) + \
            F.mean(model.aux(x.astype('f')) ** 2)
    with pytest.raises(RuntimeError) as info:
        opt.update(lossfun)
    message = str(info.value)
    assert 'did not reach link /aux' in message
    assert "skip_layers=['/aux']" in message
    opt2 = KFAC(fisher='sampled', log_coverage=False,
                skip_layers=['aux']).setup(model)
    opt2.update(lossfun)   # the head on the raw gradient: it trains
