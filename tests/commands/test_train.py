"""scripts/train_imagenet.py end to end under mpiexec, bad input, resume."""

import json
import os
import subprocess
import sys

import numpy
import pytest

import tests

from chainerkfac import devices

from tests.mpi import mpi_env
from tests.mpi import mpiexec

ROOT = tests.ROOT
TRAIN = os.path.join(ROOT, 'scripts', 'train_imagenet.py')
MAKE = os.path.join(ROOT, 'scripts', 'make_synthetic_imagenet.py')


def run(cwd, args, n=2, timeout=600):
    command = [mpiexec(), '-n', str(n), '--oversubscribe', sys.executable,
               TRAIN] + list(args)
    return subprocess.run(command, cwd=str(cwd), env=mpi_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A folder with data/synthetic (the config's paths) and photos/."""
    path = tmp_path_factory.mktemp('train')
    env = mpi_env()
    subprocess.check_call([sys.executable, MAKE, 'data/synthetic',
                           '--classes', '4', '--per-class', '64',
                           '--size', '40'], cwd=str(path), env=env)
    subprocess.check_call([sys.executable, MAKE, 'photos', '--sample-photos'],
                          cwd=str(path), env=env)
    return path


def rank_file(snapshot, rank=0):
    """A rank's npz in a snapshot folder (rank 0's holds the whole
    trainer)."""
    return os.path.join(str(snapshot), 'rank_{}.npz'.format(rank))


def params(snapshot):
    with numpy.load(rank_file(snapshot), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files
                if k.startswith('updater/model:main/predictor/')}


@pytest.mark.slow
def test_synthetic_job(workdir):
    proc = run(workdir, ['--config', 'synthetic.yaml', '--out', 'result'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / 'result'
    assert 'BS 32 = 16 per process x 2 processes x 1 accumulation' \
        in proc.stdout
    log = json.loads((out / 'log').read_text())
    assert log[-1]['epoch'] == 16
    for name in ('loss.png', 'accuracy.png', 'lr_damping.png'):
        assert (out / name).stat().st_size > 0, name
    snaps = sorted(p.name for p in out.iterdir()
                   if p.name.startswith('snapshot_iter_'))
    assert snaps == ['snapshot_iter_120', 'snapshot_iter_128'], snaps
    final = [line for line in proc.stdout.splitlines()
             if line.startswith('final validation top-1')]
    assert final and final[0].endswith('(target 0.5: reached)'), final
    # parameters only change through K-FAC updates: 64 of them
    with numpy.load(rank_file(out / 'snapshot_iter_128'),
                    allow_pickle=False) as npz:
        assert int(npz['updater/optimizer:main/t']) == 128
    # Figure 5 log: every factor of the 107 layers exactly once per refresh
    # (each layer from its primary owner among the 2 ranks), 127 refreshes
    # after the first build (interval 1 before iteration 500)
    records = [json.loads(line) for line in
               (out / 'fisher_diff.jsonl').read_text().splitlines()]
    per_iteration = {}
    for r in records:
        per_iteration.setdefault(r['iteration'], []).append(
            (r['layer'], r['factor']))
        assert r['diff'] > 0
    assert sorted(per_iteration) == list(range(2, 129))
    factors = per_iteration[2]
    assert len(factors) == len(set(factors)) == 54 * 2 + 53
    assert sum(1 for _, f in factors if f == 'F') == 53
    assert all(sorted(v) == sorted(factors) for v in per_iteration.values())


@pytest.mark.slow
def test_sample_photo_tree(workdir):
    proc = run(workdir, ['--config', 'synthetic', '--out', 'photos_out',
                         '--set', 'data.train=photos/train',
                         'data.val=photos/val', 'data.n_class=2',
                         'data.resize=48', 'train.epochs=2',
                         'train.log_interval=1'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((workdir / 'photos_out' / 'log').read_text())
    assert log and 'validation/main/accuracy' in log[-1]


@pytest.mark.parametrize('args,n,message', [
    (['--set', 'train.bogus=1'], 2, 'train.bogus: unknown key'),
    (['--set', 'optimizer.lr=fast'], 2, 'optimizer.lr: expected float'),
    ([], 3, 'train.batch_size: 32 is not divisible by batch_per_process '
            '16 x 3 processes'),
    (['--set', 'data.train=missing/train'], 2,
     'data.train: missing/train: no such file or directory'),
    (['--resume', 'nothing_here'], 2, '--resume: nothing_here: no such'),
    (['--set', 'train.device=tpu'], 2,
     "train.device: 'tpu' is not one of auto, cpu, gpu"),
    pytest.param(['--set', 'train.device=gpu'], 2,
                 'train.device: gpu requested, but',
                 marks=pytest.mark.skipif(
                     devices.gpu_count() >= 2,
                     reason='2 GPUs: train.device=gpu is valid here')),
])
def test_bad_input_one_line_nothing_written(workdir, args, n, message):
    out = 'bad_{}'.format(abs(hash((tuple(args), n))))
    proc = run(workdir, ['--config', 'synthetic.yaml', '--out', out] + args,
               n=n, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (workdir / out).exists()


@pytest.mark.slow
def test_resume_continues_exactly(workdir):
    common = ['--config', 'synthetic.yaml', '--set', 'train.epochs=2',
              'train.snapshot_interval=4', 'train.mixup_alpha=0.4']
    whole = run(workdir, common + ['--out', 'whole'], n=1)
    assert whole.returncode == 0, whole.stderr[-3000:]
    half = run(workdir, common[:-3] + ['train.epochs=1',
                                       'train.snapshot_interval=4',
                                       'train.mixup_alpha=0.4',
                                       '--out', 'halves'], n=1)
    assert half.returncode == 0, half.stderr[-3000:]
    rest = run(workdir, common + ['--out', 'halves', '--resume', 'auto'],
               n=1)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert 'resumed from halves/snapshot_iter_16 at iteration 16' \
        in rest.stdout
    a = params(str(workdir / 'whole' / 'snapshot_iter_32'))
    b = params(str(workdir / 'halves' / 'snapshot_iter_32'))
    assert len(a) > 300 and a.keys() == b.keys()
    for key in a:
        numpy.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_data_loader_benchmark_and_learnable_data(workdir):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'bench_data_loader.py'),
         '--data', 'data/synthetic/train', '--batch', '8', '--jobs', '1',
         '--resize', '40', '--crop', '32', '--iterations', '3',
         '--step-seconds', '1e-6'],
        cwd=str(workdir), env=mpi_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert 'images/s' in proc.stdout
    assert 'loading is the bottleneck' in proc.stdout
    # the generated classes differ in colour: nearest class-mean colour on
    # the val images beats chance (0.25) by far
    from chainerkfac.datasets import imagenet
    colours = {}
    for split in ('train', 'val'):
        pairs, _ = imagenet.find_images(str(workdir / 'data/synthetic' /
                                            split))
        data = imagenet.ImageNetDataset(pairs, resize=16)
        colours[split] = [(data[i][0].reshape(3, -1), int(data[i][1]))
                          for i in range(len(data))]
    means = {k: numpy.mean([numpy.sort(x, axis=1)[:, -40:].mean(1)
                            for x, t in colours['train'] if t == k], axis=0)
             for k in range(4)}
    hits = [min(means, key=lambda k: numpy.linalg.norm(
        numpy.sort(x, axis=1)[:, -40:].mean(1) - means[k])) == t
        for x, t in colours['val']]
    assert numpy.mean(hits) > 0.5, numpy.mean(hits)


@pytest.mark.slow
def test_table3_config_through_set_with_loader_workers(workdir):
    """The used-by line, ``--config bs32k.yaml``, on the synthetic tree via
    ``--set``: MultiprocessIterator workers and gradient accumulation."""
    proc = run(workdir, [
        '--config', 'bs32k.yaml', '--out', 'bs32k',
        '--set', 'data.train=data/synthetic/train',
        'data.val=data/synthetic/val', 'data.n_class=4', 'data.n_train=256',
        'data.resize=40', 'data.crop=32', 'data.loaderjobs=2',
        'model.width=0.125', 'train.batch_size=32',
        'train.batch_per_process=8', 'train.epochs=2', 'train.log_interval=2'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'BS 32 = 8 per process x 2 processes x 2 accumulation steps' \
        in proc.stdout
    with numpy.load(rank_file(workdir / 'bs32k' / 'snapshot_iter_32'),
                    allow_pickle=False) as npz:
        assert int(npz['updater/optimizer:main/t']) == 16  # 32 / 2 steps
        assert int(npz['updater/iteration']) == 32
