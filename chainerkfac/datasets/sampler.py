"""The order of the training examples: a new reproducible shuffle per epoch.

The random crops and flips of the training transform, and the mixup and
random-erasing draws of the updater, are functions of (seed, epoch,
example), so a run resumed from a snapshot continues exactly (the
iterator's snapshot holds the current order; see
:mod:`chainerkfac.training.snapshot`).
"""

import typing

import chainer
import numpy


class EpochOrderSampler(object):
    """Shuffles the n local examples anew every epoch, reproducibly.

    The order of epoch k is ``RandomState([seed, k]).permutation(n)``,
    offset by k·n: the indices of :class:`EpochIndexed` tell the transform
    which epoch it draws for, so the random crops and flips are a function of
    (seed, epoch, example) even in the loader's worker processes, and a
    resumed run (the iterator's snapshot holds the current order) continues
    exactly.

    Args:
        seed: ``train.seed`` of the config.
        n: the number of local examples.
    """

    def __init__(self, seed: int, n: int) -> None:
        self.seed = seed
        self.n = n

    def __call__(self, current_order: numpy.ndarray,
                 current_position: int) -> numpy.ndarray:
        if len(current_order) == self.n:
            epoch = int(current_order[0]) // self.n + 1
        else:  # reset: chainer passes arange(len(dataset))
            epoch = 0
        rng = numpy.random.RandomState([self.seed, epoch])
        return rng.permutation(self.n) + epoch * self.n


class EpochIndexed(chainer.dataset.DatasetMixin):
    """Index ``k·n + i`` = example ``i`` of ``base`` drawn in epoch ``k``.

    Args:
        base: a dataset with ``set_epoch(k)`` (e.g.
            :class:`chainerkfac.transforms.TransformedDataset`).
        epochs: how many epochs the indices cover.
    """

    def __init__(self, base: typing.Any, epochs: int) -> None:
        self.base = base
        self.n = len(base)
        self.epochs = epochs

    def __len__(self) -> int:
        return self.n * self.epochs

    def get_example(self, j: int) -> typing.Any:
        epoch, i = divmod(int(j), self.n)
        self.base.set_epoch(epoch)
        return self.base.get_example(i)
