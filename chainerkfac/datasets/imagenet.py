"""ImageNet as a folder tree or a file list, resized as in the paper
(Sec. 4.1).

Every image is resized to ``resize``×``resize`` ignoring its aspect ratio;
the mean image is the mean of the upper-left ``crop``×``crop`` of the
resized training images, computed once (all ranks share the work) and cached
in the output directory.
"""

import hashlib
import logging
import os
import time
import typing

import numpy
from PIL import Image

import chainer

from chainerkfac.distributed import communicator
from chainerkfac import errors
from chainerkfac import files

EXTENSIONS = ('.jpeg', '.jpg', '.png')

#: The mean-image pass reports to the trainer's logger (rank 0): one line
#: before it starts and, every ``PROGRESS_SECONDS``, how far it is.
logger = logging.getLogger('chainerkfac.trainer')
PROGRESS_SECONDS = 60.0


class DatasetError(ValueError):
    """A missing or empty dataset: one line naming the path."""


def _from_tree(path, classes=None):
    names = sorted(d for d in os.listdir(path)
                   if os.path.isdir(os.path.join(path, d)))
    if classes is None:
        classes = names
    label_of = dict((name, label) for label, name in enumerate(classes))
    pairs = []
    for name in names:
        if name not in label_of:
            raise DatasetError(
                '{}: class {!r} is not a class of the training set'.format(
                    path, name))
        folder = os.path.join(path, name)
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(EXTENSIONS):
                pairs.append((os.path.join(folder, f), label_of[name]))
    return pairs, names


def _from_list(path, root, n_class=None):
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
            label = int(parts[1])
            if label < 0 or (n_class is not None and label >= n_class):
                raise DatasetError(
                    '{}:{}: label {} is not in [0, {})'.format(
                        path, number, label,
                        'n_class' if n_class is None else n_class))
            image = os.path.join(root, parts[0])
            if not os.path.isfile(image):
                raise DatasetError('{}:{}: {}: no such file'.format(
                    path, number, image))
            pairs.append((image, label))
    n = max(label for _, label in pairs) + 1 if pairs else 0
    return pairs, [str(c) for c in range(n)]


def find_images(path: str, root: typing.Optional[str] = None,
                classes: typing.Optional[typing.Sequence[str]] = None,
                n_class: typing.Optional[int] = None
                ) -> typing.Tuple[list, typing.List[str]]:
    """``(pairs, classes)``: ``[(file, label)]`` of a folder tree
    ``path/<class>/*.JPEG`` or of a file list of ``relative/path label``
    lines (relative to ``root``, default the list's folder), and the class
    names found.

    In a tree, labels follow ``classes`` (the training set's class names;
    a folder not among them is an error naming it), by default the sorted
    folder names.  In a list, a label outside [0, ``n_class``) (negative
    ones always) is an error naming its line.
    """
    if not os.path.exists(path):
        raise DatasetError('{}: no such file or directory'.format(path))
    if os.path.isdir(path):
        pairs, names = _from_tree(path, classes)
    else:
        pairs, names = _from_list(path, root, n_class)
    if not pairs:
        raise DatasetError('{}: no images found'.format(path))
    return pairs, names


#: Pillow modes of more than 8 bits per channel, and their full range.
WIDE_MODES = {'I;16': 65535, 'I;16L': 65535, 'I;16B': 65535,
              'I;16N': 65535, 'I': None, 'F': None}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any mode Pillow reads.

    Pillow's ``convert('RGB')`` clips a 16-bit or 32-bit image to 255 (a
    16-bit PNG becomes solid white); such images are scaled by their value
    range instead: 16-bit by 255/65535, 32-bit integer and float ones by
    their own minimum and maximum.
    """
    if image.mode not in WIDE_MODES:
        return image.convert('RGB')
    values = numpy.asarray(image, dtype=numpy.float64)
    top = WIDE_MODES[image.mode]
    if top is None:
        low, high = float(values.min()), float(values.max())
        values = (values - low) * (255.0 / (high - low) if high > low else 0)
    else:
        values = values * (255.0 / top)
    gray = Image.fromarray(numpy.clip(numpy.rint(values), 0, 255).astype(
        numpy.uint8))
    return gray.convert('RGB')


def read_image(path: str, resize: int) -> numpy.ndarray:
    """float32 CHW RGB in [0, 255], resized ignoring the aspect ratio; an
    image that cannot be read is a :class:`DatasetError` naming its path."""
    try:
        with Image.open(path) as image:
            image = to_rgb(image).resize((resize, resize), Image.BILINEAR)
            array = numpy.asarray(image, dtype=numpy.float32)
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError('{}: cannot read the image: {}'.format(
            path, errors.one_line(e)))
    return array.transpose(2, 0, 1)


def _check_one(args):
    path, resize = args
    try:
        read_image(path, resize)
    except DatasetError as e:
        return str(e)
    return None


def check_images(paths: typing.Iterable[str], resize: int = 256,
                 processes: int = 1) -> typing.List[typing.Tuple[str, str]]:
    """``[(path, problem)]`` of the images in ``paths`` that cannot be
    read (each read and resized as training reads it), with ``processes``
    worker processes (as the loader's); empty when all are readable."""
    jobs = [(path, resize) for path in paths]
    if processes > 1 and len(jobs) > 1:
        import multiprocessing
        context = multiprocessing.get_context('forkserver')
        with context.Pool(processes) as pool:
            results = pool.map(_check_one, jobs, chunksize=64)
    else:
        results = [_check_one(job) for job in jobs]
    return [(path, problem) for (path, _), problem in zip(jobs, results)
            if problem is not None]


def split_warnings(n: int, local: int, processes: int,
                   batch: int) -> typing.List[str]:
    """What to say about a split of ``n`` examples into ``processes``
    equal parts of ``local`` (ChainerMN's ``scatter_dataset`` repeats
    examples to make them equal): examples seen twice per epoch, or fewer
    examples per process than its batch."""
    lines = []
    repeated = local * processes - n
    if repeated > 0:
        lines.append('{} training examples over {} processes: {} of them '
                     'are seen twice per epoch (each process gets {})'.format(
                         n, processes, repeated, local))
    if local < batch:
        lines.append('each process has {} training examples, fewer than its '
                     'batch of {}: every batch repeats examples'.format(
                         local, batch))
    return lines


class ImageNetDataset(chainer.dataset.DatasetMixin):
    """``(image, label)`` pairs: resized CHW float32 image, int32 label."""

    def __init__(self, pairs, resize=256):
        self.pairs = list(pairs)
        self.resize = resize

    def __len__(self):
        return len(self.pairs)

    def get_example(self, i: int
                    ) -> typing.Tuple[numpy.ndarray, numpy.int32]:
        path, label = self.pairs[i]
        return read_image(path, self.resize), numpy.int32(label)


def compute_mean(dataset: chainer.dataset.DatasetMixin, crop: int = 224,
                 comm: typing.Any = None,
                 progress: bool = True) -> numpy.ndarray:
    """Mean of the upper-left ``crop``×``crop`` of every image; with a
    ChainerMN ``comm``, rank r sums images r, r + P, ... and the sums are
    all-reduced.  With ``progress``, rank 0 logs one line before the pass
    (how many images, by how many processes) and, when it takes longer,
    one a minute and one at the end."""
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    total = numpy.zeros((3, crop, crop), numpy.float64)
    mine = range(rank, len(dataset), size)
    show = progress and rank == 0
    start = time.time()
    if show:
        logger.info('mean image: reading the %d training images once (%d '
                    'per process, %d processes) before the first update',
                    len(dataset), len(mine), size)
    last = start
    for k, i in enumerate(mine):
        total += dataset.get_example(i)[0][:, :crop, :crop]
        if show and time.time() - last >= PROGRESS_SECONDS:
            last = time.time()
            logger.info('mean image: %d of %d (%.0f s)', k + 1, len(mine),
                        last - start)
    if show and last > start:
        logger.info('mean image: done in %.0f s', time.time() - start)
    if comm is not None and size > 1:
        total = communicator.create_communicator(comm).sum_over_ranks(total)
    return (total / len(dataset)).astype(numpy.float32)


def dataset_key(pairs: typing.Iterable[typing.Tuple[str, int]],
                resize: int, crop: int) -> str:
    """A digest of the files (path, size, mtime), labels and sizes."""
    digest = hashlib.sha1('{} {}'.format(resize, crop).encode())
    for path, label in pairs:
        stat = os.stat(path)
        digest.update('{} {} {} {}\n'.format(
            path, label, stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def load_or_compute_mean(dataset: ImageNetDataset,
                         pairs: typing.Iterable[typing.Tuple[str, int]],
                         cache_dir: str, crop: int = 224,
                         comm: typing.Any = None) -> numpy.ndarray:
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
        with files.atomic_write(path) as f:
            numpy.save(f, mean)
    return mean
