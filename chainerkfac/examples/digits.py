"""K-FAC vs MomentumSGD on scikit-learn's digits: the built-in main job."""

import typing

import numpy

import chainer
import chainer.functions as F
from chainer.dataset import concat_examples
from chainer import iterators

from chainerkfac import datasets
from chainerkfac import links
from chainerkfac import optimizers


#: Defaults shared by the demo script and the convergence test.
BATCHSIZE = 64
KFAC_HYPERPARAMS = dict(lr=0.02, momentum=0.9, damping=3e-2,
                        bn_damping_ratio=4.0)
SGD_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)


def make_optimizer(name: str, **kwargs: typing.Any) -> chainer.Optimizer:
    """``'kfac'`` (KFAC_HYPERPARAMS updated by kwargs) or ``'sgd'``."""
    if name == 'kfac':
        params = dict(KFAC_HYPERPARAMS, **kwargs)
        return optimizers.KFAC(**params)
    if name == 'sgd':
        return chainer.optimizers.MomentumSGD(**kwargs)
    raise ValueError('unknown optimizer {!r}: kfac or sgd'.format(name))


def accuracy(model: chainer.Link, dataset: typing.Sequence,
             batchsize: int = 512,
             device: typing.Optional[chainer.backend.Device] = None) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (inference mode)."""
    x, t = concat_examples(dataset[:], device)
    correct = 0
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for i in range(0, len(t), batchsize):
            y = model(x[i:i + batchsize]).array
            correct += int((y.argmax(axis=1) == t[i:i + batchsize]).sum())
    return correct / len(t)


def train(optimizer_name: str, seed: int, iterations: int,
          eval_every: int = 10, target: typing.Optional[float] = None,
          batchsize: int = BATCHSIZE, data: typing.Optional[tuple] = None,
          callback: typing.Optional[typing.Callable] = None,
          device: typing.Optional[chainer.backend.Device] = None,
          **optimizer_kwargs: typing.Any
          ) -> typing.List[typing.Tuple[int, float]]:
    """Trains a fresh DigitsCNN; returns ``[(iteration, test accuracy)]``.

    Stops early once the test accuracy reaches ``target`` (if given);
    ``callback(optimizer)``, if given, is called after every update.
    ``device``: a ``chainer.backend.Device`` (default: the CPU).
    """
    train_set, test_set = data or datasets.get_digits()
    numpy.random.seed(seed)
    model = links.DigitsCNN()
    if device is not None:
        model.to_device(device)
    optimizer = make_optimizer(optimizer_name, **optimizer_kwargs)
    optimizer.setup(model)
    order = iterators.ShuffleOrderSampler(numpy.random.RandomState(seed))
    it = iterators.SerialIterator(train_set, batchsize, order_sampler=order)

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)

    history = []
    for i in range(1, iterations + 1):
        x, t = concat_examples(it.next(), device)
        optimizer.update(lossfun, x, t)
        if callback is not None:
            callback(optimizer)
        if i % eval_every == 0 or i == iterations:
            acc = accuracy(model, test_set, device=device)
            history.append((i, acc))
            if target is not None and acc >= target:
                break
    return history


def iterations_to(history: typing.Iterable[typing.Tuple[int, float]],
                  target: float) -> typing.Optional[int]:
    """First iteration whose test accuracy reaches ``target``, or None."""
    for i, acc in history:
        if acc >= target:
            return i
    return None
