"""Stop on non-finite loss or parameters, before a bad snapshot is written."""

import numpy

import chainer
from chainer.training import extension


class NonFiniteError(FloatingPointError):
    """A non-finite loss or parameter; the message names the iteration."""


class NonFiniteGuard(extension.Extension):
    """Checks ``main/loss`` and every parameter after each update.

    Its priority is above the writers', so the newest snapshot on disk is
    always the last good one.
    """

    trigger = 1, 'iteration'
    priority = extension.PRIORITY_WRITER + 100

    def __call__(self, trainer):
        iteration = trainer.updater.iteration
        loss = trainer.observation.get('main/loss')
        if loss is not None and not numpy.isfinite(float(
                chainer.backend.CpuDevice().send(getattr(loss, 'array',
                                                         loss)))):
            raise NonFiniteError(
                'non-finite loss at iteration {}'.format(iteration))
        model = trainer.updater.get_optimizer('main').target
        for name, param in model.namedparams():
            xp = chainer.backend.get_array_module(param.array)
            if param.array is not None and not bool(
                    xp.isfinite(param.array).all()):
                raise NonFiniteError('non-finite parameter {} at iteration {}'
                                     .format(name, iteration))
