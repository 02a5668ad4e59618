"""Fashion-MNIST (Xiao et al., 2017) from its four IDX files.

60,000 training and 10,000 test images of 28×28 pixels in 10 classes (MIT
licence).  The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped or not)
are read from the first folder that has them among: the ``directory``
argument, ``$CHAINERKFAC_FASHION_MNIST``, ``data/fashion-mnist`` of this
checkout and ``/usr/share/datasets/fashion-mnist`` (Debian's package
``dataset-fashion-mnist``; ``make fashion-mnist`` installs it).
"""

import gzip
import os
import typing

import numpy

from chainer import datasets

from chainerkfac.datasets.imagenet import DatasetError
from chainerkfac import errors

FILES = {  # split: (images, labels); 60,000 and 10,000 in the real files
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
IMAGE_MAGIC = 2051   # IDX: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049   # IDX: unsigned bytes, 1 dimension
N_CLASS = 10
SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
ENV = 'CHAINERKFAC_FASHION_MNIST'
CHECKOUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'data', 'fashion-mnist')
HOW_TO_GET = ('install Debian\'s dataset-fashion-mnist (make fashion-mnist) '
              'or pass the folder of the four IDX files')


def candidate_dirs(directory: typing.Optional[str] = None) -> list:
    """The folders searched, in order."""
    if directory is not None:
        return [directory]
    out = [os.environ[ENV]] if os.environ.get(ENV) else []
    return out + [CHECKOUT_DIR, SYSTEM_DIR]


def find_directory(directory: typing.Optional[str] = None) -> str:
    """The first candidate folder holding all four files."""
    for folder in candidate_dirs(directory):
        if all(_path(folder, name) for names in FILES.values()
               for name in names):
            return folder
    raise DatasetError('Fashion-MNIST: the IDX files are not in {} ({})'
                       .format(' or '.join(candidate_dirs(directory)),
                               HOW_TO_GET))


def _path(folder, name):
    """``folder/name`` or ``folder/name.gz``, whichever exists, or None."""
    for candidate in (os.path.join(folder, name),
                      os.path.join(folder, name + '.gz')):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_idx(path: str, magic: int, ndim: int) -> numpy.ndarray:
    """The uint8 array of the IDX file ``path`` (gzipped or not): checks its
    magic number and that the data bytes match the dimensions in its
    header (a truncated file is an error)."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError('{}: cannot read ({}): {}'.format(
            path, errors.one_line(e), HOW_TO_GET))
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DatasetError('{}: truncated ({} bytes)'.format(path, len(raw)))
    values = numpy.frombuffer(raw[:header], dtype='>u4')
    if int(values[0]) != magic:
        raise DatasetError('{}: magic number {} (expected {}): not this IDX '
                           'file'.format(path, int(values[0]), magic))
    shape = tuple(int(v) for v in values[1:])
    size = int(numpy.prod(shape))
    if len(raw) - header != size:
        raise DatasetError('{}: {} data bytes for dimensions {} ({} '
                           'expected): truncated or corrupt'.format(
                               path, len(raw) - header, shape, size))
    return numpy.frombuffer(raw, dtype=numpy.uint8, offset=header).reshape(
        shape)


def load_split(folder: str, split: str
               ) -> typing.Tuple[numpy.ndarray, numpy.ndarray]:
    """``(images (n, 1, 28, 28) float32 in [0, 1], labels (n,) int32)``."""
    images_name, labels_name = FILES[split]
    images_path = _path(folder, images_name)
    labels_path = _path(folder, labels_name)
    images = read_idx(images_path, IMAGE_MAGIC, 3)
    labels = read_idx(labels_path, LABEL_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise DatasetError('{}: images of {}x{} pixels, expected 28x28'
                           .format(images_path, *images.shape[1:]))
    if len(labels) != len(images):
        raise DatasetError('{}: {} labels for {} images'.format(
            labels_path, len(labels), len(images)))
    if len(labels) and labels.max() >= N_CLASS:
        raise DatasetError('{}: label {} out of range'.format(
            labels_path, int(labels.max())))
    x = (images.astype(numpy.float32) / 255.).reshape(-1, 1, 28, 28)
    return x, labels.astype(numpy.int32)


def load_fashion_mnist(directory: typing.Optional[str] = None) -> tuple:
    """``(train, test)``: Chainer datasets of (float32 image (1, 28, 28) in
    [0, 1], int32 label).

    Args:
        directory: the folder of the four IDX files (default: see the
            module's docstring).
    """
    folder = find_directory(directory)
    return tuple(datasets.TupleDataset(*load_split(folder, split))
                 for split in ('train', 'test'))
