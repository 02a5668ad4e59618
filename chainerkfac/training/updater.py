"""The updater of Algorithm 1's training loop with the paper's schemes."""

import numpy

import chainer
from chainer.dataset import convert
from chainer import serializers
from chainer.training import updaters

from chainerkfac import framework
from chainerkfac import random_state


class KFACUpdater(updaters.StandardUpdater):
    """Batch → running mixup (eq. 9-10) → random erasing → optimizer update.

    The optimizer's target is called as ``target(x, t_soft, t_raw)``
    (:class:`~chainerkfac.training.MixupClassifier`).

    Args:
        iterator, optimizer, converter, device: as ``StandardUpdater``.
        mixup: a :class:`~chainerkfac.transforms.RunningMixup`.
        erase: ``erase(x, rng)`` on the mixed numpy batch, or None.
        seed (int): seed of the erasing random state.
    """

    #: Prefixes of the keys of :meth:`serialize` that are this process's
    #: own (its data iterator, running mixup, erasing random state): each
    #: rank's snapshot file holds its own
    #: (:mod:`chainerkfac.training.snapshot.partition`).
    process_keys = ('iterator:', 'mixup/', 'erase_rng/')

    def __init__(self, iterator, optimizer, mixup, erase=None, seed=0,
                 converter=convert.concat_examples, device=None):
        super(KFACUpdater, self).__init__(iterator, optimizer,
                                          converter=converter, device=device)
        self.mixup = mixup
        self.erase = erase
        self.seed = seed
        self.rng = numpy.random.RandomState(seed)

    def update_core(self) -> None:
        iterator = self._iterators['main']
        x, t = framework.call_converter(self.converter, iterator.next(),
                                         self.input_device)
        x_mixed, t_soft = self.mixup(x, t)
        if self.erase is not None:
            x_mixed = self.erase(x_mixed, self.rng)
        optimizer = self._optimizers['main']
        optimizer.update(optimizer.target, x_mixed, t_soft, t)
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)

    def restart_process_state(self) -> None:
        """Starts this process's own state over at the current iteration,
        for a run resumed on another process layout (whose iterator the
        caller positions, see :func:`seek_iterator`): running mixup forgets
        its previous virtual batch, and the erasing and mixup random states
        are re-seeded from (seed, iteration); the seed is per process."""
        self.rng = numpy.random.RandomState(
            random_state.seed_at(self.seed, self.iteration))
        self.mixup.restart(self.iteration)

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        super(KFACUpdater, self).serialize(serializer)
        self.mixup.serialize(serializer['mixup'])
        random_state.serialize_random_state(serializer['erase_rng'],
                                            self.rng)


def seek_iterator(iterator: chainer.dataset.Iterator, batches: int) -> None:
    """Moves a repeating Chainer iterator (``SerialIterator``,
    ``MultiprocessIterator``) from its start to where it is after
    ``batches`` batches, without loading any example.

    With ``n`` examples per epoch and batch ``b``, that is epoch
    ``⌊batches·b/n⌋`` at position ``batches·b mod n`` of that epoch's order;
    the order sampler is called once per epoch boundary, with the
    arguments the iterator passes it in training, so a sampler that is a
    function of the epoch (or of a random state advanced once per epoch)
    gives the order that epoch has in a run from the start.
    """
    start = serializers.DictionarySerializer()
    iterator.serialize(start)
    start = start.target
    if int(start['epoch']) != 0 or int(start['current_position']) != 0:
        raise ValueError('seek_iterator: the iterator is not at its start')
    order = start.get('order')
    sampler = iterator.order_sampler
    n = len(order) if order is not None else len(iterator.dataset)
    b = iterator.batch_size
    if not 0 < b <= n:
        raise ValueError('seek_iterator: batch {} over {} examples'.format(
            b, n))
    consumed = batches * b
    epoch, position = divmod(consumed, n)
    for e in range(epoch if order is not None else 0):
        crossing = -(-(e + 1) * n // b) - 1  # the batch that ends epoch e
        order = sampler(order, crossing * b - e * n)
    values = {
        'current_position': numpy.asarray(position),
        'epoch': numpy.asarray(epoch),
        'is_new_epoch': numpy.asarray(batches > 0 and position < b),
        'previous_epoch_detail': numpy.asarray(
            (consumed - b) / n if batches > 0 else -1.),
    }
    if order is not None:
        values['order'] = order
    iterator.serialize(serializers.NpzDeserializer(values))
