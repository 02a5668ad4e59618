"""MPI worker of tests/optimizers/test_drop_in.py: the Chainer-style checks
of tests/optimizers/harness.py on DistributedKFAC, and DistributedKFAC
against single-process KFAC on the joint batch with Chainer's optimizer
hooks and ``kl_clip``.

``mpiexec -n P python drop_in_worker.py --out RESULT.json``

Every check runs on every rank; a check is ``'ok'`` when it holds on every
rank (the first failure otherwise).
"""

import argparse
import json
import os
import traceback
import warnings

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import chainerkfac  # noqa: E402,F401 (first: makes Chainer importable)
import chainer.functions as F  # NOQA: E402
import chainermn  # NOQA: E402
import numpy  # NOQA: E402

from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402
from chainerkfac.optimizers import KFAC  # NOQA: E402
from tests.optimizers import harness  # NOQA: E402
from tests.optimizers import test_drop_in as single  # NOQA: E402

BATCH = 4  # per process


def distributed(comm):
    def make_opt(**hp):
        return DistributedKFAC(comm, print_plan=False, log_coverage=False,
                               **hp)
    return make_opt


def gathered_batches(comm, seed, count):
    """Every rank's batches (rank r's from ``seed + r``) and the joint
    ones (their concatenation in rank order)."""
    per_rank = [harness.mlp_batches(seed + r, BATCH, count)
                for r in range(comm.size)]
    joint = [(numpy.concatenate([b[i][0] for b in per_rank]),
              numpy.concatenate([b[i][1] for b in per_rank]))
             for i in range(count)]
    return per_rank[comm.rank], joint


def max_difference(a, b):
    return max(float(abs(a[n] - b[n]).max()) for n in a)


def hook_equals_joint(comm, hook):
    local, joint = gathered_batches(comm, 20, 3)
    mine = harness.run_with_hook(distributed(comm), hook, local)
    reference = harness.run_with_hook(KFAC, hook, joint)
    worst = max(max_difference(a, b) for a, b in zip(mine, reference))
    assert worst < 1e-10, 'max |dw| {}'.format(worst)


def kl_clip_equals_joint(comm):
    local, joint = gathered_batches(comm, 30, 3)

    def run(make_opt, batches):
        model = harness.mlp(5)
        opt = make_opt(lr=0.1, momentum=0.9, damping=1e-2,
                       kl_clip=1e-5).setup(model)
        for x, t in batches:
            opt.update(lambda: F.softmax_cross_entropy(model(x), t))
        return {n: p.array.copy() for n, p in model.namedparams()}, opt
    mine, opt = run(distributed(comm), local)
    reference, ref_opt = run(KFAC, joint)
    assert float(ref_opt.kl_clip_nu) < 0.5, float(ref_opt.kl_clip_nu)
    assert abs(float(opt.kl_clip_nu) - float(ref_opt.kl_clip_nu)) < 1e-10
    worst = max_difference(mine, reference)
    assert worst < 1e-10, 'max |dw| {}'.format(worst)


def backward_equals_lossfun(comm):
    batches = single.conv_batches(40 + comm.rank, 6)

    def run(mode):
        model = single.conv_bn_linear()
        opt = distributed(comm)(accumulation_steps=2, a_interval=2,
                                g_interval=3, **single.HP).setup(model)
        for i, (x, t) in enumerate(batches):
            if mode == 'lossfun':
                opt.update(lambda: F.softmax_cross_entropy(model(x), t))
            else:
                if i % 2 == 0:
                    model.cleargrads()
                F.softmax_cross_entropy(model(x), t).backward()
                opt.update()
        return single.params(model)
    single.assert_same(run('lossfun'), run('backward'))


def dynamic_skip_agreed(comm):
    """A non-finite gradient on the last rank only: every rank skips the
    same updates and keeps the same scale and parameters."""
    batches = single.conv_batches(50 + comm.rank, 8)
    model = single.conv_bn_linear()
    opt = distributed(comm)(**single.HP)
    opt.loss_scaling(interval=2)
    opt.setup(model)
    overflow = comm.rank == comm.size - 1
    scales, changed = [], []
    for x, t in batches:
        before = single.params(model)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            if overflow:
                opt.update(single.overflowing_loss, model, x, t)
            else:
                opt.update(lambda: F.softmax_cross_entropy(model(x), t))
        scales.append(opt._loss_scale)
        changed.append(any((before[n] != p.array).any()
                           for n, p in model.namedparams()))
    everyone = comm.gather_obj((scales, changed, single.params(model)))
    if comm.rank == 0:
        for other in everyone[1:]:
            assert other[0] == scales and other[1] == changed
            assert max_difference(other[2], everyone[0][2]) == 0.0
        assert any(changed) and not all(changed), changed


def checks(comm):
    make_opt = distributed(comm)
    out = {}
    for dtype in ('float16', 'float32', 'float64'):
        for scaling in ('none', 'static', 'dynamic'):
            for mode in ('lossfun', 'backward'):
                def linear(dtype=dtype, scaling=scaling, mode=mode):
                    accuracy = harness.train_linear_model(
                        make_opt, numpy.dtype(dtype),
                        False if scaling == 'none' else scaling, mode,
                        seed=2 + comm.rank)
                    assert accuracy > 0.9, accuracy
                out['linear_model_{}_{}_{}'.format(dtype, scaling, mode)] = \
                    linear
    out['initialize'] = lambda: harness.check_initialize(make_opt)
    out['serialize_round_trip'] = lambda: harness.check_serialize_round_trip(
        make_opt, seed=4 + comm.rank)
    out['backward_equals_lossfun'] = lambda: backward_equals_lossfun(comm)
    out['dynamic_skip_agreed'] = lambda: dynamic_skip_agreed(comm)
    out['kl_clip_equals_joint_batch'] = lambda: kl_clip_equals_joint(comm)
    for hook in sorted(harness.HOOKS):
        out['hook_{}_equals_joint_batch'.format(hook)] = \
            lambda hook=hook: hook_equals_joint(comm, hook)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    comm = chainermn.create_communicator('naive')
    results = {}
    for name, check in checks(comm).items():
        try:
            check()
            results[name] = 'ok'
        except AssertionError:
            results[name] = traceback.format_exc()
    everyone = comm.gather_obj(results)
    if comm.rank == 0:
        merged = {name: next((r[name] for r in everyone if r[name] != 'ok'),
                             'ok') for name in results}
        with open(args.out, 'w') as f:
            json.dump(merged, f)


if __name__ == '__main__':
    main()
