"""K-FAC on a user's own model: lazily sized links, links without a gradient
in an update, links used more than once, the opt-out, the coverage report,
links K-FAC does not cover, and a backward pass the user drives.

References are independent of the package: explicit per-use / per-sample
factors from tests/reference.py's building blocks and Chainer's autograd,
MomentumSGD's rule written out, and the same optimizer run through its other
entry point.  The distributed cases (per-rank seeds with lazily sized links,
links without a gradient, captured passes) run under mpiexec in
tests/mpi/own_model_worker.py.
"""

import json
import logging
import os
import subprocess
import sys

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.link_hooks  # noqa: F401 (chainer.link_hooks.SpectralNormalization)
import chainer.links as L

from chainerkfac.optimizers import KFAC

import tests
from tests import reference
from tests.mpi import mpi_env
from tests.mpi import mpiexec

WORKER = os.path.join(tests.TESTS, 'mpi', 'own_model_worker.py')
HP = dict(lr=0.05, momentum=0.9, damping=1e-2)


def data(step, n=6, shape=(3, 5, 5), classes=4):
    rng = numpy.random.RandomState(10 + step)
    return (rng.randn(n, *shape).astype(numpy.float32),
            rng.randint(0, classes, n).astype(numpy.int32))


class LazyNet(chainer.Chain):
    """Every weight link lazily sized (as AlexNet, NIN, GoogLeNet)."""

    def __init__(self):
        super(LazyNet, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(None, 4, 3, pad=1)
            self.fc = L.Linear(None, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)))


# -- 2: the factor dtype follows the parameters -----------------------------

def test_lazy_float32_links_get_float32_factors():
    numpy.random.seed(0)
    model = LazyNet()
    assert model.fc.W.dtype == numpy.float64  # what an uninitialized one says
    opt = KFAC(**HP).setup(model)
    x, t = data(0)
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    for layer in opt.kfac_layers:
        assert layer.factor_dtype == numpy.float32, layer.name
        for name in layer.factor_names:
            assert layer.state[name].dtype == numpy.float32, (layer, name)


def test_float64_links_keep_float64_factors():
    with chainer.using_config('dtype', numpy.float64):
        numpy.random.seed(0)
        model = LazyNet()
    opt = KFAC(**HP).setup(model)
    x, t = data(0)
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t),
               x.astype(numpy.float64), t)
    assert [layer.factor_dtype for layer in opt.kfac_layers] == \
        [numpy.float64] * 2


# -- 3: a covered link without a gradient in an update ----------------------

class TwoHeads(chainer.Chain):
    def __init__(self):
        super(TwoHeads, self).__init__()
        with self.init_scope():
            self.body = L.Linear(5, 6)
            self.head_a = L.Linear(6, 3)
            self.head_b = L.Linear(6, 3)

    def forward(self, x, head):
        return getattr(self, head)(F.tanh(self.body(x)))


def test_link_without_gradient_is_left_as_momentum_sgd_leaves_it():
    """head_b is not used in updates 0 and 1: it moves by momentum only (a
    zero gradient, as MomentumSGD's rule), keeps no factors; the rest equals
    K-FAC on the model without head_b; update 2 uses it."""
    numpy.random.seed(1)
    model = TwoHeads()
    numpy.random.seed(1)
    without = TwoHeads()
    del without.head_b  # the same weights, without the unused head
    opt = KFAC(**HP).setup(model)
    ref = KFAC(**HP).setup(without)
    rng = numpy.random.RandomState(0)
    b0 = model.head_b.W.array.copy()
    for step in range(2):
        x = rng.randn(4, 5).astype(numpy.float32)
        t = rng.randint(0, 3, 4).astype(numpy.int32)
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x, 'head_a'),
                                                        t), x, t)
        ref.update(lambda x, t: F.softmax_cross_entropy(
            without(x, 'head_a'), t), x, t)
    head_b = [layer for layer in opt.kfac_layers if layer.name == '/head_b']
    assert head_b and head_b[0].state.get('A') is None
    # zero gradient from w(-1) = w(0): momentum is zero too, it stays put
    numpy.testing.assert_array_equal(model.head_b.W.array, b0)
    for name, p in without.namedparams():
        q = dict(model.namedparams())[name]
        numpy.testing.assert_allclose(q.array, p.array, rtol=1e-6,
                                      atol=1e-7, err_msg=name)
    x = rng.randn(4, 5).astype(numpy.float32)
    t = rng.randint(0, 3, 4).astype(numpy.int32)
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x, 'head_b'), t),
               x, t)
    assert head_b[0].state['A'] is not None
    assert not numpy.array_equal(model.head_b.W.array, b0)


def test_unused_link_with_momentum_moves_by_momentum_only():
    """A link used in update 0 and not in update 1 takes eq. 17 with a zero
    direction at update 1: w(2) = w(1) + m (w(1) - w(0))."""
    numpy.random.seed(2)
    model = TwoHeads()
    opt = KFAC(**HP).setup(model)
    x, t = data(0, shape=(5,), classes=3)
    w0 = model.head_b.W.array.copy()
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x, 'head_b'), t),
               x, t)
    w1 = model.head_b.W.array.copy()
    factors = {k: v.copy() for k, v in opt.kfac_layers[2].state.items()
               if v is not None}
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x, 'head_a'), t),
               x, t)
    numpy.testing.assert_allclose(model.head_b.W.array,
                                  w1 + HP['momentum'] * (w1 - w0),
                                  rtol=1e-6, atol=1e-8)
    for k, v in factors.items():  # its factors untouched
        numpy.testing.assert_array_equal(opt.kfac_layers[2].state[k], v)


# -- several uses of one link in a pass -------------------------------------

class Shared(chainer.Chain):
    """One Linear applied twice (weight sharing, an unrolled recurrence)."""

    def __init__(self):
        super(Shared, self).__init__()
        with self.init_scope():
            self.cell = L.Linear(4, 4, initialW=chainer.initializers.Normal(
                0.5), initial_bias=chainer.initializers.Normal(0.1))
            self.out = L.Linear(4, 3, initialW=chainer.initializers.Normal(
                0.5))

    def forward(self, x, tape=None):
        h = F.tanh(reference.run(tape, self.cell, x))
        h = F.tanh(reference.run(tape, self.cell, h))
        return reference.run(tape, self.out, h)


def test_link_used_twice_sums_factors_over_its_uses():
    """A = Σ_uses Σ_i a aᵀ / n, G = Σ_uses Σ_i g gᵀ / (n·U), U uses: the
    uses are taken as a convolution's positions (KFC, Grosse & Martens
    2016; the independence-over-time approximation of Martens, Ba & Johnson
    2018)."""
    numpy.random.seed(3)
    with chainer.using_config('dtype', numpy.float64):
        model = Shared()
    rng = numpy.random.RandomState(4)
    x = rng.randn(5, 4)
    t = rng.randint(0, 3, 5).astype(numpy.int32)
    tape = reference.Tape()
    loss = F.softmax_cross_entropy(model.forward(x, tape=tape), t)
    model.cleargrads()
    loss.backward(retain_grad=True)
    n = x.shape[0]
    uses = [(xin, n * out.grad) for link, xin, out in tape.records
            if link is model.cell]
    assert len(uses) == 2
    A = sum(reference.linear_factors(xs, gs, True)[0] for xs, gs in uses)
    G = sum(reference.linear_factors(xs, gs, True)[1] for xs, gs in uses) \
        / len(uses)
    model.cleargrads()
    opt = KFAC(**HP).setup(model)
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    cell = opt.kfac_layers[0]
    numpy.testing.assert_allclose(cell.factor('A'), A, rtol=1e-10,
                                  atol=1e-14)
    numpy.testing.assert_allclose(cell.factor('G'), G, rtol=1e-10,
                                  atol=1e-14)


# -- the opt-out and the report ---------------------------------------------

class Mixed(chainer.Chain):
    def __init__(self):
        super(Mixed, self).__init__()
        with self.init_scope():
            self.embed = L.EmbedID(10, 5)
            self.conv = L.Convolution2D(1, 2, 3, pad=1)
            self.grouped = L.Convolution2D(2, 2, 3, pad=1, groups=2)
            self.renorm = L.BatchRenormalization(2)
            self.fc = L.Linear(2 * 5 * 5 + 5, 3)
            self.prelu = L.PReLU()
            self.fc_sn = L.Linear(3, 3)
        self.fc_sn.add_hook(chainer.link_hooks.SpectralNormalization())

    def forward(self, x, words):
        h = self.renorm(self.grouped(F.relu(self.conv(x))))
        e = F.sum(self.embed(words), axis=1)
        h = F.concat([F.reshape(h, (h.shape[0], -1)), e], axis=1)
        return self.fc_sn(self.prelu(self.fc(h)))


def mixed_batch():
    rng = numpy.random.RandomState(5)
    return (rng.randn(4, 1, 5, 5).astype(numpy.float32),
            rng.randint(0, 10, (4, 3)).astype(numpy.int32),
            rng.randint(0, 3, 4).astype(numpy.int32))


def test_report_says_what_is_covered_and_why_the_rest_is_not(caplog):
    numpy.random.seed(6)
    model = Mixed()
    with caplog.at_level(logging.INFO, logger='chainerkfac'):
        opt = KFAC(**HP).setup(model)
    lines = [r.getMessage() for r in caplog.records]
    assert [r.levelname for r in caplog.records] == ['WARNING', 'WARNING']
    covered = sum(p.size for name in ('conv', 'grouped', 'embed', 'fc')
                  for p in getattr(model, name).params())
    total = sum(p.size for p in model.params())
    assert lines[0] == ('K-FAC covers 4 links (Convolution2D 2, EmbedID 1, '
                        'Linear 1): {:,} of {:,} parameters'.format(
                            covered, total))
    raw = lines[1]
    assert raw.startswith('raw gradient: {:,} parameters: '.format(
        total - covered))
    for phrase in ('1 (no K-FAC block for PReLU: /prelu)',
                   "BatchRenormalization: its function is not "
                   "BatchNormalization's: /renorm",
                   'Linear with SpectralNormalization'):
        assert phrase in raw, (phrase, raw)
    assert sorted(layer.name for layer in opt.kfac_layers) == [
        '/conv', '/embed', '/fc', '/grouped']


def test_uncovered_links_train_on_the_raw_gradient():
    """BatchRenormalization and a Linear with SpectralNormalization (issue:
    they were told their backward was not seen) take the raw gradient."""
    x, words, t = mixed_batch()
    numpy.random.seed(6)
    model = Mixed()
    opt = KFAC(lr=0.1, momentum=0.0, damping=1e-2).setup(model)
    before = {n: p.array.copy() for n, p in model.namedparams()}
    lossfun = lambda x, w, t: F.softmax_cross_entropy(model(x, w), t)  # NOQA
    twin = model.copy(mode='copy')  # renorm's forward changes its state
    twin.cleargrads()
    F.softmax_cross_entropy(twin(x, words), t).backward()
    raw = {n: p.grad.copy() for n, p in twin.namedparams()}
    opt.update(lossfun, x, words, t)
    after = dict(model.namedparams())
    for name in ('/prelu/W', '/renorm/gamma', '/fc_sn/W'):
        numpy.testing.assert_allclose(
            after[name].array, before[name] - 0.1 * raw[name], rtol=1e-5,
            atol=1e-7, err_msg=name)
    # covered links are preconditioned: not the raw step
    assert not numpy.allclose(model.fc.W.array,
                              before['/fc/W'] - 0.1 * raw['/fc/W'])


@pytest.mark.parametrize('skip,covered', [
    (['/head_a'], ['/body', '/head_b']), (['head_a'], ['/body', '/head_b']),
    ([L.Linear], []), (['Linear'], []), ('Linear', [])])
def test_skip_layers_keeps_links_on_the_raw_gradient(skip, covered, caplog):
    numpy.random.seed(7)
    model = TwoHeads()
    with caplog.at_level(logging.INFO, logger='chainerkfac'):
        opt = KFAC(skip_layers=skip, **HP).setup(model)
    assert [layer.name for layer in opt.kfac_layers] == covered
    if covered:
        assert 'skipped by skip_layers: /head_a)' in caplog.text
    else:
        assert 'K-FAC covers 0 links (none)' in caplog.text
        assert 'skipped by skip_layers: /body, /head_a, /head_b)' in \
            caplog.text
    assert all(r.levelname == 'INFO' for r in caplog.records)
    x, t = data(0, shape=(5,), classes=3)
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x, 'head_a'), t),
               x, t)  # trains


def test_skip_layers_naming_nothing_is_an_error():
    with pytest.raises(ValueError, match='skip_layers: /nope names no link'):
        KFAC(skip_layers=['/nope']).setup(TwoHeads())


def test_lazy_model_is_reported_after_the_first_update(caplog):
    numpy.random.seed(0)
    model = LazyNet()
    with caplog.at_level(logging.INFO, logger='chainerkfac'):
        opt = KFAC(**HP).setup(model)
        assert caplog.records == []
        x, t = data(0)
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    total = sum(p.size for p in model.params())
    assert caplog.records[0].getMessage() == (
        'K-FAC covers 2 links (Convolution2D 1, Linear 1): {:,} of {:,} '
        'parameters'.format(total, total))


# -- 7: a backward pass the user drives -------------------------------------

def _net(seed):
    numpy.random.seed(seed)
    return TwoHeads()


def test_captured_pass_equals_update_with_lossfun():
    """capture() + backward + update() = update(lossfun) on the same
    batches, over refresh and stale steps."""
    a, b = _net(8), _net(8)
    hp = dict(HP, a_interval=2, g_interval=3)
    opt_a, opt_b = KFAC(**hp).setup(a), KFAC(**hp).setup(b)
    rng = numpy.random.RandomState(9)
    for _ in range(4):
        x = rng.randn(4, 5).astype(numpy.float32)
        t = rng.randint(0, 3, 4).astype(numpy.int32)
        opt_a.update(lambda: F.softmax_cross_entropy(a(x, 'head_a'), t))
        b.cleargrads()
        with opt_b.capture():
            loss = F.softmax_cross_entropy(b(x, 'head_a'), t)
            loss.backward()
        opt_b.update()
    for (name, p), (_, q) in zip(a.namedparams(), b.namedparams()):
        numpy.testing.assert_array_equal(p.array, q.array, err_msg=name)


def test_several_captured_passes_accumulate_as_accumulation_steps():
    a, b = _net(10), _net(10)
    opt_a = KFAC(accumulation_steps=2, **HP).setup(a)
    opt_b = KFAC(**HP).setup(b)
    rng = numpy.random.RandomState(11)
    for _ in range(2):
        halves = [(rng.randn(3, 5).astype(numpy.float32),
                   rng.randint(0, 3, 3).astype(numpy.int32))
                  for _ in range(2)]
        for x, t in halves:
            opt_a.update(lambda x, t: F.softmax_cross_entropy(
                a(x, 'head_a'), t), x, t)
        b.cleargrads()
        for x, t in halves:
            with opt_b.capture():
                F.softmax_cross_entropy(b(x, 'head_a'), t).backward()
        opt_b.update()
    for (name, p), (_, q) in zip(a.namedparams(), b.namedparams()):
        numpy.testing.assert_allclose(p.array, q.array, rtol=1e-6,
                                      atol=1e-8, err_msg=name)


def test_chainer_updater_without_lossfun_runs_kfac():
    """A custom updater (backward itself, then update()) as Chainer's GAN
    and BPTT examples write them."""
    model = _net(12)
    opt = KFAC(**HP).setup(model)
    rng = numpy.random.RandomState(13)
    losses = []
    for _ in range(15):
        x = rng.randn(8, 5).astype(numpy.float32)
        t = (x[:, 0] > 0).astype(numpy.int32)
        model.cleargrads()
        loss = F.softmax_cross_entropy(model(x, 'head_a'), t)
        loss.backward()
        opt.update()
        losses.append(float(loss.array))
    assert numpy.mean(losses[-5:]) < 0.5 * numpy.mean(losses[:5])


# -- distributed ------------------------------------------------------------

@pytest.fixture(scope='module')
def distributed(tmp_path_factory):
    if mpiexec() is None:
        pytest.skip('no mpiexec')
    out = tmp_path_factory.mktemp('own') / 'result.json'
    proc = subprocess.run(
        [mpiexec(), '-n', '2', '--oversubscribe', sys.executable, WORKER,
         '--out', str(out)], env=mpi_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    with open(str(out)) as f:
        return json.load(f)


@pytest.mark.parametrize('check', ['lazy_per_rank_seeds', 'unused_head',
                                   'captured', 'layer_types',
                                   'bn_one_parameter',
                                   'partial_use_is_one_error'])
def test_distributed_own_models(distributed, check):
    assert distributed[check] == 'ok', distributed[check]
