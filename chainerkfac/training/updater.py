"""The updater of Algorithm 1's training loop with the paper's schemes."""

import numpy

from chainer.dataset import convert
from chainer.training import updaters

from chainerkfac.transforms import mixup as mixup_module


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

    def __init__(self, iterator, optimizer, mixup, erase=None, seed=0,
                 converter=convert.concat_examples, device=None):
        super(KFACUpdater, self).__init__(iterator, optimizer,
                                          converter=converter, device=device)
        self.mixup = mixup
        self.erase = erase
        self.rng = numpy.random.RandomState(seed)

    def update_core(self):
        iterator = self._iterators['main']
        x, t = convert._call_converter(self.converter, iterator.next(),
                                       self.input_device)
        x_mixed, t_soft = self.mixup(x, t)
        if self.erase is not None:
            x_mixed = self.erase(x_mixed, self.rng)
        optimizer = self._optimizers['main']
        optimizer.update(optimizer.target, x_mixed, t_soft, t)
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)

    def serialize(self, serializer):
        super(KFACUpdater, self).serialize(serializer)
        self.mixup.serialize(serializer['mixup'])
        mixup_module.serialize_random_state(serializer['erase_rng'],
                                            self.rng)
