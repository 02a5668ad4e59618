"""MPI worker of tests/optimizers/test_own_models.py: DistributedKFAC on
users' models.

``mpiexec -n P python own_model_worker.py --out RESULT.json``

Each check trains on every rank with its own batches and compares with
single-process KFAC on the concatenation of every rank's batches, from rank
0's initial weights (models without BatchNormalization: the two are equal):

* ``lazy_per_rank_seeds``: lazily sized links (``L.Linear(None, n)``,
  ``L.Convolution2D(None, ...)``) and a different seed on every rank;
* ``unused_head``: a covered head without a gradient for two updates;
* ``captured``: the backward pass run by the caller inside ``capture()``;
* ``layer_types``: grouped, dilated and transposed convolutions and an
  embedding;
* ``bn_one_parameter``: BatchNormalization without gamma, and without beta
  (every rank on the same batches: the batch statistics then agree);
* ``partial_use_is_one_error``: a link used on some ranks only is the same
  one-line error on every rank.
"""

import argparse
import json
import os
import traceback

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import chainerkfac  # noqa: E402,F401 (first: makes Chainer importable)
import chainer  # NOQA: E402
import chainer.functions as F  # NOQA: E402
import chainer.links as L  # NOQA: E402
import chainermn  # NOQA: E402
import numpy  # NOQA: E402

from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402
from chainerkfac.optimizers import KFAC  # NOQA: E402

HP = dict(lr=0.05, momentum=0.9, damping=1e-2, a_interval=1, g_interval=2)
STEPS = 3


class LazyNet(chainer.Chain):
    def __init__(self):
        super(LazyNet, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(None, 3, 3, pad=1)
            self.fc = L.Linear(None, 4)

    def forward(self, x, step):
        return self.fc(F.relu(self.conv(x)))


class TwoHeads(chainer.Chain):
    def __init__(self):
        super(TwoHeads, self).__init__()
        with self.init_scope():
            self.body = L.Linear(None, 6)
            self.head_a = L.Linear(6, 4)
            self.head_b = L.Linear(6, 4)

    def forward(self, x, step):
        head = self.head_b if step == STEPS - 1 else self.head_a
        return head(F.tanh(self.body(x.reshape(x.shape[0], -1))))


class LayerTypes(chainer.Chain):
    def __init__(self):
        super(LayerTypes, self).__init__()
        with self.init_scope():
            self.grouped = L.Convolution2D(2, 4, 3, pad=1, groups=2)
            self.dilated = L.DilatedConvolution2D(4, 4, 3, pad=2, dilate=2)
            self.deconv = L.Deconvolution2D(4, 2, 3, stride=2, pad=1)
            self.embed = L.EmbedID(2, 3)
            self.fc = L.Linear(None, 4)

    def forward(self, x, step):
        h = F.relu(self.dilated(F.relu(self.grouped(x))))
        h = F.tanh(self.deconv(h))
        words = (x[:, 0, 0, :] > 0).astype(numpy.int32)
        e = self.embed(words)
        n = x.shape[0]
        return self.fc(F.concat([F.reshape(h, (n, -1)),
                                 F.reshape(e, (n, -1))], axis=1))


class OneParameterBN(chainer.Chain):
    def __init__(self):
        super(OneParameterBN, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(2, 3, 3, pad=1)
            self.bn_beta = L.BatchNormalization(3, use_gamma=False)
            self.bn_gamma = L.BatchNormalization(3, use_beta=False)
            self.fc = L.Linear(None, 4)

    def forward(self, x, step):
        h = F.relu(self.bn_gamma(self.bn_beta(self.conv(x))))
        return self.fc(h)


def batches(rank):
    rng = numpy.random.RandomState(50 + rank)
    return [(rng.randn(3, 2, 6, 6), rng.randint(0, 4, 3).astype(numpy.int32))
            for _ in range(STEPS)]


def make(model_type, seed):
    numpy.random.seed(seed)
    with chainer.using_config('dtype', numpy.float64):
        return model_type()


def train(opt, model, data, captured=False):
    for step, (x, t) in enumerate(data):
        def lossfun():
            return F.softmax_cross_entropy(model(x, step), t)
        if captured:
            model.cleargrads()
            with opt.capture():
                lossfun().backward()
            opt.update()
        else:
            opt.update(lossfun)
    return {n: p.array.copy() for n, p in model.namedparams()}


def compare(comm, model_type, seed_of_rank, captured=False, same=False):
    """``same``: every rank trains on rank 0's batches (BatchNormalization's
    batch statistics are then the same on every rank and in the reference,
    which trains on those batches once)."""
    model = make(model_type, seed_of_rank(comm.rank))
    opt = DistributedKFAC(comm, print_plan=False, log_coverage=False,
                          **HP).setup(model)
    mine = train(opt, model, batches(0 if same else comm.rank), captured)
    everyone = comm.gather_obj(mine)
    if comm.rank != 0:
        return 'ok'
    joined = batches(0) if same else [
        tuple(numpy.concatenate([batches(r)[i][k]
                                 for r in range(comm.size)])
              for k in (0, 1)) for i in range(STEPS)]
    ref_model = make(model_type, seed_of_rank(0))
    ref = train(KFAC(log_coverage=False, **HP).setup(ref_model), ref_model,
                joined)
    worst = 0.0
    for weights in everyone:
        for name, value in ref.items():
            worst = max(worst, float(numpy.abs(weights[name] - value).max()
                                     / (numpy.abs(value).max() + 1e-30)))
    return 'ok' if worst < 1e-9 else 'max relative difference {}'.format(
        worst)


def partial_use(comm):
    numpy.random.seed(0)
    model = make(TwoHeads, 0)
    opt = DistributedKFAC(comm, print_plan=False, log_coverage=False,
                          abort_on_exception=False, **HP).setup(model)
    x, t = batches(comm.rank)[0]
    head = model.head_a if comm.rank == 0 else model.head_b
    try:
        opt.update(lambda: F.softmax_cross_entropy(
            head(F.tanh(model.body(x.reshape(3, -1)))), t))
    except RuntimeError as e:
        message = str(e)
    else:
        message = 'no error'
    messages = comm.gather_obj(message)
    if comm.rank != 0:
        return 'ok'
    if comm.size == 1:
        return 'ok' if messages == ['no error'] else str(messages)
    ok = len(set(messages)) == 1 and 'some processes but not on others' in \
        messages[0] and '\n' not in messages[0]
    return 'ok' if ok else str(messages)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    comm = chainermn.create_communicator('naive')
    checks = {
        'lazy_per_rank_seeds': lambda: compare(comm, LazyNet,
                                               lambda r: 100 + r),
        'unused_head': lambda: compare(comm, TwoHeads, lambda r: 7),
        'captured': lambda: compare(comm, TwoHeads, lambda r: 7, True),
        'layer_types': lambda: compare(comm, LayerTypes, lambda r: 3),
        'bn_one_parameter': lambda: compare(comm, OneParameterBN,
                                            lambda r: 4, same=True),
        'partial_use_is_one_error': lambda: partial_use(comm),
    }
    results = {}
    for name, check in checks.items():
        try:
            # lazily sized links take the dtype in force at their first call
            with chainer.using_config('dtype', numpy.float64):
                results[name] = check()
        except Exception:
            results[name] = traceback.format_exc()
    if comm.rank == 0:
        with open(args.out, 'w') as f:
            json.dump(results, f)


if __name__ == '__main__':
    main()
