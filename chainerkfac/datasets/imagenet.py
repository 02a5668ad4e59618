"""ImageNet as a folder tree or a file list, resized as in the paper (Sec. 4.1).

Every image is resized to ``resize``×``resize`` ignoring its aspect ratio;
the mean image is the mean of the upper-left ``crop``×``crop`` of the
resized training images, computed once (all ranks share the work) and cached
in the output directory.
"""

import hashlib
import os
import sys

import numpy
from PIL import Image

import chainer

EXTENSIONS = ('.jpeg', '.jpg', '.png')


class DatasetError(ValueError):
    """A missing or empty dataset: one line naming the path."""


def _from_tree(path):
    classes = sorted(d for d in os.listdir(path)
                     if os.path.isdir(os.path.join(path, d)))
    pairs = []
    for label, name in enumerate(classes):
        folder = os.path.join(path, name)
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(EXTENSIONS):
                pairs.append((os.path.join(folder, f), label))
    return pairs, classes


def _from_list(path, root):
    root = root or os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                raise DatasetError('{}:{}: expected "path label", got {!r}'
                                   .format(path, number, line.strip()))
            pairs.append((os.path.join(root, parts[0]), int(parts[1])))
    n_class = max(label for _, label in pairs) + 1 if pairs else 0
    return pairs, [str(c) for c in range(n_class)]


def find_images(path, root=None):
    """``(pairs, classes)``: ``[(file, label)]`` of a folder tree
    ``path/<class>/*.JPEG`` (labels in sorted class order) or of a file list
    of ``relative/path label`` lines (relative to ``root``, default the
    list's folder)."""
    if not os.path.exists(path):
        raise DatasetError('{}: no such file or directory'.format(path))
    if os.path.isdir(path):
        pairs, classes = _from_tree(path)
    else:
        pairs, classes = _from_list(path, root)
    if not pairs:
        raise DatasetError('{}: no images found'.format(path))
    return pairs, classes


def read_image(path, resize):
    """float32 CHW RGB in [0, 255], resized ignoring the aspect ratio."""
    with Image.open(path) as image:
        image = image.convert('RGB').resize((resize, resize),
                                            Image.BILINEAR)
        array = numpy.asarray(image, dtype=numpy.float32)
    return array.transpose(2, 0, 1)


class ImageNetDataset(chainer.dataset.DatasetMixin):
    """``(image, label)`` pairs: resized CHW float32 image, int32 label."""

    def __init__(self, pairs, resize=256):
        self.pairs = list(pairs)
        self.resize = resize

    def __len__(self):
        return len(self.pairs)

    def get_example(self, i):
        path, label = self.pairs[i]
        return read_image(path, self.resize), numpy.int32(label)


def _progress(done, total):
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write('\rmean image [{}{}] {}/{}'.format(
        '#' * filled, '.' * (width - filled), done, total))
    if done == total:
        sys.stderr.write('\n')
    sys.stderr.flush()


def compute_mean(dataset, crop=224, comm=None, progress=True):
    """Mean of the upper-left ``crop``×``crop`` of every image; with a
    ChainerMN ``comm``, rank r sums images r, r + P, ... and the sums are
    all-reduced."""
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    total = numpy.zeros((3, crop, crop), numpy.float64)
    mine = range(rank, len(dataset), size)
    show = progress and rank == 0
    for k, i in enumerate(mine):
        total += dataset.get_example(i)[0][:, :crop, :crop]
        if show and (k % 50 == 0 or k == len(mine) - 1):
            _progress(k + 1, len(mine))
    if comm is not None and size > 1:
        from mpi4py import MPI
        out = numpy.empty_like(total)
        comm.mpi_comm.Allreduce(total, out, op=MPI.SUM)
        total = out
    return (total / len(dataset)).astype(numpy.float32)


def dataset_key(pairs, resize, crop):
    """A digest of the files (path, size, mtime), labels and sizes."""
    digest = hashlib.sha1('{} {}'.format(resize, crop).encode())
    for path, label in pairs:
        stat = os.stat(path)
        digest.update('{} {} {} {}\n'.format(
            path, label, stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def load_or_compute_mean(dataset, pairs, cache_dir, crop=224, comm=None):
    """The mean image, from ``cache_dir/mean_<key>.npy`` when the dataset is
    the same, else computed (all ranks) and written atomically by rank 0."""
    rank = comm.rank if comm is not None else 0
    key = dataset_key(pairs, dataset.resize, crop) if rank == 0 else None
    if comm is not None:
        key = comm.bcast_obj(key)
    path = os.path.join(cache_dir, 'mean_{}.npy'.format(key))
    if os.path.isfile(path):
        return numpy.load(path, allow_pickle=False)
    mean = compute_mean(dataset, crop, comm)
    if rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = '{}.tmp-{}'.format(path, os.getpid())
        with open(tmp, 'wb') as f:
            numpy.save(f, mean)
        os.replace(tmp, path)
    return mean
