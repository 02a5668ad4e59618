"""KFAC where Chainer code used MomentumSGD: the same calls, hooks, loss
scales and snapshots, with the same meaning.

The Chainer-style checks of tests/optimizers/harness.py run here on KFAC
and in tests/mpi/drop_in_worker.py on DistributedKFAC (P = 1 and 2).
"""

import logging
import os
import subprocess
import sys
import warnings

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import optimizer_hooks
from chainer import optimizers

from chainerkfac import damping as damping_module
from chainerkfac.optimizers import KFAC
import tests
from tests.mpi import mpi_env
from tests.mpi import assert_check
from tests.mpi import mpiexec
from tests.mpi import worker_results
from tests.nets import ConvBNLinear
from tests.optimizers import harness

HP = dict(lr=0.05, momentum=0.9, damping=1e-2)
WORKER = os.path.join(tests.TESTS, 'mpi', 'drop_in_worker.py')


def conv_bn_linear(seed=0, dtype=numpy.float32):
    numpy.random.seed(seed)
    with chainer.using_config('dtype', dtype):
        return ConvBNLinear(2, 3, 5, 4)


def conv_batches(seed, count, n=6, dtype=numpy.float32):
    rng = numpy.random.RandomState(seed)
    return [(rng.randn(n, 2, 5, 5).astype(dtype),
             rng.randint(0, 4, n).astype(numpy.int32))
            for _ in range(count)]


def params(model):
    return {name: p.array.copy() for name, p in model.namedparams()}


def assert_same(a, b, rtol=0.0, atol=0.0):
    assert set(a) == set(b)
    for name in a:
        if rtol == 0.0 and atol == 0.0:
            numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            numpy.testing.assert_allclose(a[name], b[name], rtol=rtol,
                                          atol=atol, err_msg=name)


# -- factors from any backward pass ------------------------------------------

def train(mode, batches, accumulation_steps=1, loss_scale=None,
          opt_loss_scale=None, model=None, **hp):
    """KFAC on ``batches``: ``'lossfun'`` (update(lossfun)) or
    ``'backward'`` (the caller's backward, then update())."""
    model = model or conv_bn_linear()
    opt = KFAC(accumulation_steps=accumulation_steps,
               **dict(HP, **hp))
    if opt_loss_scale is not None:
        opt.loss_scaling(scale=opt_loss_scale)
    opt.setup(model)
    for i, (x, t) in enumerate(batches):
        if mode == 'lossfun':
            opt.update(lambda: F.softmax_cross_entropy(model(x), t))
        else:
            if i % accumulation_steps == 0:
                model.cleargrads()
            loss = F.softmax_cross_entropy(model(x), t)
            loss.backward(loss_scale=loss_scale)
            opt.update()
    return model, opt


@pytest.mark.parametrize('accumulation_steps', [1, 2])
def test_backward_then_update_equals_update_with_lossfun(
        accumulation_steps):
    """Over refresh and stale steps (A every 2, G every 3 updates)."""
    batches = conv_batches(1, 6 * accumulation_steps)
    a, _ = train('lossfun', batches, accumulation_steps,
                 a_interval=2, g_interval=3)
    b, opt = train('backward', batches, accumulation_steps,
                   a_interval=2, g_interval=3)
    assert opt.t == 6
    assert_same(params(a), params(b))


def test_several_backward_passes_average_factors_and_add_gradients():
    """Two backward passes before one update(): Chainer adds the
    gradients (2× the joint batch's mean gradient); the factors are those
    of the joint batch (their mean).  The first step (no momentum yet) is
    then 2× the step of update(lossfun) on the joint batch."""
    (x1, t1), (x2, t2) = harness.mlp_batches(6, 5, 2)
    joint = harness.mlp(7)
    opt_joint = KFAC(**HP).setup(joint)
    x, t = numpy.concatenate([x1, x2]), numpy.concatenate([t1, t2])
    start = params(joint)
    opt_joint.update(lambda: F.softmax_cross_entropy(joint(x), t))
    model = harness.mlp(7)
    opt = KFAC(**HP).setup(model)
    model.cleargrads()
    for xb, tb in ((x1, t1), (x2, t2)):
        F.softmax_cross_entropy(model(xb), tb).backward()
    opt.update()
    for name, p in model.namedparams():
        numpy.testing.assert_allclose(
            p.array - start[name], 2 * (joint_p(joint, name) - start[name]),
            rtol=1e-9, atol=1e-12, err_msg=name)
    for la, lb in zip(opt.kfac_layers, opt_joint.kfac_layers):
        for name in la.factor_names:
            numpy.testing.assert_allclose(la.factor(name), lb.factor(name),
                                          rtol=1e-12, atol=1e-14)


def joint_p(model, name):
    return dict(model.namedparams())[name].array


def test_evaluation_forwards_record_nothing():
    """Forwards under train=False, no_backprop_mode or enable_backprop
    False (evaluators) between training passes change nothing."""
    batches = conv_batches(2, 4)
    reference, _ = train('backward', batches, a_interval=2)
    model = conv_bn_linear()
    opt = KFAC(a_interval=2, **HP).setup(model)
    x_eval = conv_batches(3, 1)[0][0]
    for x, t in batches:
        with chainer.using_config('train', False):
            model(x_eval)
        with chainer.no_backprop_mode():
            model(x_eval)
        with chainer.using_config('enable_backprop', False):
            model(x_eval)
        model.cleargrads()
        F.softmax_cross_entropy(model(x), t).backward()
        opt.update()
    assert_same(params(reference), params(model))


def test_backward_of_an_evaluation_forward_is_one_error():
    model = conv_bn_linear()
    opt = KFAC(**HP).setup(model)
    x, t = conv_batches(4, 1)[0]
    model.cleargrads()
    with chainer.using_config('train', False):
        loss = F.softmax_cross_entropy(model(x), t)
    loss.backward()
    with pytest.raises(RuntimeError, match='train=False'):
        opt.update()


def logged_run(caplog, batches, step):
    """``step(model, opt, x, t)`` on each batch; the model and what the
    optimizer logged (logger ``chainerkfac``)."""
    model = conv_bn_linear()
    opt = KFAC(**HP).setup(model)
    with caplog.at_level(logging.INFO, logger='chainerkfac'):
        for x, t in batches:
            step(model, opt, x, t)
    return model, ' | '.join(r.getMessage() for r in caplog.records)


def test_double_backward_builds_no_factors(caplog):
    """chainer.grad with enable_double_backprop=True through the model
    (a gradient penalty) builds nothing; the loss's own backward does."""
    def step(model, opt, x, t):
        model.cleargrads()
        xv = chainer.Variable(x)
        loss = F.softmax_cross_entropy(model(xv), t)
        chainer.grad([loss], [xv], enable_double_backprop=True)
        loss.backward()
        opt.update()
    batches = conv_batches(5, 3)
    model, logged = logged_run(caplog, batches, step)
    assert_same(params(train('backward', batches)[0]), params(model))
    assert 'enable_double_backprop' in logged


def test_backward_from_a_forward_before_the_update_builds_nothing(caplog):
    """A GAN's generator loss through the discriminator after the
    discriminator's update: its backward builds no discriminator factors
    (and says so); the next update is as without it."""
    def step(model, opt, x, t):
        y = model(x)
        opt.update(lambda: F.softmax_cross_entropy(y, t))
        F.sum(y * y).backward()  # another loss, after the update
    batches = conv_batches(6, 3)
    model, logged = logged_run(caplog, batches, step)
    assert_same(params(train('lossfun', batches)[0]), params(model))
    assert 'before update' in logged


def test_factors_follow_cleared_gradients():
    """A backward pass whose gradients the caller then clears (a GAN's
    generator loss through the discriminator before the discriminator's own
    pass) leaves no factors either: the update equals one without it."""
    batches = conv_batches(15, 3)
    reference, _ = train('backward', batches, g_interval=2)
    model = conv_bn_linear()
    opt = KFAC(g_interval=2, **HP).setup(model)
    for x, t in batches:
        F.sum(model(x) ** 2).backward()  # another loss, then cleared
        model.cleargrads()
        F.softmax_cross_entropy(model(x), t).backward()
        opt.update()
    assert_same(params(reference), params(model))


def test_capture_keeps_working():
    batches = conv_batches(7, 3)
    reference, _ = train('lossfun', batches)
    model = conv_bn_linear()
    opt = KFAC(**HP).setup(model)
    for x, t in batches:
        model.cleargrads()
        with opt.capture():
            F.softmax_cross_entropy(model(x), t).backward()
        opt.update()
    assert_same(params(reference), params(model))


# -- loss scaling ------------------------------------------------------------

@pytest.mark.parametrize('how', ['optimizer_scale_plain_backward',
                                 'backward_scale_only', 'both'])
def test_loss_scale_changes_nothing(how):
    """The gradient and the G factors are divided by the scale the
    backward pass used (recorded on the parameters), as Chainer does."""
    batches = [(x.astype(numpy.float64), t)
               for x, t in conv_batches(8, 4, dtype=numpy.float64)]

    def run(**kw):
        model = conv_bn_linear(dtype=numpy.float64)
        return params(train('backward', batches, model=model,
                            g_interval=2, **kw)[0])
    plain = run()
    kw = {'optimizer_scale_plain_backward': dict(opt_loss_scale=128.0),
          'backward_scale_only': dict(loss_scale=128.0),
          'both': dict(opt_loss_scale=128.0, loss_scale=128.0)}[how]
    assert_same(plain, run(**kw), rtol=1e-12, atol=1e-15)


class OverflowAbove(chainer.FunctionNode):
    """Identity whose backward returns inf once the incoming gradient
    exceeds ``limit``: a float16 overflow at a large loss scale."""

    def __init__(self, limit):
        self.limit = limit

    def forward(self, inputs):
        return inputs[0].copy(),

    def backward(self, indexes, grad_outputs):
        gy = grad_outputs[0]
        if float(abs(gy.array).max()) > self.limit:
            return gy * numpy.inf,
        return gy,


def overflowing_loss(model, x, t):
    """Cross-entropy plus 1e-9·Σ y through :class:`OverflowAbove`: that
    term's gradient is 1e-9 × the loss scale, so the backward overflows
    whenever the scale exceeds 12."""
    y = model(x)
    probe, = OverflowAbove(12e-9).apply((y,))
    return F.softmax_cross_entropy(y, t) + 1e-9 * F.sum(probe)


def dynamic_run(opt, batches, model):
    opt.loss_scaling(interval=2)
    opt.setup(model)
    scales, changed = [], []
    for x, t in batches:
        before = params(model)
        with warnings.catch_warnings():
            # Chainer warns of each non-finite gradient
            warnings.simplefilter('ignore')
            opt.update(overflowing_loss, model, x, t)
        scales.append(opt._loss_scale)
        changed.append(any((before[n] != p.array).any()
                           for n, p in model.namedparams()))
    return scales, changed


def test_dynamic_loss_scaling_follows_chainers_rule():
    """The scale after each update and which updates are skipped equal
    MomentumSGD's on the same model and loss (Chainer's rule: a non-finite
    gradient skips the update and halves the scale; the scale grows after
    good updates); a skipped update changes no parameter."""
    batches = conv_batches(9, 10)
    sgd_scales, sgd_changed = dynamic_run(
        optimizers.MomentumSGD(lr=0.01), batches, conv_bn_linear())
    kfac_scales, kfac_changed = dynamic_run(KFAC(**HP), batches,
                                            conv_bn_linear())
    assert kfac_scales == sgd_scales
    assert kfac_changed == sgd_changed
    assert not all(kfac_changed) and any(kfac_changed)


# -- optimizer hooks act on the preconditioned gradient -----------------------

def first_step(hook=None, **hp):
    """The first update's Δw (no momentum yet) and the model before it."""
    (x, t), = harness.mlp_batches(10, 8, 1)
    model = harness.mlp(11)
    opt = KFAC(**dict(HP, **hp)).setup(model)
    if hook is not None:
        opt.add_hook(hook)
    before = params(model)
    opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    return {n: p.array - before[n] for n, p in model.namedparams()}, before


def test_gradient_clipping_bounds_the_step():
    plain, _ = first_step()
    norm = numpy.sqrt(sum((d ** 2).sum() for d in plain.values())) / 0.05
    threshold = norm / 4
    clipped, _ = first_step(optimizer_hooks.GradientClipping(threshold))
    clipped_norm = numpy.sqrt(sum((d ** 2).sum()
                                  for d in clipped.values())) / 0.05
    assert clipped_norm == pytest.approx(threshold, rel=1e-9)
    for name in plain:
        numpy.testing.assert_allclose(clipped[name], plain[name] / 4,
                                      rtol=1e-9, atol=1e-15)


def test_weight_decay_is_decoupled_from_the_curvature():
    plain, w = first_step()
    decayed, _ = first_step(optimizer_hooks.WeightDecay(0.1))
    for name in plain:
        numpy.testing.assert_allclose(decayed[name] - plain[name],
                                      -0.05 * 0.1 * w[name], rtol=1e-9,
                                      atol=1e-15)


def test_lasso_and_hard_clipping_act_on_the_direction():
    plain, w = first_step()
    lasso, _ = first_step(optimizer_hooks.Lasso(0.1))
    direction = {n: -d / 0.05 for n, d in plain.items()}
    bound = 0.5 * max(abs(d).max() for d in direction.values())
    hard, _ = first_step(optimizer_hooks.GradientHardClipping(-bound,
                                                              bound))
    for name in plain:
        numpy.testing.assert_allclose(
            lasso[name], -0.05 * (direction[name] + 0.1 * numpy.sign(
                w[name])), rtol=1e-9, atol=1e-15)
        numpy.testing.assert_allclose(
            hard[name], -0.05 * numpy.clip(direction[name], -bound, bound),
            rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize('kl_clip', [1e-6, 1e3])
def test_kl_clip_scales_the_preconditioned_gradient(kl_clip):
    """ν = min(1, sqrt(kl_clip / |η² Σ 𝒢·∇L|)) (Ba et al. 2017), with ∇L
    from a separate backward pass and 𝒢 from the unclipped step."""
    lr = HP['lr']
    plain, _ = first_step()
    (x, t), = harness.mlp_batches(10, 8, 1)
    copy_model = harness.mlp(11)
    copy_model.cleargrads()
    F.softmax_cross_entropy(copy_model(x), t).backward()
    grad = {n: p.grad for n, p in copy_model.namedparams()}
    vg = sum((-plain[n] / lr * grad[n]).sum() for n in plain)
    nu = min(1.0, numpy.sqrt(kl_clip / abs(lr * lr * vg)))
    clipped, _ = first_step(kl_clip=kl_clip)
    for name in plain:
        numpy.testing.assert_allclose(clipped[name], nu * plain[name],
                                      rtol=1e-9, atol=1e-16)
    if kl_clip < 1:
        assert nu < 0.1


# -- checks of the values given ----------------------------------------------

@pytest.mark.parametrize('kwargs,match', [
    (dict(lr=-0.1), 'lr must be'),
    (dict(momentum=1.0), 'momentum must be'),
    (dict(momentum=-0.5), 'momentum must be'),
    (dict(damping=-1), 'damping must be'),
    (dict(damping=0), 'damping must be'),
    (dict(bn_damping_ratio=0), 'bn_damping_ratio must be'),
    (dict(a_interval=0), 'a_interval must be'),
    (dict(g_interval=1.5), 'g_interval must be'),
    (dict(kl_clip=0), 'kl_clip must be'),
    (dict(kl_clip=-1e-3), 'kl_clip must be'),
])
def test_values_out_of_range_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        KFAC(**kwargs)
    assert '\n' not in str(info.value)


def test_a_value_changed_between_updates_is_checked_before_use():
    model = conv_bn_linear()
    opt = KFAC(**HP).setup(model)
    (x, t), = conv_batches(11, 1)
    opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    before = params(model)
    opt.lr = -1
    with pytest.raises(ValueError, match='lr must be a number >= 0, got -1'):
        opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    assert_same(before, params(model))
    # corrected, the next update is as if the refused call never happened
    (x2, t2), = conv_batches(12, 1)
    opt.lr = HP['lr']
    opt.update(lambda: F.softmax_cross_entropy(model(x2), t2))
    reference, _ = train('lossfun', [(x, t), (x2, t2)])
    assert_same(params(reference), params(model))


def test_setup_of_a_non_link_is_chainers_type_error():
    with pytest.raises(TypeError, match='optimization target must be a link'):
        KFAC().setup('x')


# -- dtype -------------------------------------------------------------------

class EveryLayer(chainer.Chain):
    def __init__(self):
        super(EveryLayer, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(2, 4, 3, pad=1)
            self.grouped = L.Convolution2D(4, 4, 3, pad=1, groups=2)
            self.dilated = L.DilatedConvolution2D(4, 4, 3, pad=2, dilate=2)
            self.deconv = L.Deconvolution2D(4, 2, 3, pad=1)
            self.bn = L.BatchNormalization(2)
            self.embed = L.EmbedID(5, 3)
            self.fc = L.Linear(2 * 5 * 5 + 3, 3)

    def forward(self, x, ids):
        h = F.relu(self.conv(x))
        h = F.relu(self.dilated(F.relu(self.grouped(h))))
        h = F.relu(self.bn(self.deconv(h)))
        e = F.sum(self.embed(ids), axis=1)
        return self.fc(F.concat([F.reshape(h, (len(x), -1)), e]))


@pytest.mark.parametrize('bn_fisher', ['diagonal', 'full', 'unit'])
@pytest.mark.parametrize('inverse_method', ['solve', 'explicit'])
def test_float32_model_keeps_no_float64_state(bn_fisher, inverse_method):
    """Factors, scales, inverses (Cholesky factors, reciprocals, explicit
    inverses) and π of every layer type stay float32."""
    numpy.random.seed(12)
    model = EveryLayer()
    opt = KFAC(bn_fisher=bn_fisher, inverse_method=inverse_method,
               **HP).setup(model)
    opt.loss_scaling(scale=64.0)
    rng = numpy.random.RandomState(13)
    for _ in range(2):
        x = rng.randn(4, 2, 5, 5).astype(numpy.float32)
        ids = rng.randint(0, 5, (4, 2)).astype(numpy.int32)
        t = rng.randint(0, 3, 4).astype(numpy.int32)
        opt.update(lambda: F.softmax_cross_entropy(model(x, ids), t))
    assert len(opt.kfac_layers) == 7
    for layer in opt.kfac_layers:
        arrays = dict(layer.state)
        arrays.update(('explicit ' + k, v)
                      for k, v in layer._explicit.items())
        for key, value in arrays.items():
            assert value is not None, (layer.name, key)
            assert value.dtype == numpy.float32, (layer.name, key,
                                                  value.dtype)
        if 'A' in layer.factor_names and layer.factor('A').ndim == 2:
            pi = damping_module.pi(layer.factor('A'), layer.factor('G'))
            assert pi.dtype == numpy.float32
            for value in damping_module.kronecker_damping(
                    layer.factor('A'), layer.factor('G'), 1e-2):
                assert value.dtype == numpy.float32
    for p in model.params():
        assert p.array.dtype == numpy.float32
        assert p.update_rule.state['w_prev'].dtype == numpy.float32


# -- the report --------------------------------------------------------------

def test_coverage_report_seen_after_basicconfig_before_import():
    code = '\n'.join([
        'import logging',
        'logging.basicConfig(level=logging.INFO)',
        'import chainerkfac',
        'import chainer.links as L',
        'opt = chainerkfac.KFAC().setup(L.Linear(3, 2))',
        'print(repr(opt.coverage))',
    ])
    proc = subprocess.run([sys.executable, '-c', code],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120,
                          env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'INFO:chainerkfac:K-FAC covers 1 link (Linear 1): 8 of 8 ' \
        'parameters' in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.strip() == \
        'K-FAC covers 1 link (Linear 1): 8 of 8 parameters'


# -- Chainer's optimizer tests, on KFAC ---------------------------------------

@pytest.mark.parametrize('mode', ['lossfun', 'backward'])
@pytest.mark.parametrize('loss_scaling', [False, 'static', 'dynamic'])
@pytest.mark.parametrize('dtype', [numpy.float16, numpy.float32,
                                   numpy.float64])
def test_linear_model(dtype, loss_scaling, mode):
    accuracy = harness.train_linear_model(KFAC, dtype, loss_scaling, mode)
    assert accuracy > 0.9


@pytest.mark.parametrize('mode', ['lossfun', 'backward'])
def test_linear_model_lazily_sized(mode):
    accuracy = harness.train_linear_model(KFAC, numpy.float32, False, mode,
                                          placeholder=True)
    assert accuracy > 0.9


def test_initialize():
    harness.check_initialize(KFAC)


def test_serialize_round_trip():
    harness.check_serialize_round_trip(KFAC)


@pytest.mark.parametrize('hook', sorted(harness.HOOKS))
def test_each_hook_trains_and_matches_its_meaning_on_the_direction(hook):
    """Each hook, on 3 updates: the parameters move and stay finite, and
    the hook changes the update (it acts)."""
    batches = harness.mlp_batches(14, 8, 3)
    plain = harness.run_with_hook(KFAC, None, batches)
    hooked = harness.run_with_hook(KFAC, hook, batches)
    assert all(numpy.isfinite(v).all() for v in hooked[-1].values())
    assert any(not numpy.array_equal(hooked[-1][n], plain[-1][n])
               for n in plain[-1])


# -- DistributedKFAC: the same checks on P = 1 and 2 --------------------------

_worker = {}


def results_for(size, tmp_path_factory):
    if size not in _worker:
        _worker[size] = worker_results(
            WORKER, size,
            tmp_path_factory.mktemp('drop_in{}'.format(size)) / 'r.json')
    return _worker[size]


WORKER_CHECKS = (
    ['linear_model_{}_{}_{}'.format(d, s, m)
     for d in ('float16', 'float32', 'float64')
     for s in ('none', 'static', 'dynamic')
     for m in ('lossfun', 'backward')]
    + ['initialize', 'serialize_round_trip', 'backward_equals_lossfun',
       'dynamic_skip_agreed', 'kl_clip_equals_joint_batch']
    + ['hook_{}_equals_joint_batch'.format(h) for h in sorted(harness.HOOKS)])


@pytest.mark.skipif(mpiexec() is None, reason='no mpiexec')
@pytest.mark.parametrize('size', [1, 2])
@pytest.mark.parametrize('check', WORKER_CHECKS)
@pytest.mark.slow
def test_distributed(size, check, tmp_path_factory):
    assert_check(results_for(size, tmp_path_factory), check)


# -- the same user code on MomentumSGD and KFAC, side by side ----------------

SIDE_BY_SIDE = {'MomentumSGD': lambda: optimizers.MomentumSGD(lr=0.05),
                'KFAC': lambda: KFAC(**HP)}


@pytest.mark.parametrize('name', sorted(SIDE_BY_SIDE))
def test_same_user_code_same_meaning_on_momentum_sgd_and_kfac(name):
    """One custom-updater loop, written once: a loss scale (the optimizer's
    with a plain backward, or the backward's own) changes nothing, and two
    backward passes before one update() step on the sum of their gradients
    (twice the joint batch's mean-loss step, on the first update)."""
    (x1, t1), (x2, t2) = harness.mlp_batches(16, 5, 2)

    def run(passes, opt_scale=None, backward_scale=None):
        model = harness.mlp(17)
        opt = SIDE_BY_SIDE[name]()
        if opt_scale is not None:
            opt.loss_scaling(scale=opt_scale)
        opt.setup(model)
        start = params(model)
        model.cleargrads()
        for xb, tb in passes:
            F.softmax_cross_entropy(model(xb), tb).backward(
                loss_scale=backward_scale)
        opt.update()
        return {n: p.array - start[n] for n, p in model.namedparams()}
    plain = run([(x1, t1)])
    assert_same(plain, run([(x1, t1)], opt_scale=128.0), rtol=1e-12,
                atol=1e-15)
    assert_same(plain, run([(x1, t1)], backward_scale=128.0), rtol=1e-12,
                atol=1e-15)
    two = run([(x1, t1), (x2, t2)])
    joint = run([(numpy.concatenate([x1, x2]), numpy.concatenate([t1, t2]))])
    assert_same(two, {n: 2 * d for n, d in joint.items()}, rtol=1e-9,
                atol=1e-12)
