"""MPI worker of tests/training/test_resume.py: ``mpiexec -n 4 python
snapshot_worker.py --out DIR``.

A small conv + BN + linear model trained by ``DistributedKFAC`` through
``KFACUpdater`` (running mixup, random erasing, a shuffled iterator: every
process has its own data and state) in a Chainer trainer that writes
snapshots every 2 iterations into ``DIR/run``:

1. P = 4 writes snapshots at iterations 2 and 4; each rank records its own
   state at iteration 4 (iterator, mixup, random states, BN statistics, the
   K-FAC state of its primary layers).  At iteration 6 writing fails on
   rank 2 (an injected ``OSError``): every rank must raise
   ``SnapshotError`` naming rank 2, and nothing of iteration 6 may remain.
2. P = 4 again, fresh trainers load ``snapshot_iter_4``: every rank must get
   its own recorded state back, the K-FAC state of the layers it owns, and
   the first update (a stale step) must rebuild no factor.
3. P = 2 (ranks 0 and 1 of a split communicator, BS kept by 2 accumulation
   steps) loads the same snapshot: every layer it owns must get the factors
   and inverses recorded by that layer's primary owner at P = 4, the
   iteration becomes t x 2, and the first update rebuilds no factor.
4. A snapshot of another identity is refused on every rank.

Rank 0 writes ``{check: "ok" | message}`` as JSON to ``DIR/results.json``.
"""

import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import argparse  # NOQA: E402
import json  # NOQA: E402
import traceback  # NOQA: E402

import chainerkfac  # noqa: E402,F401 (first: makes Chainer importable)
import chainer  # NOQA: E402
import chainer.functions as F  # NOQA: E402
import chainer.links as L  # NOQA: E402
import chainermn  # NOQA: E402
import numpy as np  # NOQA: E402
from mpi4py import MPI  # NOQA: E402

from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402
from chainerkfac import training  # NOQA: E402
from chainerkfac import transforms  # NOQA: E402

IDENTITY = {'model': 'snapshot_worker', 'batch_size': 16}
GLOBAL_BATCH = 16
INTERVAL = 3  # factors rebuilt at t = 0, 3, 6, ...: t = 4 is stale


class Net(chainer.Chain):
    def __init__(self):
        super(Net, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(3, 4, 3, pad=1)
            self.bn = L.BatchNormalization(4)
            self.fc = L.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))))


def make_trainer(comm, out, stop, rank_seed):
    """A trainer on ``comm``: the same initial weights on every rank, data,
    mixup, erasing and order of rank ``rank_seed``."""
    np.random.seed(0)
    model = training.MixupClassifier(Net())
    k = GLOBAL_BATCH // (4 * comm.size)
    optimizer = DistributedKFAC(comm, lr=0.05, momentum=0.9, damping=0.05,
                                a_interval=INTERVAL, g_interval=INTERVAL,
                                accumulation_steps=k, print_plan=False)
    optimizer.setup(model)
    rng = np.random.RandomState(100 + rank_seed)
    data = chainer.datasets.TupleDataset(
        rng.randn(12, 3, 6, 6).astype(np.float32),
        rng.randint(0, 3, 12).astype(np.int32))
    iterator = chainer.iterators.SerialIterator(
        data, 4, order_sampler=chainer.iterators.ShuffleOrderSampler(
            np.random.RandomState(rank_seed)))
    updater = training.KFACUpdater(
        iterator, optimizer,
        mixup=transforms.RunningMixup(0.4, 3, seed=rank_seed),
        erase=lambda x, rng: transforms.erase_batch(x, rng),
        seed=rank_seed)
    trainer = chainer.training.Trainer(updater, (stop * k, 'iteration'),
                                       out=out)
    trainer.extend(training.AtomicSnapshot(comm, keep=5, identity=IDENTITY),
                   trigger=(2 * k, 'iteration'))
    return trainer


def own_state(trainer):
    """This process's own state: everything but parameters and factors."""
    target = chainer.serializers.DictionarySerializer()
    trainer.updater.serialize(target)
    return {key: np.array(value) for key, value in target.target.items()
            if key.startswith(('iterator:', 'mixup/', 'erase_rng/'))
            or key.endswith(('avg_mean', 'avg_var'))}


def kfac_state(optimizer, layers):
    return {(layer.name, key): np.array(layer.state[key])
            for layer in layers for key in layer.state_keys()
            if layer.state.get(key) is not None}


def equal(a, b):
    return a.keys() == b.keys() and all(
        np.array_equal(a[key], b[key]) for key in a)


def refreshes(optimizer):
    return sum(sum(layer.refreshes.values())
               for layer in optimizer.kfac_layers)


def one_update(trainer):
    """One real update (k micro-batches) outside the trainer loop."""
    optimizer = trainer.updater.get_optimizer('main')
    for _ in range(optimizer.accumulation_steps):
        trainer.updater.update()


def phase_write(comm, run_dir, results):
    world = comm.mpi_comm
    trainer = make_trainer(comm, run_dir, 6, comm.rank)
    optimizer = trainer.updater.get_optimizer('main')
    recorded = {}

    def record(trainer):
        iteration = trainer.updater.iteration
        if iteration == 4:
            recorded['own'] = own_state(trainer)
            recorded['kfac'] = kfac_state(optimizer,
                                          optimizer.primary_layers())
            recorded['built'] = set(optimizer._built)
        if iteration == 6 and comm.rank == 2:
            def failing_savez(f, **arrays):
                f.write(b'PK\x03\x04 partial')
                raise OSError('disk full (injected)')
            np.savez = failing_savez
    record.priority = 0  # before the snapshot extension (-100)
    trainer.extend(record, trigger=(1, 'iteration'))
    error = None
    try:
        trainer.run(show_loop_exception_msg=False)
    except training.SnapshotError as e:
        error = str(e)
    finally:
        np.savez = SAVEZ
    errors = world.gather(error)
    if comm.rank == 0:
        names = sorted(os.listdir(run_dir))
        expected = 'snapshot_iter_6: not written: rank 2: disk full ' \
            '(injected)'
        results['failed_write_raises_on_every_rank'] = 'ok' if all(
            e == expected for e in errors) else repr(errors)
        latest = training.find_latest_snapshot(run_dir)
        results['failed_write_leaves_previous'] = 'ok' if (
            names == ['snapshot_iter_2', 'snapshot_iter_4'] and latest ==
            os.path.join(run_dir, 'snapshot_iter_4')) else repr(
                (names, latest))
    return recorded


def phase_same(comm, out, path, recorded, results):
    world = comm.mpi_comm
    trainer = make_trainer(comm, out, 8, comm.rank)
    optimizer = trainer.updater.get_optimizer('main')
    line = training.load_snapshot(path, trainer, comm, IDENTITY)
    problems = []
    if line != 'resumed from {} at iteration 4'.format(path):
        problems.append(line)
    if not equal(own_state(trainer), recorded['own']):
        problems.append('own state differs from the one recorded')
    if not equal(kfac_state(optimizer, optimizer.primary_layers()),
                 recorded['kfac']):
        problems.append('K-FAC state of the primary layers differs')
    if optimizer._built != recorded['built'] or not optimizer._built:
        problems.append('built factors {}'.format(sorted(optimizer._built)))
    one_update(trainer)
    if refreshes(optimizer) or optimizer.comm_counters['factor_bytes']:
        problems.append('{} factors rebuilt ({} bytes)'.format(
            refreshes(optimizer), optimizer.comm_counters['factor_bytes']))
    report(world, 'same_layout_restores_each_rank', problems, results)


def phase_other(comm, out, path, recorded_all):
    """Ranks 0 and 1 (``comm`` of size 2) load the P = 4 snapshot."""
    trainer = make_trainer(comm, out, 8, comm.rank + 10)
    optimizer = trainer.updater.get_optimizer('main')
    line = training.load_snapshot(path, trainer, comm, IDENTITY)
    problems = []
    expected = ('resumed from {} at iteration 8: saved as 4 per process x 4 '
                'processes x 1 accumulation steps, now 4 x 2 x 2: layer '
                'assignment re-planned, all factors kept').format(path)
    if not line.startswith(expected):
        problems.append(line)
    saved = {}
    for state in recorded_all:
        saved.update(state)
    owned = optimizer.owned_layers()
    mine = kfac_state(optimizer, owned)
    wanted = {key: value for key, value in saved.items()
              if key[0] in set(layer.name for layer in owned)}
    if not owned or not equal(mine, wanted):
        problems.append('loaded K-FAC state differs from the saved one: '
                        '{} vs {}'.format(sorted(mine), sorted(wanted)))
    if trainer.updater.iteration != 8 or optimizer.t != 4:
        problems.append('iteration {}, t {}'.format(
            trainer.updater.iteration, optimizer.t))
    one_update(trainer)
    if refreshes(optimizer) or optimizer.comm_counters['factor_bytes']:
        problems.append('{} factors rebuilt ({} bytes)'.format(
            refreshes(optimizer), optimizer.comm_counters['factor_bytes']))
    return problems


def phase_identity(comm, out, path, results):
    trainer = make_trainer(comm, out, 8, comm.rank)
    other = dict(IDENTITY, batch_size=32)
    try:
        training.load_snapshot(path, trainer, comm, other)
        error = None
    except training.SnapshotError as e:
        error = str(e)
    errors = comm.mpi_comm.gather(error)
    if comm.rank == 0:
        expected = '{}: batch_size differs: snapshot 16, now 32'.format(path)
        results['other_identity_refused_on_every_rank'] = 'ok' if all(
            e == expected for e in errors) else repr(errors)


def report(world, name, problems, results):
    problems = world.gather(problems)
    if world.rank == 0:
        results[name] = 'ok' if not any(problems) else '; '.join(
            'rank {}: {}'.format(r, p) for r, p in enumerate(problems) if p)


SAVEZ = np.savez


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    comm = chainermn.create_communicator('naive')
    world = comm.mpi_comm
    assert comm.size == 4, 'run with mpiexec -n 4'
    run_dir = os.path.join(args.out, 'run')
    results = {}
    try:
        recorded = phase_write(comm, run_dir, results)
        path = os.path.join(run_dir, 'snapshot_iter_4')
        phase_same(comm, os.path.join(args.out, 'same'), path, recorded,
                   results)
        recorded_all = world.allgather(recorded['kfac'])
        sub = world.Split(0 if comm.rank < 2 else MPI.UNDEFINED, comm.rank)
        problems = []
        if sub != MPI.COMM_NULL:
            problems = phase_other(
                chainermn.create_communicator('naive', mpi_comm=sub),
                os.path.join(args.out, 'other'), path, recorded_all)
        report(world, 'other_layout_keeps_all_factors', problems, results)
        phase_identity(comm, os.path.join(args.out, 'identity'), path,
                       results)
    except Exception:
        results['exception on rank {}'.format(comm.rank)] = \
            traceback.format_exc()
        print(traceback.format_exc(), flush=True)
        world.Abort(1)
    if comm.rank == 0:
        with open(os.path.join(args.out, 'results.json'), 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
