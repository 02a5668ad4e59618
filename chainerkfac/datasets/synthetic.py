"""A small learnable ImageNet-style JPEG folder tree, for the trainer.

    chainerkfac-make-synthetic OUT --classes K --per-class M --size S \\
        [--val-per-class V] [--seed 0]
    chainerkfac-make-synthetic OUT --sample-photos

(``python scripts/make_synthetic_imagenet.py`` takes the same arguments.)
Class k draws a shape (disc, square, horizontal bar, vertical bar, ring,
cross, ...) in a class-specific colour at a random position and size on a
randomly tinted, noisy background: ``OUT/train/class_<k>/*.JPEG`` and
``OUT/val/class_<k>/*.JPEG``, the tree :func:`chainerkfac.datasets.
find_images` reads.  ``--sample-photos`` instead cuts scikit-learn's two
sample photographs (china, flower) into random crops: a 2-class tree of
real photographs.
"""

import os
import typing

import numpy
from PIL import Image


SHAPES = ('disc', 'square', 'hbar', 'vbar', 'ring', 'cross')


def _mask(shape: str, size: int,
          rng: numpy.random.RandomState) -> numpy.ndarray:
    yy, xx = numpy.mgrid[:size, :size].astype(numpy.float32)
    r = rng.uniform(0.18, 0.32) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = numpy.abs(yy - cy), numpy.abs(xx - cx)
    dist = numpy.sqrt(dy ** 2 + dx ** 2)
    return {
        'disc': dist < r,
        'square': (dy < r) & (dx < r),
        'hbar': (dy < r / 3) & (dx < r * 1.4),
        'vbar': (dx < r / 3) & (dy < r * 1.4),
        'ring': (dist < r) & (dist > r * 0.6),
        'cross': ((dy < r / 4) | (dx < r / 4)) & (dy < r) & (dx < r),
    }[shape]


def synthetic_image(label: int, size: int,
                    rng: numpy.random.RandomState) -> numpy.ndarray:
    """HWC uint8: shape and colour of class ``label`` plus noise."""
    hue = numpy.array([(label * 97) % 256, (label * 53 + 80) % 256,
                       (label * 181 + 160) % 256], numpy.float32)
    background = rng.uniform(40, 200, 3).astype(numpy.float32)
    img = numpy.empty((size, size, 3), numpy.float32)
    img[...] = background
    mask = _mask(SHAPES[label % len(SHAPES)], size, rng)
    img[mask] = hue
    img += rng.normal(0, 12, img.shape)
    return numpy.clip(img, 0, 255).astype(numpy.uint8)


def write_tree(out: str, images_of: typing.Callable,
               counts: typing.Dict[str, tuple]) -> None:
    """``images_of(split, k, i)`` → HWC uint8 for ``counts[split]`` images
    per class ``k`` of each split."""
    for split, (classes, per_class) in counts.items():
        for k, name in enumerate(classes):
            folder = os.path.join(out, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(images_of(split, k, i)).save(
                    os.path.join(folder, '{}_{:05d}.JPEG'.format(name, i)),
                    quality=90)


def make_synthetic_tree(out: str, classes: int, per_class: int, size: int,
                        val_per_class: typing.Optional[int] = None,
                        seed: int = 0) -> None:
    """``classes`` classes of ``per_class`` training and ``val_per_class``
    (default max(5, per_class // 4)) validation images of ``size``²
    pixels, from the generators ``RandomState([seed, 0])`` (train) and
    ``RandomState([seed, 1])`` (val)."""
    val_per_class = val_per_class or max(5, per_class // 4)
    names = ['class_{}'.format(k) for k in range(classes)]
    rngs = {'train': numpy.random.RandomState([seed, 0]),
            'val': numpy.random.RandomState([seed, 1])}
    write_tree(out, lambda split, k, i: synthetic_image(k, size, rngs[split]),
               {'train': (names, per_class), 'val': (names, val_per_class)})


def make_sample_photo_tree(out: str, size: int = 64, per_class: int = 20,
                           val_per_class: int = 6, seed: int = 0) -> None:
    """Random ``size``² crops of scikit-learn's two sample photographs."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images  # china, flower: 427×640×3
    rng = numpy.random.RandomState(seed)

    def crop(split, k, i):
        photo = photos[k]
        side = rng.randint(size, min(photo.shape[:2]) // 2)
        top = rng.randint(0, photo.shape[0] - side + 1)
        left = rng.randint(0, photo.shape[1] - side + 1)
        return photo[top:top + side, left:left + side]
    names = ['china', 'flower']
    write_tree(out, crop, {'train': (names, per_class),
                           'val': (names, val_per_class)})
