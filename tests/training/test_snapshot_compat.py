"""Snapshots written before the snapshot package still load.

``tests/data/p1`` and ``tests/data/p2`` were written by the code of before
the split of ``chainerkfac/training/snapshot.py`` into a package
(``tests/data/make_old_snapshot.py``, on 1 and 2 processes): each holds
``snapshot_iter_4`` and, taken from the trainers themselves,
``expected_rank_<r>.npz``.  Loaded by today's code, the state must be the
one saved.
"""

import os
import shutil

import numpy
import pytest

import tests
from tests.training import old_snapshot

from chainerkfac import training

DATA = os.path.join(tests.TESTS, 'data')


@pytest.fixture(scope='module')
def comm():
    chainermn = pytest.importorskip('chainermn')
    return chainermn.create_communicator('naive')


def expected(name, rank):
    path = os.path.join(DATA, name, 'expected_rank_{}.npz'.format(rank))
    with numpy.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def load(tmp_path, name, comm):
    snapshot = str(tmp_path / 'snapshot_iter_4')
    shutil.copytree(os.path.join(DATA, name, 'snapshot_iter_4'), snapshot)
    module = old_snapshot
    trainer = module.make_trainer(comm, str(tmp_path), module.GLOBAL_BATCH)
    before = module.state(trainer)
    line = training.load_snapshot(snapshot, trainer, comm)
    return module, trainer, before, line, snapshot


def test_old_single_process_snapshot_resumes_exactly(tmp_path, comm):
    module, trainer, before, line, path = load(tmp_path, 'p1', comm)
    assert line == 'resumed from {} at iteration 4'.format(path)
    saved = expected('p1', 0)
    after = module.state(trainer)
    assert int(before['iteration']) == 0 and int(saved['iteration']) == 4
    # state added since those snapshots: the count of factor builds
    # (not in an old snapshot: it restarts from 0)
    assert set(after) - set(saved) == {'optimizer:main/factor_builds'}
    assert set(saved) <= set(after)
    assert any(key.startswith('kfac/') for key in saved)
    for key in saved:
        numpy.testing.assert_array_equal(after[key], saved[key],
                                         err_msg=key)


def test_old_two_process_snapshot_loads_on_one(tmp_path, comm):
    module, trainer, _, line, _ = load(tmp_path, 'p2', comm)
    assert 'saved as 2 per process x 2 processes' in line, line
    rank0, rank1 = expected('p2', 0), expected('p2', 1)
    after = module.state(trainer)
    # every layer's K-FAC state, from the rank that owned it
    layers = {**{k: v for k, v in rank1.items() if k.startswith('kfac/')},
              **{k: v for k, v in rank0.items() if k.startswith('kfac/')}}
    assert {k.split('/')[2] for k in layers} == {'fc1', 'bn', 'fc2'}
    assert any(k.startswith('kfac/') for k in rank1)
    for key, value in layers.items():
        numpy.testing.assert_array_equal(after[key], value, err_msg=key)
    # parameters, optimizer state and the model's persistents: rank 0's
    for key, value in rank0.items():
        if key.startswith(('model:', 'optimizer:')):
            numpy.testing.assert_array_equal(after[key], value, err_msg=key)
    assert int(after['iteration']) == int(rank0['optimizer:main/t']) == 4
