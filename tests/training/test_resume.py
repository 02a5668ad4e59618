"""Snapshots of multi-process runs (``chainerkfac.training.snapshot``).

``scripts/train_imagenet.py`` under mpiexec on a small synthetic tree: a run
resumed from the middle ends in bitwise the same state as the uninterrupted
one on P = 2 (resumed at a stale step) and P = 3 (at a refresh step); a P = 4
snapshot resumed on P = 2 keeps every factor; a snapshot of another config
is refused before anything is written.  ``tests/mpi/snapshot_worker.py``
(mpiexec -n 4) checks the library directly: a failed write on one rank, each
rank's own state and factors after a load, the factors after a load on
another number of processes.

The schedules see ``data.n_train=16`` examples per epoch (the number N of the
schedules only), so with eq. 21 the factors go stale (interval 20) from
e = t·BS/16 >= 13 on, a few updates into these short runs; ``e_start`` and
``e_end`` keep the learning rate up.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy
import pytest

import tests

from chainerkfac import config as config_module
from chainerkfac import schedules
from chainerkfac import training

from tests.mpi import mpi_env
from tests.mpi import mpiexec

ROOT = tests.ROOT
TRAIN = os.path.join(ROOT, 'scripts', 'train_imagenet.py')
MAKE = os.path.join(ROOT, 'scripts', 'make_synthetic_imagenet.py')
WORKER = os.path.join(ROOT, 'tests', 'mpi', 'snapshot_worker.py')
N_SCHEDULE = 16
SETTINGS = ['data.n_train={}'.format(N_SCHEDULE), 'optimizer.stale=eq21',
            'optimizer.e_start=8', 'optimizer.e_end=1000',
            'train.log_interval=1', 'train.snapshot_interval=4',
            'train.mixup_alpha=0.4']
#: state that is not a function of the computation
VOLATILE = ('_snapshot_elapsed_time', 'extensions/LogReport/_log')

pytestmark = pytest.mark.skipif(mpiexec() is None, reason='no mpiexec')


def train(cwd, n, out, *settings, resume=None):
    command = [mpiexec(), '-n', str(n), '--oversubscribe', sys.executable,
               TRAIN, '--config', 'synthetic.yaml', '--out', out, '--set'] + \
        SETTINGS + list(settings)
    if resume:
        command += ['--resume', resume]
    return subprocess.run(command, cwd=str(cwd), env=mpi_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600)


def check(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def stale(t, batch_size):
    """No factor is due at update t (eq. 21 on the test's N)."""
    interval = schedules.stale_interval(
        'eq21', t, schedules.epoch(t, batch_size, N_SCHEDULE))
    return t % interval != 0


def resumed_lines(proc):
    return [line for line in proc.stdout.splitlines()
            if line.startswith('resumed from')]


def arrays(path):
    with numpy.load(str(path), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def assert_same_state(a, b):
    """Every rank file of snapshot folders a and b holds the same arrays."""
    files = sorted(os.listdir(str(a)))
    assert files == sorted(os.listdir(str(b)))
    assert len(files) > 2
    for name in files:
        if not name.endswith('.npz'):
            continue
        x, y = arrays(a / name), arrays(b / name)
        assert x.keys() == y.keys(), name
        for key in x:
            if key not in VOLATILE:
                numpy.testing.assert_array_equal(
                    x[key], y[key], err_msg='{} {}'.format(name, key))


def log(out):
    return json.loads((out / 'log').read_text())


def assert_same_log(a, b):
    la, lb = log(a), log(b)
    assert [e['iteration'] for e in la] == [e['iteration'] for e in lb]
    for x, y in zip(la, lb):
        x.pop('elapsed_time')
        y.pop('elapsed_time')
        assert x == y


def factor_bytes(out):
    return {e['iteration']: e['main/comm/factor_bytes'] for e in log(out)}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp('resume')
    subprocess.check_call([sys.executable, MAKE, 'data/synthetic',
                           '--classes', '4', '--per-class', '32',
                           '--val-per-class', '8', '--size', '40'],
                          cwd=str(path), env=mpi_env())
    return path


# -- P = 2: resumed at a stale step -------------------------------------------

@pytest.fixture(scope='module')
def p2(workdir):
    """128 images, 4 updates per epoch.  Whole: 3 epochs; halves: 2 epochs,
    then a killed write (a hidden folder) and a newer snapshot with a cut
    rank file are left in the folder, then ``--resume auto`` to 3 epochs."""
    whole = check(train(workdir, 2, 'whole2', 'train.epochs=3'))
    first = check(train(workdir, 2, 'halves2', 'train.epochs=2'))
    halves = workdir / 'halves2'
    shutil.copytree(str(halves / 'snapshot_iter_8'),
                    str(halves / '.snapshot_iter_10.tmp-0123456789ab'))
    broken = halves / 'snapshot_iter_12'
    shutil.copytree(str(halves / 'snapshot_iter_8'), str(broken))
    with open(str(broken / 'rank_1.npz'), 'r+b') as f:
        f.truncate(1000)
    rest = check(train(workdir, 2, 'halves2', 'train.epochs=3',
                       resume='auto'))
    return whole, first, rest


@pytest.mark.slow
def test_p2_resumed_at_stale_step_continues_exactly(workdir, p2):
    _, _, rest = p2
    assert resumed_lines(rest) == [
        'resumed from halves2/snapshot_iter_8 at iteration 8']
    assert stale(8, 32) and not stale(6, 32)  # t = 8: no refresh due
    assert_same_state(workdir / 'whole2' / 'snapshot_iter_12',
                      workdir / 'halves2' / 'snapshot_iter_12')
    assert_same_log(workdir / 'whole2', workdir / 'halves2')
    # validation after the resume averages both ranks' results (each with
    # its own BN statistics)
    assert 'validation/main/loss' in log(workdir / 'halves2')[-1]


@pytest.mark.slow
def test_p2_resume_rebuilds_no_factor(workdir, p2):
    resumed = factor_bytes(workdir / 'halves2')
    whole = factor_bytes(workdir / 'whole2')
    assert resumed[9] == 0  # the first update after the resume (t = 8)
    assert all(whole[i] > 0 for i in range(1, 8))  # refreshes (t < 7)


@pytest.mark.slow
def test_p2_resume_skips_broken_and_leftover_snapshots(workdir, p2):
    out = workdir / 'halves2'
    assert sorted(os.listdir(str(out / 'snapshot_iter_12'))) == [
        'manifest.json', 'rank_0.npz', 'rank_1.npz']
    training.read_manifest(str(out / 'snapshot_iter_12'))  # replaced, whole
    assert not [n for n in os.listdir(str(out)) if n.startswith('.')]
    assert sorted(n for n in os.listdir(str(out)) if 'snapshot' in n) == [
        'snapshot_iter_12', 'snapshot_iter_8']


@pytest.mark.slow
def test_each_rank_writes_its_own_state(workdir, p2):
    snapshot = workdir / 'halves2' / 'snapshot_iter_8'
    r0, r1 = arrays(snapshot / 'rank_0.npz'), arrays(snapshot / 'rank_1.npz')
    # the iterators' positions and orders of local indices agree (every
    # rank's sampler is a function of (seed, epoch)), their data do not
    for key in ('updater/iterator:main/order',
                'updater/iterator:main/current_position'):
        assert key in r1
    for key in ('updater/mixup/x', 'updater/mixup/rng/keys',
                'updater/erase_rng/keys',
                'updater/model:main/predictor/bn1/avg_mean'):
        assert r0[key].shape == r1[key].shape, key
        assert not numpy.array_equal(r0[key], r1[key]), key
    assert 'updater/model:main/predictor/conv1/W' in r0
    assert 'updater/model:main/predictor/conv1/W' not in r1
    manifest = json.loads((snapshot / 'manifest.json').read_text())
    assert manifest['processes'] == 2 and manifest['t'] == 8
    assert set(manifest['layers'].values()) == {0, 1}
    prefix = 'updater/optimizer:main/kfac/'
    held = set(k[len(prefix):].rsplit('/', 1)[0] for k in r1
               if k.startswith(prefix))
    assert held == set(name.strip('/') for name, rank in
                       manifest['layers'].items() if rank == 1)
    for name, rank in manifest['layers'].items():
        data = (r0, r1)[rank]
        key = prefix + name.strip('/') + '/'
        factor = 'F' if '/bn' in name else 'G'
        assert data[key + factor].size > 0 and \
            data[key + factor + '_inv'].size > 0, name


# -- P = 3: resumed at a refresh step -----------------------------------------

@pytest.mark.slow
def test_p3_resumed_at_refresh_step_continues_exactly(workdir):
    p3 = ['train.batch_size=48', 'train.batch_per_process=16',
          'train.keep_snapshots=5', 'train.epochs=3']
    check(train(workdir, 3, 'whole3', *p3))
    (workdir / 'rest3').mkdir()
    shutil.copytree(str(workdir / 'whole3' / 'snapshot_iter_4'),
                    str(workdir / 'rest3' / 'snapshot_iter_4'))
    rest = check(train(workdir, 3, 'rest3', *p3, resume='auto'))
    assert resumed_lines(rest) == [
        'resumed from rest3/snapshot_iter_4 at iteration 4']
    assert not stale(4, 48) and stale(5, 48)
    # 43 examples per rank (padded), 16 per batch: the resumed epoch is
    # mid-way and the last one ends mid-batch
    assert_same_state(workdir / 'whole3' / 'snapshot_iter_9',
                      workdir / 'rest3' / 'snapshot_iter_9')
    assert_same_log(workdir / 'whole3', workdir / 'rest3')


# -- P = 4 -> 2 ---------------------------------------------------------------

def kfac_state(snapshot):
    """``{key: array}`` of every layer's K-FAC state, from its holder."""
    manifest = json.loads((snapshot / 'manifest.json').read_text())
    files = {r: arrays(snapshot / 'rank_{}.npz'.format(r))
             for r in range(manifest['processes'])}
    prefix = 'updater/optimizer:main/kfac/'
    out = {}
    for name, rank in manifest['layers'].items():
        key = prefix + name.strip('/') + '/'
        out.update({k: v for k, v in files[rank].items()
                    if k.startswith(key)})
    return manifest, out


@pytest.mark.slow
def test_p4_snapshot_resumed_on_p2_keeps_all_factors(workdir):
    p4 = ['train.batch_size=64', 'train.batch_per_process=16']
    check(train(workdir, 4, 'p4', *p4, 'train.epochs=2'))
    (workdir / 'p2from4').mkdir()
    shutil.copytree(str(workdir / 'p4' / 'snapshot_iter_4'),
                    str(workdir / 'p2from4' / 'snapshot_iter_4'))
    rest = check(train(workdir, 2, 'p2from4', *p4, 'train.epochs=3',
                       resume='auto'))
    lines = resumed_lines(rest)
    assert len(lines) == 1, rest.stdout[-3000:]
    assert lines[0].startswith(
        'resumed from p2from4/snapshot_iter_4 at iteration 8: saved as 16 '
        'per process x 4 processes x 1 accumulation steps, now 16 x 2 x 2: '
        'layer assignment re-planned, all factors kept; data: at epoch '
        '2.000'), lines
    assert 'BS 64 = 16 per process x 2 processes x 2 accumulation' \
        in rest.stdout
    # t = 4, 5 are stale: no factor sent at the first resumed update, and
    # every layer's factors and inverses at the end are the ones saved on
    # P = 4 (now held by the new owners)
    assert stale(4, 64) and stale(5, 64)
    assert factor_bytes(workdir / 'p2from4')[10] == 0
    saved_manifest, saved = kfac_state(workdir / 'p4' / 'snapshot_iter_4')
    final_manifest, final = kfac_state(
        workdir / 'p2from4' / 'snapshot_iter_12')
    assert final_manifest['t'] == 6 and final_manifest['processes'] == 2
    assert set(final_manifest['layers'].values()) == {0, 1}
    assert set(saved_manifest['layers'].values()) == {0, 1, 2, 3}
    assert saved.keys() == final.keys() and len(saved) == 161 * 3
    for key in saved:
        assert saved[key].size > 0, key
        numpy.testing.assert_array_equal(saved[key], final[key],
                                         err_msg=key)
    # the data continue from the same epoch: 128 examples = 2 epochs done
    r1 = arrays(workdir / 'p2from4' / 'snapshot_iter_12' / 'rank_1.npz')
    assert int(r1['updater/iterator:main/epoch']) == 3


# -- another config -----------------------------------------------------------

def listing(folder):
    return sorted((os.path.relpath(os.path.join(d, n), str(folder)),
                   os.stat(os.path.join(d, n)).st_mtime_ns)
                  for d, _, names in os.walk(str(folder)) for n in names)


@pytest.mark.parametrize('setting,message', [
    ('model.width=0.25', 'model.width differs: snapshot 0.125, now 0.25'),
    ('train.batch_size=64', 'train.batch_size differs: snapshot 32, now 64'),
])
@pytest.mark.slow
def test_snapshot_of_another_config_refused(workdir, p2, setting, message):
    out = workdir / 'other_{}'.format(setting.split('=')[0])
    out.mkdir()
    shutil.copytree(str(workdir / 'halves2' / 'snapshot_iter_8'),
                    str(out / 'snapshot_iter_8'))
    before = listing(out)
    proc = train(workdir, 2, out.name, 'train.epochs=3', setting,
                 resume='auto')
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith('error: ')]
    assert errors == ['error: --resume: {}/snapshot_iter_8: {}'.format(
        out.name, message)], proc.stderr[-3000:]
    assert listing(out) == before


# -- the library under mpiexec -n 4 -------------------------------------------

WORKER_CHECKS = ('failed_write_raises_on_every_rank',
                 'failed_write_leaves_previous',
                 'same_layout_restores_each_rank',
                 'other_layout_keeps_all_factors',
                 'other_identity_refused_on_every_rank')


@pytest.fixture(scope='module')
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp('snapshot_worker')
    proc = subprocess.run(
        [mpiexec(), '-n', '4', '--oversubscribe', sys.executable, WORKER,
         '--out', str(out)], cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    results = out / 'results.json'
    if proc.returncode != 0 or not results.exists():
        pytest.fail('snapshot worker failed (exit {}):\n{}'.format(
            proc.returncode, proc.stdout[-6000:]))
    return out, json.loads(results.read_text())


@pytest.mark.parametrize('name', WORKER_CHECKS)
def test_snapshot_worker(worker, name):
    _, results = worker
    assert set(results) == set(WORKER_CHECKS)
    assert results[name] == 'ok', results[name]


def remove(path):
    os.remove(str(path))


def cut(path):
    with open(str(path), 'r+b') as f:
        f.truncate(100)


def grow(path):
    with open(str(path), 'ab') as f:
        f.write(b'\0')


@pytest.mark.parametrize('damage,name', [
    (remove, 'rank_3.npz'), (cut, 'rank_2.npz'), (grow, 'rank_1.npz'),
    (remove, 'manifest.json'), (cut, 'manifest.json')])
def test_incomplete_snapshot_is_skipped(worker, tmp_path, damage, name):
    source, _ = worker
    out = tmp_path / 'out'
    shutil.copytree(str(source / 'run'), str(out))
    complete = str(out / 'snapshot_iter_4')
    assert training.find_latest_snapshot(str(out)) == complete
    shutil.copytree(complete, str(out / 'snapshot_iter_8'))
    assert training.find_latest_snapshot(str(out)) == \
        str(out / 'snapshot_iter_8')
    damage(out / 'snapshot_iter_8' / name)
    assert training.find_latest_snapshot(str(out)) == complete
    with pytest.raises(training.SnapshotError) as e:
        training.resolve_snapshot(str(out / 'snapshot_iter_8'), str(out))
    assert str(e.value).startswith('{}: incomplete snapshot: {}: '.format(
        out / 'snapshot_iter_8', name)), str(e.value)


# -- pieces -------------------------------------------------------------------

def test_identity_keys():
    cfg = config_module.load_config('synthetic.yaml')
    identity = cfg.identity(256)
    assert identity['data.examples'] == 256 and identity['n_class'] == 4
    assert identity['model.width'] == 0.125
    assert identity['train.batch_size'] == 32
    for key in config_module.MAY_DIFFER_ON_RESUME + ('data.n_class',
                                                     'model.n_class'):
        assert key not in identity, key
    other = config_module.load_config('synthetic.yaml', [
        'train.epochs=3', 'train.batch_per_process=8', 'data.loaderjobs=2',
        'train.device=cpu', 'data.train=elsewhere'])
    assert other.identity(256) == identity
    training.check_identity({'config': json.loads(json.dumps(identity))},
                            identity)
    changed = config_module.load_config('synthetic.yaml',
                                        ['optimizer.bn_fisher=full'])
    with pytest.raises(training.SnapshotError) as e:
        training.check_identity({'config': identity}, changed.identity(256))
    assert str(e.value) == \
        'optimizer.bn_fisher differs: snapshot diagonal, now full'


def test_seek_iterator_matches_iterating():
    import chainer
    for n, batch in ((10, 3), (12, 4), (7, 7), (43, 16)):
        for batches in range(0, 15):
            a, b = (chainer.iterators.SerialIterator(
                list(range(n)), batch,
                order_sampler=chainer.iterators.ShuffleOrderSampler(
                    numpy.random.RandomState(1))) for _ in range(2))
            for _ in range(batches):
                a.next()
            training.seek_iterator(b, batches)
            assert (a.epoch, a.current_position, a.is_new_epoch) == \
                (b.epoch, b.current_position, b.is_new_epoch)
            assert a.previous_epoch_detail == b.previous_epoch_detail or \
                abs(a.previous_epoch_detail - b.previous_epoch_detail) < 1e-12
            for _ in range(3):
                assert a.next() == b.next()


def test_file_under_a_snapshot_name_is_left_alone(tmp_path):
    from tests.datasets.test_data_pipeline import small_trainer
    old = tmp_path / 'snapshot_iter_2'
    old.write_bytes(b'a single-file snapshot of an earlier version')
    trainer = small_trainer(tmp_path, 3)
    with pytest.raises(training.SnapshotError) as e:
        trainer.run(show_loop_exception_msg=False)
    assert str(e.value).startswith(
        '{}: not a snapshot folder (a snapshot file of an earlier '
        'version?): move it away'.format(old)), str(e.value)
    assert old.read_bytes() == b'a single-file snapshot of an earlier version'
    assert training.find_latest_snapshot(str(tmp_path)) == \
        str(tmp_path / 'snapshot_iter_1')
