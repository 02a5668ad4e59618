"""Writes the snapshot fixtures of ``tests/training/test_snapshot_compat.py``.

Run once with the code of before the snapshot package (the fixtures stand
for snapshots written by earlier versions)::

    PYTHONPATH=OLD python tests/data/make_old_snapshot.py tests/data/p1
    PYTHONPATH=OLD mpiexec -n 2 python tests/data/make_old_snapshot.py \
        tests/data/p2

Each writes ``snapshot_iter_4`` (through ``AtomicSnapshot``) and, from the
trainer itself rather than from the snapshot, ``expected_rank_<r>.npz``:
everything the updater serializes on rank r plus every K-FAC layer's state
on the rank that owns it (``kfac/<layer>/<key>``), at iteration 4.
"""

import os
import sys

import chainerkfac  # NOQA: F401 (before chainer)
import chainer
import chainer.functions as F
import chainer.links as L
import chainermn
import numpy

from chainerkfac.optimizers import DistributedKFAC
from chainerkfac import training
from chainerkfac import transforms

GLOBAL_BATCH = 4
STOP = 4


class Net(chainer.Chain):
    def __init__(self):
        super(Net, self).__init__()
        with self.init_scope():
            self.fc1 = L.Linear(4, 3)
            self.bn = L.BatchNormalization(3)
            self.fc2 = L.Linear(3, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def make_trainer(comm, out, batch, stop=STOP):
    """The fixture's trainer on ``comm`` with ``batch`` examples per
    process (the global batch is :data:`GLOBAL_BATCH`)."""
    numpy.random.seed(0)
    rank = comm.rank
    model = training.MixupClassifier(Net())
    k = GLOBAL_BATCH // (batch * comm.size)
    optimizer = DistributedKFAC(comm, lr=0.05, momentum=0.9, damping=0.05,
                                a_interval=3, g_interval=3,
                                accumulation_steps=k, print_plan=False)
    optimizer.setup(model)
    rng = numpy.random.RandomState(100 + rank)
    data = chainer.datasets.TupleDataset(
        rng.randn(6, 4).astype(numpy.float32),
        rng.randint(0, 2, 6).astype(numpy.int32))
    iterator = chainer.iterators.SerialIterator(
        data, batch, order_sampler=chainer.iterators.ShuffleOrderSampler(
            numpy.random.RandomState(rank)))
    updater = training.KFACUpdater(
        iterator, optimizer,
        mixup=transforms.RunningMixup(0.4, 2, seed=rank), seed=rank)
    return chainer.training.Trainer(updater, (stop * k, 'iteration'),
                                    out=out)


def state(trainer):
    """The updater's serialization and the K-FAC state of the layers this
    process owns, as ``{key: array}``."""
    target = chainer.serializers.DictionarySerializer()
    trainer.updater.serialize(target)
    out = {key: numpy.asarray(value) for key, value in target.target.items()
           if not key.startswith('optimizer:main/kfac/')}
    optimizer = trainer.updater.get_optimizer('main')
    optimizer.plan()
    for layer in optimizer.owned_layers():
        for key in layer.state_keys():
            if layer.state.get(key) is not None:
                out['kfac/{}/{}'.format(layer.name.strip('/'), key)] = \
                    numpy.asarray(layer.state[key])
    return out


def main(out):
    comm = chainermn.create_communicator('naive')
    trainer = make_trainer(comm, out, GLOBAL_BATCH // comm.size)
    trainer.extend(training.AtomicSnapshot(comm, keep=1),
                   trigger=(STOP, 'iteration'))
    trainer.run()
    expected = os.path.join(out, 'expected_rank_{}.npz'.format(comm.rank))
    numpy.savez_compressed(expected, **state(trainer))


if __name__ == '__main__':
    main(sys.argv[1])
