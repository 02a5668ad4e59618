"""scikit-learn's digits (1,797 real 8×8 images) as Chainer datasets."""

import typing

import numpy

from chainer.datasets import TupleDataset


def get_digits(test_size: float = 0.2, dtype: typing.Any = numpy.float32,
               split_seed: int = 0
               ) -> typing.Tuple[TupleDataset, TupleDataset]:
    """``(train, test)`` TupleDatasets of ``(x (1, 8, 8) in [0, 1], label)``.

    The split is stratified and fixed by ``split_seed`` (80/20 by default).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(dtype)[:, None]
    y = digits.target.astype(numpy.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=split_seed, stratify=y)
    return TupleDataset(x_tr, y_tr), TupleDataset(x_te, y_te)
