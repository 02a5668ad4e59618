"""Optimizer checks in the shape of Chainer's own optimizer tests, written
for this project: a linear classifier in float16/32/64 trained with no,
static or dynamic loss scaling, by ``update(lossfun)`` or by the caller's
``loss.backward(); update()``; the state after setup, ``new_epoch`` and a
serialization round trip; Chainer's optimizer hooks.

Each check takes ``make_opt(**hyperparameters)`` (``KFAC`` in
tests/optimizers/test_drop_in.py, ``DistributedKFAC`` on P = 1 and 2 in
tests/mpi/drop_in_worker.py) and raises AssertionError when it fails.
"""

import io

import numpy

import chainer
import chainer.functions as F
from chainer import initializers
import chainer.links as L
from chainer import optimizer_hooks
from chainer import serializers

from chainerkfac.optimizers import kfac as kfac_module

UNITS = 10
BATCH = 32
UPDATES = 100

#: hook name -> a fresh Chainer optimizer hook
HOOKS = {
    'WeightDecay': lambda: optimizer_hooks.WeightDecay(1e-2),
    'Lasso': lambda: optimizer_hooks.Lasso(1e-3),
    'GradientClipping': lambda: optimizer_hooks.GradientClipping(0.5),
    'GradientHardClipping': lambda: optimizer_hooks.GradientHardClipping(
        -0.02, 0.02),
}


class LinearTask(object):
    """Chainer's linear-model task: 10 inputs, 2 classes split by a random
    hyperplane (the same on every process); batches from ``seed``."""

    def __init__(self, dtype, seed, placeholder=False):
        self.dtype = numpy.dtype(dtype)
        truth = numpy.random.RandomState(0)
        self.w = truth.uniform(-1, 1, (UNITS, 1))
        self.b = truth.uniform(-1, 1, (1,))
        self.rng = numpy.random.RandomState(seed)
        init = numpy.random.RandomState(1)
        weight = initializers.HeNormal(1 / numpy.sqrt(2), self.dtype,
                                       rng=init)
        self.model = L.Linear(None if placeholder else UNITS, 2,
                              initialW=weight,
                              initial_bias=initializers.Constant(
                                  0, self.dtype))

    def batch(self):
        x = self.rng.uniform(-1, 1, (BATCH, UNITS))
        t = ((x.dot(self.w) + self.b).ravel() < 0).astype(numpy.int32)
        return x.astype(self.dtype), t

    def loss(self, x, t):
        return F.softmax_cross_entropy(self.model(x), t)

    def accuracy(self):
        x, t = self.batch()
        with chainer.using_config('train', False), \
                chainer.no_backprop_mode():
            return float(F.accuracy(self.model(x), t).array)


def set_loss_scaling(opt, loss_scaling):
    if loss_scaling == 'dynamic':
        opt.loss_scaling()
    elif loss_scaling == 'static':
        opt.loss_scaling(scale=10.0)
    else:
        assert loss_scaling is False


def step(opt, model, lossfun, mode, *args):
    """One update as Chainer code writes it: ``update(lossfun, ...)``, or
    the caller's backward then ``update()``."""
    if mode == 'lossfun':
        opt.update(lossfun, *args)
    else:
        model.cleargrads()
        loss = lossfun(*args)
        loss.backward(loss_scale=getattr(opt, '_loss_scale', None))
        opt.update()


def train_linear_model(make_opt, dtype, loss_scaling, mode, seed=2,
                       placeholder=False):
    """Chainer's ``test_linear_model``: the accuracy after 100 updates."""
    task = LinearTask(dtype, seed, placeholder)
    opt = make_opt(lr=0.1, damping=1e-2)
    opt.setup(task.model)
    set_loss_scaling(opt, loss_scaling)
    for _ in range(UPDATES):
        step(opt, task.model, task.loss, mode, *task.batch())
    return task.accuracy()


def check_initialize(make_opt):
    """Chainer's ``test_initialize``, and the state after setup."""
    task = LinearTask(numpy.float32, 3)
    opt = make_opt()
    try:
        opt.setup('xxx')
    except TypeError as e:
        assert 'optimization target must be a link' in str(e), e
    else:
        raise AssertionError('setup of a non-link was accepted')
    opt.setup(task.model)
    assert opt.t == 0 and opt.epoch == 0
    for param in task.model.params():
        assert isinstance(param.update_rule, kfac_module.KFACRule)
        assert param.update_rule.state is None  # made at the first update
    opt.new_epoch()
    assert opt.epoch == 1
    opt.use_auto_new_epoch = True
    opt.new_epoch(auto=True)
    assert opt.epoch == 2


def _params(model):
    return {name: p.array.copy() for name, p in model.namedparams()}


def check_serialize_round_trip(make_opt, seed=4):
    """Saved after 3 updates (stale intervals) and loaded into a fresh
    model and optimizer, the next 3 updates equal those of the original."""
    hp = dict(lr=0.1, damping=1e-2, a_interval=2, g_interval=3)
    first = LinearTask(numpy.float64, seed)
    opt = make_opt(**hp).setup(first.model)
    for _ in range(3):
        opt.update(first.loss, *first.batch())
    saved, model_saved = io.BytesIO(), io.BytesIO()
    serializers.save_npz(saved, opt)
    serializers.save_npz(model_saved, first.model)
    rng_state = first.rng.get_state()
    for _ in range(3):
        opt.update(first.loss, *first.batch())

    second = LinearTask(numpy.float64, seed + 100)
    model_saved.seek(0)
    serializers.load_npz(model_saved, second.model)
    opt2 = make_opt(**hp).setup(second.model)
    saved.seek(0)
    serializers.load_npz(saved, opt2)
    second.rng.set_state(rng_state)
    for _ in range(3):
        opt2.update(second.loss, *second.batch())
    assert opt2.t == opt.t == 6
    a, b = _params(first.model), _params(second.model)
    for name in a:
        numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)


def run_with_hook(make_opt, hook_name, batches, model_seed=5):
    """The parameters before and after each of ``batches`` (float64 MLP),
    updated with the hook ``hook_name`` (None: without)."""
    model = mlp(model_seed)
    opt = make_opt(lr=0.1, momentum=0.9, damping=1e-2).setup(model)
    if hook_name is not None:
        opt.add_hook(HOOKS[hook_name]())
    trajectory = [_params(model)]
    for x, t in batches:
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
        trajectory.append(_params(model))
    return trajectory


class MLP(chainer.Chain):
    def __init__(self):
        super(MLP, self).__init__()
        with self.init_scope():
            self.l1 = L.Linear(6, 8)
            self.l2 = L.Linear(8, 3)

    def forward(self, x):
        return self.l2(F.tanh(self.l1(x)))


def mlp(seed):
    """A float64 MLP drawn from ``seed``."""
    with chainer.using_config('dtype', numpy.float64):
        rng = numpy.random.RandomState(seed)
        model = MLP()
        for p in model.params():
            p.array[...] = rng.randn(*p.shape) * 0.5
    return model


def mlp_batches(seed, n, count):
    rng = numpy.random.RandomState(seed)
    return [(rng.randn(n, 6), rng.randint(0, 3, n).astype(numpy.int32))
            for _ in range(count)]
