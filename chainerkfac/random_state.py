"""NumPy random states in snapshots: saved as arrays (no pickle), restarted
from (seed, iteration) on another process layout."""

import typing

import numpy

import chainer

__all__ = ['get_random_state', 'serialize_random_state', 'seed_at']


def get_random_state(rng: numpy.random.RandomState) -> dict:
    """A RandomState's state as arrays (for npz snapshots, no pickle)."""
    _, keys, pos, has_gauss, cached = rng.get_state()
    return {'keys': keys, 'pos': numpy.int64(pos),
            'has_gauss': numpy.int64(has_gauss),
            'cached_gaussian': numpy.float64(cached)}


def serialize_random_state(serializer: chainer.AbstractSerializer,
                           rng: numpy.random.RandomState) -> None:
    """Saves or restores ``rng`` through a Chainer serializer."""
    state = get_random_state(rng)
    values = {key: serializer(key, value) for key, value in state.items()}
    if isinstance(serializer, chainer.serializer.Deserializer):
        rng.set_state(('MT19937', numpy.asarray(values['keys'], numpy.uint32),
                       int(values['pos']), int(values['has_gauss']),
                       float(values['cached_gaussian'])))


def seed_at(seed: typing.Any, iteration: int) -> typing.List[int]:
    """The seed of a random state restarted at ``iteration``: ``seed`` (an
    int or a sequence of ints) with the iteration appended."""
    return [int(v) for v in numpy.atleast_1d(seed)] + [int(iteration)]
