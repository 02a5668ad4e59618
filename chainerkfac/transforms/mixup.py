"""Running mixup (eq. 9-10): mix the batch with the previous virtual batch."""

import numpy

import chainer
from chainer import backend
from chainer.types import NdArray

from chainerkfac.random_state import seed_at
from chainerkfac.random_state import serialize_random_state


class RunningMixup(object):
    """x̃(t) = λx(t) + (1−λ)x̃(t−1), ỹ(t) likewise, λ ~ Beta(α, α) per step.

    Labels become one-hot rows.  The first step (no previous virtual batch)
    and ``alpha == 0`` return the batch itself.  When the batch size changes
    (a short last batch) the previous virtual batch's first rows are used.

    Args:
        alpha (float): α_mixup.
        n_class (int): number of classes.
        seed (int): seed of the λ draws.
    """

    def __init__(self, alpha, n_class, seed=0):
        self.alpha = alpha
        self.n_class = n_class
        self.seed = seed
        self.rng = numpy.random.RandomState(seed)
        self.previous = None  # (x̃, ỹ)

    def restart(self, iteration: int) -> None:
        """Starts over at ``iteration`` (a run resumed on another process
        layout): no previous virtual batch, the λ draws re-seeded from
        (seed, iteration)."""
        self.rng = numpy.random.RandomState(seed_at(self.seed, iteration))
        self.previous = None

    def one_hot(self, t: NdArray) -> NdArray:
        xp = backend.get_array_module(t)
        return xp.eye(self.n_class, dtype=numpy.float32)[t]

    def __call__(self, x, t):
        y = self.one_hot(t)
        if self.alpha > 0 and self.previous is not None:
            lam = numpy.float32(self.rng.beta(self.alpha, self.alpha))
            device = backend.get_device_from_array(x)
            px, py = (device.send(a) for a in self.previous)  # after a load
            n = min(len(x), len(px))
            x = x.copy()
            y = y.copy()
            x[:n] = lam * x[:n] + (1 - lam) * px[:n]
            y[:n] = lam * y[:n] + (1 - lam) * py[:n]
        self.previous = (x, y)
        return x, y

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        serialize_random_state(serializer['rng'], self.rng)
        has = serializer('has_previous', numpy.int64(
            self.previous is not None))
        if not has:
            self.previous = None
            return
        px, py = self.previous if self.previous is not None else (None, None)
        px = serializer('x', px)
        py = serializer('y', py)
        self.previous = (px, py)
