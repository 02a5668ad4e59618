"""Bad data and early failures of the trainer: never a hang, never silently
wrong, one line naming the cause.

Each multi-process case runs ``scripts/train_imagenet.py`` under ``mpiexec
-n 2`` with a time limit far below a hang (an error on one rank must end
every rank); the data checks that need no launch run in this process.
"""

import os
import shutil
import subprocess
import sys

import numpy
import pytest

import tests
from PIL import Image

from chainerkfac import config as config_module
from chainerkfac.datasets import imagenet
from chainerkfac import schedules

from tests.mpi import mpi_env
from tests.mpi import mpiexec

ROOT = tests.ROOT
TRAIN = os.path.join(ROOT, 'scripts', 'train_imagenet.py')
MAKE = os.path.join(ROOT, 'scripts', 'make_synthetic_imagenet.py')
LIMIT = 90  # seconds: a hang is the cluster's time limit


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    path = tmp_path_factory.mktemp('failures')
    subprocess.check_call([sys.executable, MAKE, 'data', '--classes', '4',
                           '--per-class', '16', '--size', '40'],
                          cwd=str(path), env=mpi_env())
    return path


def launch(cwd, *args, n=2):
    if mpiexec() is None:
        pytest.skip('no mpiexec')
    command = [mpiexec(), '-n', str(n), '--oversubscribe', sys.executable,
               TRAIN, '--config', 'synthetic.yaml',
               '--set', 'data.train=data/train', 'data.val=data/val'] + \
        list(args)
    proc = subprocess.run(command, cwd=str(cwd), env=mpi_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=LIMIT)
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith('error: ')]
    return proc, errors


def copy_tree(tree, name):
    target = tree / name
    if target.exists():
        shutil.rmtree(str(target))
    shutil.copytree(str(tree / 'data'), str(target / 'data'))
    return target


def first_image(folder):
    cls = sorted(os.listdir(str(folder)))[0]
    return os.path.join(str(folder), cls, sorted(os.listdir(
        os.path.join(str(folder), cls)))[0])


# -- under mpiexec: every rank ends, with one line --------------------------

def test_unwritable_output_folder(tree):
    (tree / 'a_file').write_text('x')
    proc, errors = launch(tree, '--out', 'a_file/result')
    assert proc.returncode != 0
    assert len(errors) == 1 and errors[0].startswith(
        'error: --out: a_file/result: cannot write there'), proc.stderr


@pytest.mark.parametrize('damage', ['truncated', 'text'])
def test_unreadable_image_in_the_mean_image_pass(tree, damage):
    work = copy_tree(tree, 'bad_' + damage)
    broken = first_image(work / 'data' / 'train')
    if damage == 'truncated':
        with open(broken, 'rb') as f:
            head = f.read(200)
        with open(broken, 'wb') as f:
            f.write(head)
    else:
        with open(broken, 'w') as f:
            f.write('not an image\n')
    proc, errors = launch(work, '--out', 'result')
    assert proc.returncode != 0
    assert errors, proc.stderr[-2000:]
    assert os.path.relpath(broken, str(work)) in errors[-1] and \
        'cannot read the image' in errors[-1], errors


def file_list(work):
    """``path label`` lines of work's training images, relative to work
    (written to train.txt by the caller)."""
    images = sorted(os.path.relpath(os.path.join(d, f), str(work))
                    for d, _, fs in os.walk(str(work / 'data' / 'train'))
                    for f in fs)
    return ['{} {}'.format(p, i % 4) for i, p in enumerate(images)]


def test_missing_file_in_a_file_list(tree):
    work = copy_tree(tree, 'list')
    lines = file_list(work)
    lines.insert(2, 'data/train/gone.jpg 1')
    (work / 'train.txt').write_text('\n'.join(lines) + '\n')
    proc, errors = launch(work, '--set', 'data.train=train.txt', '--out',
                          'result')
    assert proc.returncode != 0
    assert len(errors) == 1 and \
        'train.txt:3: ' in errors[0] and 'gone.jpg: no such file' in \
        errors[0], proc.stderr[-2000:]
    assert not (work / 'result').exists()


def test_val_class_unknown_to_training_is_an_error(tree):
    work = copy_tree(tree, 'val_extra')
    extra = work / 'data' / 'val' / 'zebra'
    extra.mkdir()
    shutil.copy(first_image(work / 'data' / 'val'), str(extra / 'z.jpg'))
    proc, errors = launch(work, '--out', 'result')
    assert proc.returncode != 0
    assert len(errors) == 1 and "class 'zebra' is not a class of the " \
        "training set" in errors[0], proc.stderr[-2000:]


def test_damping_warmup_too_short_is_refused(tree):
    proc, errors = launch(tree, '--set', 'optimizer.e_start=0.01',
                          '--out', 'warmup')
    assert proc.returncode != 0
    assert len(errors) == 1 and 'optimizer.e_start' in errors[0] and \
        'at least 2*log10(damping/damping_target) = 2' in errors[0], \
        proc.stderr[-2000:]
    assert not (tree / 'warmup').exists()


# -- labels from class names ------------------------------------------------

def test_val_labels_follow_the_training_class_names(tmp_path):
    def folder(root, names):
        for name in names:
            (root / name).mkdir(parents=True)
            Image.new('RGB', (4, 4)).save(str(root / name / 'a.png'))
    folder(tmp_path / 'train', ['ant', 'bee', 'cat', 'dog'])
    folder(tmp_path / 'val', ['bee', 'dog'])  # no ant, no cat
    _, classes = imagenet.find_images(str(tmp_path / 'train'))
    pairs, _ = imagenet.find_images(str(tmp_path / 'val'), classes=classes)
    labels = {os.path.basename(os.path.dirname(p)): label
              for p, label in pairs}
    assert labels == {'bee': 1, 'dog': 3}  # not 0 and 1


def test_negative_or_too_large_label_in_a_list_is_an_error(tmp_path):
    Image.new('RGB', (4, 4)).save(str(tmp_path / 'a.png'))
    for label, n_class in ((-1, None), (4, 4)):
        (tmp_path / 'list.txt').write_text('a.png 0\na.png {}\n'.format(
            label))
        with pytest.raises(imagenet.DatasetError,
                           match=r'list.txt:2: label {} is not in '
                                 r'\[0, '.format(label)):
            imagenet.find_images(str(tmp_path / 'list.txt'),
                                 n_class=n_class)


# -- images of every mode ---------------------------------------------------

def test_16_bit_png_is_scaled_by_its_range_not_clipped(tmp_path):
    values = numpy.array([[0, 257 * 10], [257 * 128, 65535]], numpy.uint16)
    path = str(tmp_path / 'deep.png')
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith('I')
    out = imagenet.read_image(path, 2)
    assert out.shape == (3, 2, 2)
    numpy.testing.assert_array_equal(out[0], [[0, 10], [128, 255]])
    numpy.testing.assert_array_equal(out[0], out[2])


def test_float_image_is_scaled_by_its_own_range(tmp_path):
    values = numpy.array([[-1.0, 0.0], [1.0, 3.0]], numpy.float32)
    path = str(tmp_path / 'float.tiff')
    Image.fromarray(values, mode='F').save(path)
    out = imagenet.read_image(path, 2)
    numpy.testing.assert_array_equal(out[1], [[0, 64], [128, 255]])


@pytest.mark.parametrize('mode', ['L', 'P', 'RGBA', 'CMYK', 'LA', '1'])
def test_8_bit_modes_convert_as_pillow_does(tmp_path, mode):
    image = Image.new('RGB', (3, 3), (200, 100, 50)).convert(mode)
    path = str(tmp_path / 'x.{}'.format('tiff' if mode == 'CMYK' else 'png'))
    image.save(path)
    expected = numpy.asarray(Image.open(path).convert('RGB'),
                             numpy.float32).transpose(2, 0, 1)
    numpy.testing.assert_array_equal(imagenet.read_image(path, 3), expected)


# -- the config reader ------------------------------------------------------

@pytest.mark.parametrize('text,value', [('1e-3', 1e-3), ('1e8', 1e8),
                                        ('5E-4', 5e-4), ('-2.5e+2', -250.0),
                                        ('0.1', 0.1), ('.5e1', 5.0)])
def test_exponent_floats_are_floats(text, value):
    parsed = config_module.load_yaml(text)
    assert isinstance(parsed, float) and parsed == value
    assert config_module.load_yaml('12') == 12
    assert config_module.load_yaml('e8') == 'e8'


def test_set_takes_exponent_floats_and_refuses_words():
    cfg = config_module.load_config('synthetic.yaml',
                                    ['optimizer.lr=1e-1',
                                     'optimizer.damping=5e-2'])
    assert cfg.optimizer.lr == 0.1 and cfg.optimizer.damping == 0.05
    with pytest.raises(config_module.ConfigError, match='expected float'):
        config_module.load_config('synthetic.yaml', ['optimizer.lr=fast'])


def test_warmup_bound_matches_eq13():
    assert schedules.warmup_bound(0.05, 0.005) == pytest.approx(2.0)
    assert schedules.warmup_damping_alpha(0.05, 0.005, 2) == 1.0
    with pytest.raises(ValueError, match='too short'):
        schedules.warmup_damping_alpha(0.05, 0.005, 1)


# -- checking a dataset before a long run -----------------------------------

@pytest.mark.slow
def test_check_data_lists_every_unreadable_image(tree):
    work = copy_tree(tree, 'check')
    train = work / 'data' / 'train'
    broken = []
    for cls in sorted(os.listdir(str(train)))[:2]:
        name = sorted(os.listdir(str(train / cls)))[1]
        path = str(train / cls / name)
        with open(path, 'w') as f:
            f.write('broken\n')
        broken.append(os.path.relpath(path, str(work)))
    proc, errors = launch(work, '--check-data', '--out', 'result')
    assert proc.returncode == 1, proc.stderr[-2000:]
    listed = [line for line in proc.stdout.splitlines()
              if line.startswith('unreadable: ')]
    assert len(listed) == 2 and all(
        any(b in line for line in listed) for b in broken), proc.stdout
    assert 'images read in' in proc.stdout and '2 unreadable' in proc.stdout
    assert not (work / 'result').exists()
    ok, _ = launch(tree, '--check-data', '--out', 'result_ok')
    assert ok.returncode == 0 and '0 unreadable' in ok.stdout, ok.stderr
    assert not (tree / 'result_ok').exists()


def test_check_images_with_workers(tmp_path):
    good, bad = str(tmp_path / 'good.png'), str(tmp_path / 'bad.jpg')
    Image.new('RGB', (5, 5)).save(good)
    with open(bad, 'w') as f:
        f.write('x')
    for processes in (1, 2):
        found = imagenet.check_images([good, bad, good], 8, processes)
        assert [p for p, _ in found] == [bad]
        assert 'cannot read the image' in found[0][1]


def test_resume_auto_names_the_snapshots_it_skips(tmp_path, caplog):
    from chainerkfac import training
    for n in (4, 8):
        folder = tmp_path / 'snapshot_iter_{}'.format(n)
        folder.mkdir()
    with caplog.at_level('WARNING', logger='chainerkfac'):
        path = training.snapshot.resolve_snapshot('auto', str(tmp_path))
    assert path is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all('--resume auto: skipping' in line
                                   for line in lines)
    assert 'snapshot_iter_8' in lines[0]


@pytest.mark.slow
def test_uneven_split_is_said_in_one_line(tree):
    """64 examples over 3 processes: ChainerMN's equal split repeats 2."""
    proc, errors = launch(tree, '--set', 'train.batch_size=48',
                          'train.epochs=1', 'train.val_interval=1',
                          '--out', 'uneven', n=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines()
                if line.startswith('warning: ')]
    assert warnings == ['warning: 64 training examples over 3 processes: 2 '
                        'of them are seen twice per epoch (each process gets '
                        '22)'], proc.stderr[-2000:]


@pytest.mark.slow
def test_unreadable_validation_image_mid_run(tree):
    """The mean image reads the training set only: a broken validation
    image is met at the first validation, on the rank holding it."""
    work = copy_tree(tree, 'bad_val')
    broken = first_image(work / 'data' / 'val')
    with open(broken, 'w') as f:
        f.write('not an image\n')
    proc, errors = launch(work, '--set', 'train.epochs=2',
                          'train.val_interval=1', '--out', 'result')
    assert proc.returncode != 0
    assert errors and os.path.relpath(broken, str(work)) in errors[-1], \
        proc.stderr[-2000:]
    assert 'Exception in main training loop' not in proc.stderr


# -- wrong data under mpiexec: never rc 0 on wrong data ---------------------

def test_negative_label_in_a_file_list_under_mpiexec(tree):
    work = copy_tree(tree, 'neg_label')
    lines = file_list(work)
    lines[1] = lines[1].rsplit(' ', 1)[0] + ' -1'
    (work / 'train.txt').write_text('\n'.join(lines) + '\n')
    proc, errors = launch(work, '--set', 'data.train=train.txt', '--out',
                          'result')
    assert proc.returncode != 0
    assert len(errors) == 1 and 'train.txt:2: label -1 is not in [0, 4)' \
        in errors[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_val_tree_missing_a_class_keeps_the_other_labels(tree):
    """The val tree lacks the first class: its other classes keep their
    training labels (before, every label shifted by one), and one line says
    so."""
    work = copy_tree(tree, 'val_missing')
    val = work / 'data' / 'val'
    first = sorted(os.listdir(str(val)))[0]
    shutil.rmtree(str(val / first))
    proc, errors = launch(work, '--set', 'train.epochs=1', '--out',
                          'result')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data.val: 1 of 4 training classes have no validation images: ' \
        '{}'.format(first) in proc.stdout


@pytest.mark.slow
def test_16_bit_training_images_under_mpiexec(tree):
    """A tree of 16-bit grayscale PNGs: the mean image is that of the 8-bit
    grayscale images they were made from (Pillow's convert clips them to
    255: a white mean)."""
    work = tree / 'deep'
    if work.exists():
        shutil.rmtree(str(work))
    shutil.copytree(str(tree / 'data' / 'val'), str(work / 'data' / 'val'))
    total, count = 0, 0
    for cls in sorted(os.listdir(str(tree / 'data' / 'train'))):
        (work / 'data' / 'train' / cls).mkdir(parents=True)
        for name in sorted(os.listdir(str(tree / 'data' / 'train' / cls))):
            with Image.open(str(tree / 'data' / 'train' / cls / name)) as im:
                gray = numpy.asarray(im.convert('L').resize((40, 40)),
                                     numpy.uint16)
            Image.fromarray(gray * 257).save(str(
                work / 'data' / 'train' / cls / (name + '.png')))
            total = total + gray[:32, :32].astype(numpy.float64)
            count += 1
    proc, errors = launch(work, '--set', 'train.epochs=1', '--out',
                          'result')
    assert proc.returncode == 0, proc.stderr[-2000:]
    means = [f for f in os.listdir(str(work / 'result'))
             if f.startswith('mean_')]
    mean = numpy.load(str(work / 'result' / means[0]))
    numpy.testing.assert_allclose(mean, numpy.broadcast_to(
        total / count, mean.shape), atol=1e-3)


@pytest.mark.slow
def test_unreadable_training_image_at_the_first_update(tree):
    """The mean image comes from the cache (same paths, sizes and times),
    so the broken image is first met by the rank that trains on it."""
    work = copy_tree(tree, 'first_update')
    proc, _ = launch(work, '--check-data', '--out', 'result')  # warm up
    good, _ = launch(work, '--set', 'train.epochs=1', '--out', 'result')
    assert good.returncode == 0, good.stderr[-2000:]
    broken = first_image(work / 'data' / 'train')
    stat = os.stat(broken)
    with open(broken, 'wb') as f:
        f.write(b'\0' * stat.st_size)  # same size
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.rmtree(str(work / 'result' / 'snapshot_iter_2'),
                  ignore_errors=True)
    proc, errors = launch(work, '--set', 'train.epochs=1', '--out',
                          'result')
    assert proc.returncode != 0
    assert 'mean image' not in proc.stderr  # the cached mean was used
    assert errors and os.path.relpath(broken, str(work)) in errors[-1], \
        proc.stderr[-2000:]


def test_split_warnings():
    assert imagenet.split_warnings(64, 32, 2, 16) == []
    assert imagenet.split_warnings(5, 2, 3, 4) == [
        '5 training examples over 3 processes: 1 of them are seen twice per '
        'epoch (each process gets 2)',
        'each process has 2 training examples, fewer than its batch of 4: '
        'every batch repeats examples']
