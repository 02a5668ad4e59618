"""Stop on non-finite loss or parameters, before a bad snapshot is written."""

from chainer.training import extension

from chainerkfac import finite


class NonFiniteError(FloatingPointError):
    """A non-finite loss or parameter; the message names the iteration."""


class NonFiniteGuard(extension.Extension):
    """Checks ``main/loss`` and every parameter after each update (one
    host synchronization for all parameters).

    Its priority is above the writers', so the newest snapshot on disk is
    always the last good one.
    """

    trigger = 1, 'iteration'
    priority = extension.PRIORITY_WRITER + 100

    def __call__(self, trainer):
        iteration = trainer.updater.iteration
        model = trainer.updater.get_optimizer('main').target
        arrays = [('parameter ' + name, param.array)
                  for name, param in model.namedparams()]
        loss = trainer.observation.get('main/loss')
        if loss is not None:
            arrays.insert(0, ('loss', getattr(loss, 'array', loss)))
        what = finite.first_non_finite(arrays)
        if what is not None:
            raise NonFiniteError('non-finite {} at iteration {}'.format(
                what, iteration))
