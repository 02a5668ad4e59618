"""The paper's config on a small tree, through the trainer (one process):
what the config pins is checked against the data found, in one line."""

import os
import subprocess
import sys

import pytest

import tests

from chainerkfac.datasets.synthetic import make_synthetic_tree

from tests.mpi import mpi_env

TRAIN = os.path.join(tests.ROOT, 'scripts', 'train_imagenet.py')


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp('tree')
    make_synthetic_tree(str(root / 'data'), classes=4, per_class=10, size=16)
    return root


def train(cwd, *settings):
    return subprocess.run(
        [sys.executable, TRAIN, '--config', 'bs32k.yaml', '--out', 'out',
         '--set', 'data.train=data/train', 'data.val=data/val'] +
        list(settings), cwd=str(cwd), env=mpi_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def test_paper_config_on_a_small_tree_stops_with_one_line(tree):
    proc = train(tree)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        'error: {}: data.n_class 1000, data.n_train 1281167, but the training '
        'set has 4 classes, 40 images: --set data.n_class=4 data.n_train=40 '
        '(or data.n_class=auto data.n_train=auto: what the data has)'.format(
            os.path.join(tests.ROOT, 'chainerkfac', 'configs', 'bs32k.yaml'))
    ], proc.stderr
    assert not (tree / 'out').exists()


def test_auto_passes_the_data_check_and_says_how_long_an_update_takes(tree):
    """With ``auto`` the data check passes; the run then says that an
    update of BS 32,768 is 1,024 passes, and stops on the damping warmup
    (1 iteration for 40 images) before anything is written."""
    proc = train(tree, 'data.n_class=auto', 'data.n_train=auto')
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == (
        'each update accumulates 1024 passes of 32 images per process (BS '
        '32768 = 32 x 1 processes x 1024): the first update ends after 1024 '
        'passes, the first log line after 10240')
    assert 'data.n_class' not in proc.stderr
    assert 'the damping warmup is 1 iterations (e_start 1.5 epochs of 40 ' \
        'examples at batch 32768)' in proc.stderr, proc.stderr[-2000:]
    assert not (tree / 'out').exists()
