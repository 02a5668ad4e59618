"""MPI worker of tests/optimizers/test_distributed_kfac.py:
``mpiexec -n P python worker.py``.

Runs a list of checks of ``DistributedKFAC`` on P processes in one launch.
Every rank runs the same distributed computation; values are gathered to
rank 0, which evaluates the checks and writes ``{check: "ok" | message}`` as
JSON to ``--out``.  A failed comparison is recorded (the other checks still
run); any other exception ends the job through ChainerMN's global except hook
(MPI_Abort on every rank), never a hang.

``--fault R`` instead trains and raises on rank R in the middle of training,
relying on the except hook that ``DistributedKFAC`` installs.
"""

import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import argparse  # NOQA: E402
import contextlib  # NOQA: E402
import copy  # NOQA: E402
import json  # NOQA: E402
import traceback  # NOQA: E402

import chainerkfac  # noqa: F401, E402  first: makes Chainer importable
import chainermn  # NOQA: E402
from chainermn import global_except_hook  # NOQA: E402

import chainer  # NOQA: E402
import chainer.functions as F  # NOQA: E402
import chainer.links as L  # NOQA: E402
import numpy as np  # NOQA: E402

from chainerkfac.distributed import communicator as communicator_module  # NOQA: E402
from chainerkfac.distributed import packing  # NOQA: E402
from chainerkfac.distributed import plan as plan_module  # NOQA: E402
from chainerkfac import scaling  # NOQA: E402
from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402
from chainerkfac.optimizers import KFAC  # NOQA: E402

from tests import nets  # NOQA: E402 (the checkout on PYTHONPATH)
from tests import reference as ref  # NOQA: E402




# -- models (forward(x, tape=None) routes K-FAC links through ref.run) -------

def _init(model, seed):
    """Rank-dependent values: the first update must broadcast rank 0's."""
    return nets.randomize(model, seed)


class ConvNet(chainer.Chain):
    """conv(2->4, bias) -> relu -> conv(4->6, /2) -> Bias -> relu -> fc.

    ``L.Bias`` is no K-FAC link: its parameter travels in the pseudo-block.
    """

    in_shape = (2, 6, 6)

    def __init__(self, dtype):
        super(ConvNet, self).__init__()
        with chainer.using_config('dtype', dtype), self.init_scope():
            self.conv1 = L.Convolution2D(2, 4, 3, pad=1)
            self.conv2 = L.Convolution2D(4, 6, 3, stride=2, nobias=True)
            self.bias = L.Bias(shape=(6,))
            self.fc = L.Linear(6 * 2 * 2, 3)

    def forward(self, x, tape=None):
        h = F.relu(ref.run(tape, self.conv1, x))
        h = F.relu(self.bias(ref.run(tape, self.conv2, h)))
        return ref.run(tape, self.fc, h)


class MLP(chainer.Chain):
    """Two Linear layers: fewer layers than ranks at P = 4."""

    in_shape = (5,)

    def __init__(self, dtype):
        super(MLP, self).__init__()
        with chainer.using_config('dtype', dtype), self.init_scope():
            self.l1 = L.Linear(5, 4)
            self.l2 = L.Linear(4, 3, nobias=True)

    def forward(self, x, tape=None):
        return ref.run(tape, self.l2, F.tanh(ref.run(tape, self.l1, x)))


class MLP3(chainer.Chain):
    """Three Linear layers: fewer layers than ranks at P = 4 and 8."""

    in_shape = (6,)

    def __init__(self, dtype):
        super(MLP3, self).__init__()
        with chainer.using_config('dtype', dtype), self.init_scope():
            self.l1 = L.Linear(6, 5)
            self.l2 = L.Linear(5, 4)
            self.l3 = L.Linear(4, 3)

    def forward(self, x, tape=None):
        h = F.tanh(ref.run(tape, self.l1, x))
        return ref.run(tape, self.l3, F.tanh(ref.run(tape, self.l2, h)))


BNNet = nets.ConvBNConvNet


MODELS = {'conv': ConvNet, 'mlp': MLP, 'mlp3': MLP3, 'bn': BNNet}


def make_model(kind, dtype, rank):
    return _init(MODELS[kind](dtype), seed=1000 + rank)


def global_batch(model_cls, step, n, dtype, scale=1.0):
    rng = np.random.RandomState(100 + step)
    x = (scale * rng.standard_normal((n,) + model_cls.in_shape)).astype(dtype)
    t = rng.randint(0, 3, n).astype(np.int32)
    return x, t


def lossfun_of(model, reduce='mean', loss_scale=1.0):
    def lossfun(x, t):
        if reduce == 'mean':
            return loss_scale * F.softmax_cross_entropy(model(x), t)
        return loss_scale * F.sum(
            F.softmax_cross_entropy(model(x), t, reduce='no'))
    return lossfun


def params_of(model):
    return {name: np.array(p.array) for name, p in model.namedparams()}


def intervals_of(opt):
    """``{(layer, name): interval}`` of every factor, as this process's
    refresh rule has it."""
    return {(layer.name, name): opt.refresh_rule.interval(layer, name)
            for layer in opt.kfac_layers for name in layer.factor_names}


def owned_factors(opt):
    """``{(layer, name): dense factor}`` of the layers this rank owns."""
    return {(layer.name, name): np.array(layer.factor(name), np.float64)
            for layer in opt.owned_layers() for name in layer.factor_names
            if layer.state.get(name) is not None}


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def close(actual, expected, rtol, what):
    """assert_allclose with atol = rtol·max|expected| in float32 (the update
    w - ηd + m(w - w_prev) cancels terms of the weights' magnitude, so float32
    rounding is absolute at that scale), rtol·1e-3·max|expected| in float64."""
    floor = 1.0 if np.asarray(expected).dtype == np.float32 else 1e-3
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    atol = rtol * floor * max(float(np.abs(expected).max()), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol,
                               err_msg=what)


class GroupedOverMpi(communicator_module.NcclCommunicator):
    """:class:`NcclCommunicator`'s layout (one rooted reduce per non-empty
    segment, one broadcast per non-empty segment) with its three NCCL
    primitives done by MPI on host arrays: what runs on GPUs, minus NCCL."""

    def __init__(self, comm):
        self.comm = comm
        self.mpi_comm = comm.mpi_comm
        self.rank = comm.rank
        self.size = comm.size
        self.calls = []

    def group(self):
        return contextlib.nullcontext()

    def reduce(self, send, recv, root):
        self.calls.append(('reduce', root, send.size))
        mpi_type = communicator_module._mpi_type(send.dtype)
        self.mpi_comm.Reduce(
            [np.ascontiguousarray(send), mpi_type],
            None if recv is None else [recv, mpi_type],
            op=communicator_module._sum_op(send.dtype), root=root)

    def broadcast(self, buf, root):
        self.calls.append(('broadcast', root, buf.size))
        self.mpi_comm.Bcast(
            [buf, communicator_module._mpi_type(buf.dtype)], root=root)

    allreduce_max = communicator_module.MpiCommunicator.allreduce_max


class Run(object):
    """A distributed run of ``steps`` updates, plus what rank 0 needs.

    ``grouped``: stages 3 and 6 through :class:`GroupedOverMpi`."""

    def __init__(self, comm, kind, dtype, hp, steps=3, b=4, k=1, single=True,
                 reduce='mean', loss_scale=1.0, x_scale=1.0, grouped=False):
        size, rank = comm.size, comm.rank
        model = make_model(kind, dtype, rank)
        self.initial = copy.deepcopy(model)  # rank 0's: what all start from
        opt = DistributedKFAC(comm, print_plan=(kind == 'conv' and rank == 0
                                                and k == 1 and not grouped),
                              loss_reduction=reduce, accumulation_steps=k,
                              **hp)
        if grouped:  # before setup, which broadcasts rank 0's parameters
            opt.kfac_comm = GroupedOverMpi(comm)
        opt.setup(model)
        single_model = copy.deepcopy(model) if single and rank == 0 else None
        single_opt = KFAC(loss_reduction=reduce, **hp).setup(single_model) \
            if single_model is not None else None
        lossfun = lossfun_of(model, reduce, loss_scale)
        self.history = []       # per step: gathered params (rank 0)
        self.counters = []      # per step: this rank's counters
        self.factors = []       # per step: gathered owned factors (rank 0)
        self.single_factors = []
        self.single_params = []
        self.intervals = []     # per step: gathered refresh intervals
        self.single_intervals = []
        for step in range(steps):
            x, t = global_batch(MODELS[kind], step, size * k * b, dtype,
                                x_scale)
            mine = slice(rank * k * b, (rank + 1) * k * b)
            xl, tl = x[mine], t[mine]
            for i in range(k):
                before = params_of(model)
                opt.update(lossfun, xl[i * b:(i + 1) * b],
                           tl[i * b:(i + 1) * b])
                if i < k - 1 and step > 0:
                    after = params_of(model)
                    if not all(np.array_equal(before[n], after[n])
                               for n in before):  # not an AssertionError:
                        raise RuntimeError('stepped mid-accumulation')
            self.counters.append(dict(opt.comm_counters))
            self.history.append(comm.gather_obj(params_of(model)))
            self.factors.append(comm.gather_obj(owned_factors(opt)))
            self.intervals.append(comm.gather_obj(intervals_of(opt)))
            if single_opt is not None:
                single_opt.update(lossfun_of(single_model, reduce,
                                             loss_scale), x, t)
                self.single_params.append(params_of(single_model))
                self.single_intervals.append(intervals_of(single_opt))
                self.single_factors.append({
                    (layer.name, name): np.array(layer.factor(name))
                    for layer in single_opt.kfac_layers
                    for name in layer.factor_names})
        self.all_counters = comm.gather_obj(dict(opt.comm_counters))
        self.opt = opt
        self.model = model
        self.size = size

    def check_identical(self):
        """Every rank holds bitwise the same parameters after every step."""
        for step, gathered in enumerate(self.history):
            for r, params in enumerate(gathered):
                for name, value in params.items():
                    assert np.array_equal(value, gathered[0][name]), \
                        'step {}: rank {} differs on {}'.format(step, r, name)

    def check_single(self, rtol, factor_rtol=None):
        """Parameters (and owners' factors) equal single-process KFAC."""
        self.check_identical()
        for step, (gathered, expected) in enumerate(
                zip(self.history, self.single_params)):
            for name in expected:
                close(gathered[0][name], expected[name], rtol,
                      'step {} {}'.format(step, name))
        factor_rtol = factor_rtol or rtol
        for step, (gathered, expected) in enumerate(
                zip(self.factors, self.single_factors)):
            seen = set()
            for per_rank in gathered:
                for key, value in per_rank.items():
                    close(value, expected[key], factor_rtol,
                          'step {} factor {}'.format(step, key))
                    seen.add(key)
            assert seen == set(expected), (seen, set(expected))


# -- the distributed reference (Algorithm 1 from tests/reference.py) ---------

class DistributedReference(ref.ReferenceKFAC):
    """ReferenceKFAC with per-rank factors and gradients averaged."""

    def __init__(self, model, hp, bn_fisher):
        keys = ('lr', 'momentum', 'damping', 'bn_damping_ratio', 'a_interval',
                'g_interval', 'weight_rescaling')
        super(DistributedReference, self).__init__(
            model, bn_fisher=bn_fisher,
            **{key: hp[key] for key in keys if key in hp})

    def update(self, batches):
        caps = [ref.capture(self.model, x, t, 'mean') for x, t in batches]
        P = float(len(caps))
        grads = {name: sum(c[0][name] for c in caps) / P
                 for name in caps[0][0]}

        def mean_factors(name, mode='full'):
            facs = [ref.layer_factors(c[1][name], self.bn_fisher)
                    for c in caps]
            return {k: sum(f[k] for f in facs) / P for k in facs[0]}

        self.step(grads, caps[0][1], caps[0][2], mean_factors)


# -- the checks --------------------------------------------------------------

HP = dict(lr=0.05, momentum=0.9, damping=1e-2, a_interval=2, g_interval=3,
          weight_rescaling=True)  # t=1: stale step; t=2: A only


def check_equivalence(comm, dtype, rtol, kind='conv', reduce='mean',
                      grouped=False):
    run = Run(comm, kind, dtype, HP, reduce=reduce, grouped=grouped)
    calls = comm.gather_obj(run.opt.kfac_comm.calls if grouped else None)
    if comm.rank != 0:
        return
    run.check_single(rtol)
    c = run.counters
    # the stale step (t=1) sends gradients only; t=2 sends the A factors
    assert c[1]['factor_bytes'] == c[0]['factor_bytes'], c
    assert c[1]['gradient_bytes'] == 2 * c[0]['gradient_bytes'], c
    assert 0 < c[2]['factor_bytes'] - c[1]['factor_bytes'] \
        < c[0]['factor_bytes'], c
    # one collective call per stage per update (one dtype)
    for step, counters in enumerate(c):
        assert counters['reduce_scatter_calls'] == step + 1, counters
        assert counters['all_gather_calls'] == step + 1, counters
    # stage 6 sends every parameter exactly once over all ranks
    n = sum(p.size for p in run.model.params())
    assert sum(x['preconditioned_elements'] for x in run.all_counters) \
        == 3 * n
    plan = run.opt.assignment
    assert not plan.redundant, plan.owners
    blocks = len(run.opt.blocks)
    idle = [r for r in range(comm.size) if not plan.layers_of(r)]
    assert len(idle) == max(0, comm.size - blocks), (plan.owners, idle)
    if grouped:
        # one reduce per owner and update, one broadcast per owner of a
        # block: ranks that own nothing take no call of their own; first,
        # one broadcast of rank 0's parameters (one dtype)
        owners = [r for r in range(comm.size) if plan.layers_of(r)]
        for per_rank in calls:
            reduces = [root for kind_, root, _ in per_rank
                       if kind_ == 'reduce']
            broadcasts = [root for kind_, root, _ in per_rank
                          if kind_ == 'broadcast']
            assert reduces == owners * 3, (reduces, owners)
            assert broadcasts == [0] + owners * 3, (broadcasts, owners)
    if kind == 'conv':
        names = [b.name for b in run.opt.blocks]
        assert names[-1] == '(other)', names
        assert [p.name for p in run.opt.blocks[-1].params] == ['b']
    # the library plan of a fresh model (what the scripts print) is the
    # optimizer's
    fresh = MODELS[kind](dtype)
    fresh_layers = KFAC(log_coverage=False).setup(fresh).kfac_layers
    expected = plan_module.make_plan(fresh_layers, fresh, comm.size)
    assert run.opt.plan_lines == expected.lines(), run.opt.plan_lines


def check_adaptive_refresh(comm):
    """refresh='adaptive': the owners' decisions reach every rank (the
    same intervals everywhere after every update), equal to single-process
    K-FAC's on the joint batch, and so do the parameters."""
    hp = dict(HP, refresh='adaptive', refresh_tolerance=0.35, max_interval=4)
    run = Run(comm, 'conv', np.float64, hp, steps=8)
    if comm.rank != 0:
        return
    run.check_single(1e-9)
    seen = set()
    for step, (gathered, single) in enumerate(zip(run.intervals,
                                                  run.single_intervals)):
        for r, intervals in enumerate(gathered):
            assert intervals == single, (step, r, intervals, single)
        seen.update(single.values())
    # the rule both doubled and reset some interval
    assert len(seen) > 1, seen
    assert run.opt.factor_builds < 8 * sum(
        len(layer.factor_names) for layer in run.opt.kfac_layers)


def check_sampled_fisher(comm, kind):
    """fisher='sampled': P processes draw the labels one process draws
    for the joint batch, so the updates are single-process K-FAC's."""
    run = Run(comm, kind, np.float64, dict(HP, fisher='sampled'))
    if comm.rank != 0:
        return
    run.check_single(1e-9)


def check_plan_bytes(comm):
    """Stage-3/6 bytes of a 3-layer MLP: the optimizer's counters against
    the scaling model's counts for the same plan, and the updates against
    single-process KFAC; returns this launch's per-process figures
    (compared across P by the test)."""
    run = Run(comm, 'mlp3', np.float64, dict(HP, a_interval=1,
                                             g_interval=1), steps=2)
    opt = run.opt
    layers = [scaling.LayerInfo(b.name, sum(p.size for p in b.params),
                                tuple(b.layer.factor_shapes().values()))
              for b in opt.blocks]
    packed64 = scaling.Communication(8, True, 8)
    stage3 = scaling.stage3_counts(opt.assignment, layers, packed64, True)
    stage6 = scaling.stage6_counts(opt.assignment, layers, 8)
    mine = run.counters[0]
    # this process's send buffer holds every segment; its own is its receipt
    assert mine['gradient_bytes'] + mine['factor_bytes'] == sum(stage3), \
        (mine, stage3)
    assert mine['preconditioned_bytes'] == stage6[comm.rank], \
        (mine, stage6)
    received = comm.gather_obj(stage3[comm.rank])
    sent = comm.gather_obj(run.counters[-1])
    if comm.rank != 0:
        return None
    run.check_single(1e-9)  # and equal to single-process KFAC
    return {'owners': [list(o) for o in opt.assignment.owners],
            'stage3_sent': [c['gradient_bytes'] + c['factor_bytes']
                            for c in sent],
            'stage3_received': received,
            'stage6_sent': [c['preconditioned_bytes'] for c in sent],
            'model_stage3': stage3}


def check_bn(comm, bn_fisher):
    hp = dict(HP, bn_damping_ratio=2.0, bn_fisher=bn_fisher)
    run = Run(comm, 'bn', np.float64, hp, single=False)
    # every rank: the reference on every rank's local batch
    if comm.rank != 0:
        return
    run.check_identical()
    opt_hp = dict(hp, bn_damping_ratio=2.0)
    reference = DistributedReference(copy.deepcopy(run.initial), opt_hp,
                                     bn_fisher)
    b = 4
    for step in range(3):
        x, t = global_batch(BNNet, step, comm.size * b, np.float64)
        reference.update([(x[r * b:(r + 1) * b], t[r * b:(r + 1) * b])
                          for r in range(comm.size)])
        expected = params_of(reference.model)
        for name in expected:
            close(run.history[step][0][name], expected[name], 1e-7,
                  'bn step {} {}'.format(step, name))


def expected_factor_elements(opt, due_names):
    """Σ over every rank's segment of the packed sizes of due factors."""
    total = 0
    for r in range(opt.size):
        for i in opt.assignment.layers_of(r):
            layer = opt.blocks[i].layer
            if layer is None:
                continue
            for name, shape in layer.factor_shapes().items():
                if name in due_names:
                    total += packing.packed_size(shape)
    return total


def check_fp16_and_bytes(comm):
    """fp16 factors: finite, close to fp32 on owners; packed byte counts."""
    runs = {}
    for dtype in ('float32', 'float16'):
        hp = dict(HP, bn_fisher='full', factor_dtype=dtype)
        runs[dtype] = Run(comm, 'bn', np.float32, hp, single=False)
    huge = Run(comm, 'bn', np.float32, dict(HP, factor_dtype='float16'),
               single=False, loss_scale=1e4)
    if comm.rank != 0:
        return
    f32, f16 = runs['float32'], runs['float16']
    for run in (f16, huge):
        run.check_identical()
        for step in run.history:
            for params in step:
                for name, value in params.items():
                    assert np.isfinite(value).all(), name
        for per_rank in run.factors[0]:
            for key, value in per_rank.items():
                assert np.isfinite(value).all(), key
    # the first update's factors (same parameters): within 1e-2 relative
    seen = 0
    for got, want in zip(f16.factors[0], f32.factors[0]):
        assert got.keys() == want.keys()
        for key in want:
            err = rel_err(got[key], want[key])
            assert err <= 1e-2, (key, err)
            seen += 1
    assert seen >= 7, seen  # conv1 A,G; bn1 F; conv2 A,G; fc A,G
    # bytes: the packed triangles, itemsize 4 / 2
    opt = f32.opt
    n_all = expected_factor_elements(opt, ('A', 'G', 'F'))
    c32, c16 = f32.counters, f16.counters
    assert c32[0]['factor_elements'] == n_all, (c32[0], n_all)
    assert c32[0]['factor_bytes'] == 4 * n_all
    assert c16[0]['factor_elements'] == n_all
    assert c16[0]['factor_bytes'] == 2 * n_all
    for a, b in zip(c32, c16):
        assert 2 * b['factor_bytes'] == a['factor_bytes'], (a, b)
        assert b['gradient_bytes'] == a['gradient_bytes']
        assert b['factor_dense_fp32_bytes'] == a['factor_dense_fp32_bytes']
    assert c16[-1]['factor_bytes'] < 0.3 * c16[-1]['factor_dense_fp32_bytes']
    # float16: one scale agreement per update with due factors, and one
    # reduce-scatter per dtype (gradients float32, factors float16)
    assert [x['scale_allreduce_calls'] for x in c16] == [1, 1, 2]
    assert [x['reduce_scatter_calls'] for x in c16] == [2, 3, 5]
    assert [x['scale_allreduce_calls'] for x in c32] == [0, 0, 0]


def check_packing(comm):
    """Pack/unpack round trip for every factor shape the runs send."""
    if comm.rank != 0:
        return
    shapes = set()
    for cls in (ConvNet, MLP, BNNet):
        model = cls(np.float32)
        for fisher in ('full', 'diagonal'):
            opt = KFAC(bn_fisher=fisher).setup(model)
            for layer in opt.kfac_layers:
                shapes.update(layer.factor_shapes().values())
    rng = np.random.RandomState(0)
    for dtype in (np.float16, np.float32, np.float64):
        total = sum(packing.packed_size(s) for s in shapes)
        buf = np.zeros(total + 3, dtype)
        arrays = []
        offset = 3
        for shape in sorted(shapes):
            x = rng.standard_normal(shape)
            if len(shape) == 2:
                x = x + x.T
            x = x.astype(dtype)
            end = packing.pack_into(buf, offset, x)
            assert end - offset == packing.packed_size(shape)
            arrays.append((offset, x))
            offset = end
        assert offset == buf.size
        for offset, x in arrays:
            y, _ = packing.unpack_from(buf, offset, x.shape)
            assert y.dtype == dtype and np.array_equal(x, y), x.shape
    assert any(len(s) == 1 for s in shapes) and len(shapes) >= 10, shapes


def check_accumulation(comm):
    """k = 2 accumulation on every rank = one step on the k·P·b batch."""
    run = Run(comm, 'conv', np.float64, HP, b=2, k=2)
    if comm.rank != 0:
        return
    run.check_single(1e-9)
    for step, counters in enumerate(run.counters):
        assert counters['updates'] == step + 1
        assert counters['reduce_scatter_calls'] == step + 1, counters
        assert counters['all_gather_calls'] == step + 1, counters


def check_reporter(comm):
    """Per-update byte counts reach a trainer's observation."""
    model = L.Classifier(make_model('conv', np.float32, comm.rank))
    opt = DistributedKFAC(comm, print_plan=False, lr=0.01).setup(model)
    x, t = global_batch(ConvNet, 0, 8, np.float32)
    it = chainer.iterators.SerialIterator(
        chainer.datasets.TupleDataset(x, t), 4, shuffle=False)
    updater = chainer.training.updaters.StandardUpdater(it, opt)
    trainer = chainer.training.Trainer(updater, (2, 'iteration'),
                                       out='/tmp/kfac_trainer_{}'.format(
                                           os.getpid()))
    log = []
    trainer.extend(lambda tr: log.append(dict(tr.observation)),
                   trigger=(1, 'iteration'))
    trainer.run()
    if comm.rank != 0:
        return
    assert len(log) == 2
    for entry in log:
        for key in ('main/comm/gradient_bytes', 'main/comm/factor_bytes',
                    'main/comm/preconditioned_bytes'):
            assert key in entry, entry.keys()
    assert log[0]['main/comm/gradient_bytes'] == \
        opt.comm_counters['gradient_bytes'] / 2


CHECKS = {
    'equivalence_fp64': lambda c: check_equivalence(c, np.float64, 1e-9),
    'equivalence_fp32': lambda c: check_equivalence(c, np.float32, 1e-5),
    'equivalence_sum_fp64': lambda c: check_equivalence(
        c, np.float64, 1e-9, reduce='sum'),
    'equivalence_mlp_fp64': lambda c: check_equivalence(
        c, np.float64, 1e-9, kind='mlp'),
    'equivalence_mlp_fp32': lambda c: check_equivalence(
        c, np.float32, 1e-5, kind='mlp'),
    'equivalence_grouped_fp64': lambda c: check_equivalence(
        c, np.float64, 1e-9, grouped=True),
    'equivalence_grouped_mlp_fp32': lambda c: check_equivalence(
        c, np.float32, 1e-5, kind='mlp', grouped=True),
    'bn_diagonal': lambda c: check_bn(c, 'diagonal'),
    'bn_full': lambda c: check_bn(c, 'full'),
    'bn_unit': lambda c: check_bn(c, 'unit'),
    'adaptive_refresh': check_adaptive_refresh,
    'sampled_fisher_conv': lambda c: check_sampled_fisher(c, 'conv'),
    'sampled_fisher_mlp': lambda c: check_sampled_fisher(c, 'mlp'),
    'fp16_and_bytes': check_fp16_and_bytes,
    'packing': check_packing,
    'accumulation': check_accumulation,
    'reporter': check_reporter,
}


#: Checks run only when named in ``--checks``; they return figures that
#: the test compares between launches (``results['data']``).
EXTRA_CHECKS = {'plan_bytes': check_plan_bytes}


def fault(comm, bad_rank):
    model = make_model('conv', np.float32, comm.rank)
    opt = DistributedKFAC(comm, print_plan=False, lr=0.01).setup(model)
    lossfun = lossfun_of(model)
    for step in range(100):
        if step == 2 and comm.rank == bad_rank:
            raise RuntimeError('injected failure on rank {} at update {}'
                               .format(comm.rank, step))
        x, t = global_batch(ConvNet, step, 4 * comm.size, np.float32)
        opt.update(lossfun, x[comm.rank * 4:(comm.rank + 1) * 4],
                   t[comm.rank * 4:(comm.rank + 1) * 4])
    print('fault worker: no failure happened')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--checks', default=','.join(sorted(CHECKS)))
    parser.add_argument('--out')
    parser.add_argument('--fault', type=int, default=None)
    args = parser.parse_args()
    comm = chainermn.create_communicator('naive')
    if args.fault is not None:
        # no hook of our own: DistributedKFAC must install it
        fault(comm, args.fault)
        return
    global_except_hook.add_hook()
    results = {}
    checks = dict(CHECKS, **EXTRA_CHECKS)
    for name in args.checks.split(','):
        try:
            data = checks[name](comm)
            results[name] = 'ok'
            if data is not None:
                results.setdefault('data', {})[name] = data
        except AssertionError:
            # only rank 0 compares, after every collective of the check: the
            # ranks stay in step.  Elsewhere it is a bug: abort every rank.
            if comm.rank != 0:
                raise
            results[name] = traceback.format_exc()
    if comm.rank == 0:
        text = json.dumps(results, indent=1)
        if args.out:
            with open(args.out, 'w') as f:
                f.write(text)
        else:
            print(text)


if __name__ == '__main__':
    main()
