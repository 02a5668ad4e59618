"""The Fashion-MNIST reader on IDX files written here, and on the real
files where they are installed."""

import gzip
import os

import numpy
import pytest

from chainerkfac.datasets import DatasetError
from chainerkfac.datasets import fashion_mnist


def write_idx(path, magic, array, compress):
    header = numpy.array([magic] + list(array.shape), dtype='>u4').tobytes()
    data = header + array.astype(numpy.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path + ('.gz' if compress else ''), 'wb') as f:
        f.write(data)


def write_split(folder, split, images, labels, compress):
    names = fashion_mnist.FILES[split]
    write_idx(os.path.join(folder, names[0]), 2051, images, compress)
    write_idx(os.path.join(folder, names[1]), 2049, labels, compress)


@pytest.fixture
def small(tmp_path):
    rng = numpy.random.RandomState(0)
    data = {'train': (rng.randint(0, 256, (12, 28, 28)),
                      rng.randint(0, 10, 12)),
            'test': (rng.randint(0, 256, (5, 28, 28)), rng.randint(0, 10, 5))}
    for split, compress in (('train', True), ('test', False)):
        write_split(str(tmp_path), split, *data[split], compress=compress)
    return tmp_path, data


def test_reads_gzipped_and_plain_files(small):
    folder, data = small
    train, test = fashion_mnist.load_fashion_mnist(str(folder))
    for dataset, (images, labels) in ((train, data['train']),
                                      (test, data['test'])):
        assert len(dataset) == len(labels)
        x, t = dataset[3]
        assert x.dtype == numpy.float32 and x.shape == (1, 28, 28)
        assert t.dtype == numpy.int32 and t == labels[3]
        numpy.testing.assert_array_equal(x[0] * 255, images[3])


def test_environment_variable_picks_the_folder(small, monkeypatch):
    folder, data = small
    monkeypatch.setenv(fashion_mnist.ENV, str(folder))
    assert fashion_mnist.find_directory() == str(folder)
    train, _ = fashion_mnist.load_fashion_mnist()
    assert len(train) == 12


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DatasetError) as e:
        fashion_mnist.load_fashion_mnist(str(tmp_path))
    message = str(e.value)
    assert '\n' not in message
    assert str(tmp_path) in message and 'make fashion-mnist' in message


@pytest.mark.parametrize('damage,match', [
    ('truncate', 'truncated or corrupt'),
    ('magic', 'magic number 2049 .expected 2051.'),
    ('labels', '11 labels for 12 images'),
    ('size', 'images of 27x28 pixels'),
])
def test_damaged_files_are_one_line_errors(small, damage, match):
    folder, data = small
    images, labels = data['train']
    path = os.path.join(str(folder), fashion_mnist.FILES['train'][0] + '.gz')
    if damage == 'truncate':
        with gzip.open(path, 'rb') as f:
            raw = f.read()
        with gzip.open(path, 'wb') as f:
            f.write(raw[:-100])
    elif damage == 'magic':
        write_idx(path[:-3], 2049, images, True)
    elif damage == 'labels':
        write_split(str(folder), 'train', images, labels[:11], True)
    else:
        write_split(str(folder), 'train', images[:, 1:], labels, True)
    with pytest.raises(DatasetError, match=match) as e:
        fashion_mnist.load_fashion_mnist(str(folder))
    assert '\n' not in str(e.value)


def test_the_real_dataset():
    try:
        folder = fashion_mnist.find_directory()
    except DatasetError:
        pytest.skip('Fashion-MNIST is not installed (make fashion-mnist)')
    train, test = fashion_mnist.load_fashion_mnist(folder)
    assert (len(train), len(test)) == (60000, 10000)
    for dataset, per_class in ((train, 6000), (test, 1000)):
        labels = dataset._datasets[1]
        assert numpy.bincount(labels).tolist() == [per_class] * 10
        images = dataset._datasets[0]
        assert 0 <= images.min() and images.max() <= 1
