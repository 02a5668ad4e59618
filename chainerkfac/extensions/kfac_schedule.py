import typing

import chainer
from chainer.training import extension

from chainerkfac import schedules


class KFACSchedule(extension.Extension):

    """Trainer extension to schedule the hyperparameters of K-FAC.

    At every iteration this extension sets ``lr`` (eq. 15), ``momentum``
    (eq. 16), ``damping`` (eq. 13-14), ``g_interval`` (eq. 20 or 21) and
    ``a_interval`` (``a_interval_factor`` times ``g_interval``) of the
    optimizer for the next update. The values are a pure function of the
    iteration (the optimizer's update count ``t``, which differs from the
    updater's iteration under gradient accumulation), so a resumed run gets
    the right values without serialization.

    This extension is also called before the training loop starts by default.

    Args:
        lr (float): Initial learning rate η(0).
        momentum (float): Initial momentum m(0).
        damping (float): Initial damping γ(0).
        damping_target (float): Target damping γ_target.
        e_start (float): Epoch at which the polynomial decay starts.
        e_end (float): Epoch at which the learning rate reaches 0.
        p_decay (float): Exponent of the polynomial decay.
        batch_size (int): Total (global) mini-batch size.
        n_train (int): Number of training examples.
        t_warmup (int): Number of warmup iterations of the damping. If it is
            ``None``, ``warmup_iterations(e_start, batch_size, n_train)``.
        stale (str): Stale Fisher rule: ``'eq20'``, ``'eq21'`` or ``'none'``.
        a_interval_factor (int): Ratio of the refresh interval of A to that
            of G.
        optimizer (~chainer.Optimizer): Target optimizer. If it is ``None``,
            the main optimizer of the updater is used.

    """

    trigger = 1, 'iteration'

    def __init__(self, lr, momentum, damping, damping_target, e_start, e_end,
                 p_decay, batch_size, n_train=schedules.IMAGENET_TRAIN_SIZE,
                 t_warmup=None, stale='eq20', a_interval_factor=1,
                 optimizer=None, momentum_schedule='eq16'):
        if t_warmup is None:
            t_warmup = schedules.warmup_iterations(
                e_start, batch_size, n_train)
        schedules.warmup_damping_alpha(damping, damping_target, t_warmup)
        schedules.stale_interval(stale, 0, 0)
        self._lr = lr
        self._momentum = momentum
        self._damping = damping
        self._damping_target = damping_target
        self._e_start = e_start
        self._e_end = e_end
        self._p_decay = p_decay
        self._batch_size = batch_size
        self._n_train = n_train
        self._t_warmup = t_warmup
        self._stale = stale
        self._a_interval_factor = a_interval_factor
        self._optimizer = optimizer
        # 'lr_ratio': m(0) throughout (the optimizer's update rule scales it
        # by η(t)/η(t−1))
        self._momentum_schedule = momentum_schedule

    @classmethod
    def from_config(cls, config: typing.Any, n_train: int,
                    optimizer: typing.Optional[chainer.Optimizer] = None
                    ) -> 'KFACSchedule':
        """The schedule of a trainer :class:`~chainerkfac.config.Config`
        (its ``optimizer`` section and ``train.batch_size``)."""
        o = config.optimizer
        return cls(lr=o.lr, momentum=o.momentum, damping=o.damping,
                   damping_target=o.damping_target, e_start=o.e_start,
                   e_end=o.e_end, p_decay=o.p_decay,
                   batch_size=config.train.batch_size, n_train=n_train,
                   stale=o.stale, optimizer=optimizer,
                   momentum_schedule=o.momentum_schedule)

    @property
    def t_warmup(self) -> int:
        """The iterations of the damping warmup (eq. 14)."""
        return self._t_warmup

    def values(self, iteration: int) -> dict:
        """The hyperparameters of the update of the given iteration."""
        e = schedules.epoch(iteration, self._batch_size, self._n_train)
        decay = self._e_start, self._e_end, self._p_decay
        interval = schedules.stale_interval(self._stale, iteration, e)
        return {
            'lr': schedules.polynomial_lr(e, self._lr, *decay),
            'momentum': self._momentum
            if self._momentum_schedule == 'lr_ratio' else schedules.momentum(
                e, self._lr, self._momentum, *decay),
            'damping': schedules.warmup_damping(
                iteration, self._damping, self._damping_target,
                self._t_warmup),
            'a_interval': self._a_interval_factor * interval,
            'g_interval': interval,
            'epoch': e,
        }

    def initialize(self, trainer: chainer.training.Trainer) -> None:
        self(trainer)

    def __call__(self, trainer):
        optimizer = self._optimizer or trainer.updater.get_optimizer('main')
        self.apply(optimizer, trainer.updater.iteration)

    def apply(self, optimizer: chainer.Optimizer,
              iteration: int = 0) -> None:
        """Sets the values of the optimizer's next update on it (a training
        loop without a trainer calls this before every update)."""
        # the number of real updates: with gradient accumulation the updater
        # counts micro-batches, the optimizer's ``t`` counts steps
        t = getattr(optimizer, 't', iteration)
        values = self.values(t)
        del values['epoch']
        for name, value in values.items():
            setattr(optimizer, name, value)
