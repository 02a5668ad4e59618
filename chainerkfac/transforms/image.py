"""The paper's image transforms (Sec. 4.1-4.2) on CHW float32 arrays.

Training: random ``crop``×``crop`` crop, random horizontal flip, subtract the
mean image, scale by 1/255; validation: the center crop.  Random erasing with
zero is applied to the (mixed) batch.  Every random function takes its
``numpy.random.RandomState`` so runs are reproducible.
"""

import math
import typing

import numpy

import chainer
from chainer.types import NdArray


def random_crop(img: NdArray, size: int,
                rng: numpy.random.RandomState) -> NdArray:
    """A ``size``×``size`` window at a uniformly random position."""
    _, h, w = img.shape
    top = rng.randint(0, h - size + 1)
    left = rng.randint(0, w - size + 1)
    return img[:, top:top + size, left:left + size]


def center_crop(img: NdArray, size: int) -> NdArray:
    _, h, w = img.shape
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


def random_flip(img: NdArray, rng: numpy.random.RandomState) -> NdArray:
    """Horizontal flip with probability 1/2."""
    return img[:, :, ::-1] if rng.randint(2) else img


def normalize(img: NdArray, mean: NdArray) -> NdArray:
    """(img − mean) / 255: the mean-subtracted image on the [0, 1] scale."""
    return ((img - mean) / 255.).astype(numpy.float32)


def erasing_box(shape: typing.Sequence[int], rng: numpy.random.RandomState,
                p: float = 0.5,
                area: typing.Tuple[float, float] = (0.02, 0.25),
                aspect: typing.Tuple[float, float] = (0.3, 1.0)
                ) -> typing.Optional[typing.Tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of the rectangle random erasing
    blanks in an image of ``shape`` (C, H, W), or None (probability 1−p).

    Its area is S_e·H·W (S_e uniform in ``area``), its aspect ratio r_e = h/w
    uniform in ``aspect`` (h and w swapped with probability 1/2), redrawn
    until it fits."""
    if rng.uniform() >= p:
        return None
    _, h, w = shape
    while True:
        s = rng.uniform(*area) * h * w
        r = rng.uniform(*aspect)
        eh, ew = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))
        if rng.randint(2):
            eh, ew = ew, eh
        if 0 < eh <= h and 0 < ew <= w:
            break
    top, left = rng.randint(0, h - eh + 1), rng.randint(0, w - ew + 1)
    return top, left, eh, ew


def random_erasing(img: NdArray, rng: numpy.random.RandomState,
                   p: float = 0.5,
                   area: typing.Tuple[float, float] = (0.02, 0.25),
                   aspect: typing.Tuple[float, float] = (0.3, 1.0),
                   value: float = 0.) -> NdArray:
    """With probability ``p``, the rectangle of :func:`erasing_box` set to
    ``value`` (in a copy)."""
    return erase_batch(img[None], rng, p, area, aspect, value)[0]


def erase_batch(x: NdArray, rng: numpy.random.RandomState, p: float = 0.5,
                area: typing.Tuple[float, float] = (0.02, 0.25),
                aspect: typing.Tuple[float, float] = (0.3, 1.0),
                value: float = 0.) -> NdArray:
    """:func:`random_erasing` on each image of an (N, C, H, W) batch, on
    the batch's device (the rectangles are drawn on the host)."""
    out = x.copy()
    for i in range(len(x)):
        box = erasing_box(x.shape[1:], rng, p, area, aspect)
        if box is not None:
            top, left, eh, ew = box
            out[i, :, top:top + eh, left:left + ew] = value
    return out


class TrainTransform(object):
    """``(img, label, rng)`` → random crop, flip, normalized."""

    def __init__(self, mean, crop=224):
        self.mean = mean[:, :crop, :crop]
        self.crop = crop

    def __call__(self, img, label, rng):
        img = random_flip(random_crop(img, self.crop, rng), rng)
        return normalize(img, self.mean), label


class ValTransform(object):
    """``(img, label, rng)`` → center crop, normalized."""

    def __init__(self, mean, crop=224):
        self.mean = mean[:, :crop, :crop]
        self.crop = crop

    def __call__(self, img, label, rng=None):
        return normalize(center_crop(img, self.crop), self.mean), label


class TransformedDataset(chainer.dataset.DatasetMixin):
    """``transform(*base[i], rng)`` with ``rng = RandomState([seed, epoch,
    i])``: the random crops are a function of (seed, epoch, example), also in
    the data loader's worker processes."""

    def __init__(self, base, transform, seed=0):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get_example(self, i: int) -> tuple:
        rng = numpy.random.RandomState([self.seed, self.epoch, i])
        img, label = self.base[i]
        return self.transform(img, label, rng)
