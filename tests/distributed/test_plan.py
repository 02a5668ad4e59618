"""The plan of distributed K-FAC (chainerkfac.distributed.plan): one plan
for the optimizer and the scripts."""

import logging
import os
import subprocess
import sys

import numpy
import pytest

import tests

import chainerkfac  # noqa: F401  first: makes Chainer importable
import chainer
import chainer.functions as F
import chainer.links as L

from chainerkfac.distributed import assignment
from chainerkfac.distributed import plan as plan_module
from chainerkfac.links import DigitsCNN
from chainerkfac.optimizers import DistributedKFAC
from chainerkfac.optimizers import KFAC

ROOT = tests.ROOT


class WithBias(chainer.Chain):
    """A Linear and a BN link (K-FAC layers) plus a raw parameter."""

    def __init__(self):
        super(WithBias, self).__init__()
        with self.init_scope():
            self.fc = L.Linear(6, 4)
            self.bn = L.BatchNormalization(4)
            self.bias = chainer.Parameter(numpy.zeros(4, numpy.float32))

    def forward(self, x):
        return self.bn(self.fc(x)) + self.bias


def _kfac(model, **kwargs):
    return KFAC(log_coverage=False, **kwargs).setup(model)


def test_other_block_holds_the_parameters_of_no_layer():
    model = WithBias()
    opt = _kfac(model)
    blocks = plan_module.make_blocks(opt.kfac_layers, model)
    assert [b.name for b in blocks] == \
        [layer.name for layer in opt.kfac_layers] + ['(other)']
    assert blocks[-1].layer is None
    assert [id(p) for p in blocks[-1].params] == [id(model.bias)]
    assert [b.index for b in blocks] == list(range(len(blocks)))
    # every parameter in exactly one block
    ids = sorted(id(p) for b in blocks for p in b.params)
    assert ids == sorted(id(p) for p in model.params())
    # costs: the layers' FLOPs; '(other)' the values it carries
    plan = plan_module.make_plan(opt.kfac_layers, model, 2)
    assert plan.costs[-1] == model.bias.size
    for layer, cost in zip(opt.kfac_layers, plan.costs):
        assert cost == assignment.layer_cost(layer.factor_shapes())


def test_no_other_block_when_every_parameter_is_covered():
    model = DigitsCNN()
    opt = _kfac(model)
    names = plan_module.make_plan(opt.kfac_layers, model, 3).names
    assert names == [layer.name for layer in opt.kfac_layers]


def _distributed_plan_lines(model, x, t):
    """The plan DistributedKFAC makes on one process, from its log."""
    import chainermn
    from mpi4py import MPI
    comm = chainermn.create_communicator('naive', mpi_comm=MPI.COMM_SELF)
    opt = DistributedKFAC(comm, lr=0.01, log_coverage=False).setup(model)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('chainerkfac')
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    plans = [r.getMessage() for r in records
             if 'max/lower-bound' in r.getMessage()]
    assert len(plans) == 1, [r.getMessage() for r in records]
    assert plans[0].splitlines() == opt.plan_lines
    return opt


def test_optimizer_logs_the_library_plan():
    pytest.importorskip('mpi4py')
    numpy.random.seed(0)
    model = WithBias()
    x = numpy.random.rand(3, 6).astype(numpy.float32)
    t = numpy.array([0, 1, 2], numpy.int32)
    opt = _distributed_plan_lines(model, x, t)
    fresh = WithBias()  # the plan depends on the shapes only
    expected = plan_module.make_plan(_kfac(fresh).kfac_layers, fresh, 1)
    assert opt.plan_lines == expected.lines()
    assert '(other)' in '\n'.join(opt.plan_lines)
    assert [b.name for b in opt.blocks] == expected.names


def test_script_prints_the_optimizer_plan():
    """scripts/plan_assignment.py prints what the optimizer's library plan
    is for the same model and process count."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
               os.environ.get('PYTHONPATH', ''))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'plan_assignment.py'),
         '--model', 'digits', '--bn-fisher', 'full', '--size', '3'],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, universal_newlines=True,
        check=True).stdout
    opt = _kfac(DigitsCNN(), bn_fisher='full')
    expected = plan_module.make_plan(opt.kfac_layers, opt.target, 3)
    assert out.strip().splitlines() == expected.lines()
