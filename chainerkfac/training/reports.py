"""Report extensions whose whole state is part of a snapshot, and the
trainer's three figures.

``loss.png`` and ``accuracy.png`` are Chainer's ``PlotReport`` with a
``postprocess`` that names the curves for a reader (training on mixup
samples, validation), labels the axes and draws chance (1/n_class) and the
target accuracy; ``lr_damping.png`` (:class:`HyperparameterPlot`) draws the
learning rate η and the damping γ on log axes and the momentum m of every
update, as :class:`~chainerkfac.extensions.KFACSchedule` set them.
"""

import json
import math
import os
import typing

import chainer
from chainer.training import extension
from chainer.training import extensions
from chainer.training import trigger as trigger_module
import numpy

from chainerkfac import plotting


class PlotReport(extensions.PlotReport):
    """Chainer's ``PlotReport`` that also saves its trigger and the
    observations gathered since its last point (as ``LogReport`` does), so
    that a resumed run draws the points of a run that never stopped."""

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        super(PlotReport, self).serialize(serializer)
        self._trigger.serialize(serializer['_trigger'])
        self._summary.serialize(serializer['_summary'])


def training_label(mixup: bool) -> str:
    """The legend of a training curve: mixup's accuracy and loss are those
    of the mixed-up samples (accuracy against the raw labels)."""
    return 'training ({}mean over the epoch)'.format(
        'mixup samples, ' if mixup else '')


def relabel(ax: typing.Any, labels: typing.Dict[str, str]) -> None:
    """Renames the lines Chainer labelled with reporter keys."""
    for line in ax.get_lines():
        label = line.get_label()
        if label in labels:
            line.set_label(labels[label])


def loss_postprocess(n_class: typing.Optional[int],
                     mixup: bool) -> typing.Callable:
    """``PlotReport``'s postprocess of ``loss.png``: axes, legend and
    the loss of a uniform prediction, ln(n_class)."""
    def postprocess(fig, ax, summary):
        relabel(ax, {'main/loss': training_label(mixup),
                     'validation/main/loss': 'validation'})
        if n_class:
            ax.axhline(math.log(n_class), color='gray', linestyle=':',
                       label='chance (ln {} = {:.3g})'.format(
                           n_class, math.log(n_class)))
        ax.set_xlabel('epoch')
        ax.set_ylabel('cross-entropy loss (nats per image)')
        ax.set_title('loss' + (' (training: soft targets of mixup)'
                               if mixup else ''), fontsize=10)
    return postprocess


def accuracy_postprocess(n_class: typing.Optional[int],
                         target: typing.Optional[float],
                         mixup: bool) -> typing.Callable:
    """``PlotReport``'s postprocess of ``accuracy.png``: axes, legend,
    chance 1/n_class and the target accuracy."""
    def postprocess(fig, ax, summary):
        relabel(ax, {'main/accuracy': training_label(mixup),
                     'validation/main/accuracy': 'validation'})
        if n_class:
            ax.axhline(1.0 / n_class, color='gray', linestyle=':',
                       label='chance (1/{} = {:.3g})'.format(
                           n_class, 1.0 / n_class))
        if target is not None:
            ax.axhline(target, color='C3', linestyle='--',
                       label='target ({:g})'.format(target))
        ax.set_ylim(0, 1)
        ax.set_xlabel('epoch')
        ax.set_ylabel('top-1 accuracy (fraction of images)')
        ax.set_title('top-1 accuracy' + (
            ' (training: mixed-up images against their raw labels)'
            if mixup else ''), fontsize=10)
    return postprocess


class LastValues(extension.Extension):
    """The last value reported for each of ``keys`` (e.g. the last
    validation's accuracy: the log averages its rows over
    ``log_interval``, which may span several validations)."""

    trigger = 1, 'iteration'
    priority = extension.PRIORITY_READER
    name = 'LastValues'

    def __init__(self, keys: typing.Sequence[str]) -> None:
        self.keys = tuple(keys)
        #: key -> its last reported value (a float)
        self.values = {}

    def __call__(self, trainer: chainer.training.Trainer) -> None:
        for key in self.keys:
            value = trainer.observation.get(key)
            if value is not None:
                if isinstance(value, chainer.Variable):
                    value = value.array
                self.values[key] = float(chainer.backend.CpuDevice().send(
                    value))


class HyperparameterPlot(extension.Extension):
    """``lr_damping.png``: the learning rate η (eq. 15) and the damping γ
    (eq. 13-14), each on its own log axis, and the momentum m (eq. 16) of
    every update, against the iteration t of the schedules (the
    optimizer's update count before the update, as
    :class:`~chainerkfac.extensions.KFACSchedule` counts it).

    Called every iteration, before the schedule sets the next update's
    values, it keeps one row per update in memory (saved in snapshots) and
    redraws the figure at ``draw_trigger`` and when training ends.

    Args:
        optimizer: the optimizer whose ``lr``, ``damping`` and ``momentum``
            are recorded.
        filename (str): written in the trainer's output folder.
        draw_trigger: when to redraw (and at the end).
        t_warmup (int): marked on the axes (the end of the damping
            warmup; with the trainer's configs also where the lr decay
            starts, e_start), or None.
    """

    trigger = 1, 'iteration'
    priority = extension.PRIORITY_WRITER
    KEYS = ('lr', 'damping', 'momentum')

    def __init__(self, optimizer: chainer.Optimizer,
                 filename: str = 'lr_damping.png',
                 draw_trigger: typing.Any = (1, 'epoch'),
                 t_warmup: typing.Optional[int] = None) -> None:
        self._optimizer = optimizer
        self._filename = filename
        self._draw_trigger = trigger_module.get_trigger(draw_trigger)
        self._t_warmup = t_warmup
        self._rows = []  # [t, lr, damping, momentum]
        self._path = None
        self._drawn = 0

    @property
    def rows(self) -> typing.List[list]:
        """``[t, lr, damping, momentum]`` of every update so far."""
        return self._rows

    def __call__(self, trainer: chainer.training.Trainer) -> None:
        self._path = os.path.join(trainer.out, self._filename)
        t = int(getattr(self._optimizer, 't', trainer.updater.iteration))
        # the values of the update that just ran, iteration t - 1
        if t > 0 and (not self._rows or t - 1 > self._rows[-1][0]):
            self._rows.append([t - 1] + [
                float(getattr(self._optimizer, key)) for key in self.KEYS])
        if self._draw_trigger(trainer) and not trainer.is_before_training:
            self.draw()

    def finalize(self) -> None:
        if self._path is not None and len(self._rows) > self._drawn:
            self.draw()

    def draw(self, path: typing.Optional[str] = None) -> typing.Any:
        """Writes the figure to ``path`` (default: the trainer's output
        folder) and returns it (closed)."""
        fig = plot_hyperparameters(self._rows, self._t_warmup)
        plotting.save_figure(fig, path or self._path, log=False)
        self._drawn = len(self._rows)
        return fig

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        if hasattr(self._draw_trigger, 'serialize'):
            try:
                self._draw_trigger.serialize(serializer['_draw_trigger'])
            except KeyError:  # a snapshot written without this figure
                pass
        if isinstance(serializer, chainer.serializer.Serializer):
            serializer('_rows', json.dumps(self._rows))
        else:
            try:
                self._rows = json.loads(str(serializer('_rows', '')))
            except KeyError:
                self._rows = []


def plot_hyperparameters(rows: typing.Sequence[typing.Sequence[float]],
                         t_warmup: typing.Optional[int] = None
                         ) -> typing.Any:
    """The figure of :class:`HyperparameterPlot` from its rows
    ``[t, lr, damping, momentum]``: three panels sharing the iteration
    axis, η and γ on log axes (non-positive values, e.g. η = 0 at the end
    of the decay, are left out of them)."""
    pyplot = plotting.pyplot()
    fig, axes = pyplot.subplots(3, 1, sharex=True, figsize=(7, 7))
    table = numpy.asarray(rows, dtype=float).reshape(-1, 4)
    t = table[:, 0]
    panels = (
        (1, 'learning rate η (eq. 15)', 'η', 'log', 'C0'),
        (2, 'damping γ (eq. 13-14)', 'γ', 'log', 'C1'),
        (3, 'momentum m (eq. 16)', 'm', 'linear', 'C2'))
    marker = '.' if len(t) <= 200 else None
    for ax, (column, ylabel, symbol, scale, color) in zip(axes, panels):
        y = table[:, column]
        if scale == 'log':
            y = numpy.where(y > 0, y, numpy.nan)
        ax.plot(t, y, color=color, marker=marker, markersize=3,
                linewidth=1.2, label='{} of each update'.format(symbol))
        ax.set_yscale(scale)
        ax.set_ylabel(ylabel)
        ax.grid(True, which='major', alpha=0.3)
        if t_warmup is not None and len(t) and t_warmup <= t[-1]:
            ax.axvline(t_warmup, color='gray', linestyle='--', linewidth=1,
                       label='t_warmup = {}{}'.format(t_warmup, (
                           ' (end of the damping warmup)'
                           if column == 1 else '')))
        ax.legend(fontsize=8, loc='best')
    axes[-1].set_xlabel('iteration t (optimizer updates)')
    axes[-1].set_ylim(-0.05, 1.05)
    fig.suptitle('K-FAC hyperparameters of every update (KFACSchedule)',
                 fontsize=10)
    return fig


def add_plots(trainer: chainer.training.Trainer,
              optimizer: chainer.Optimizer, *, n_class: typing.Optional[int],
              accuracy_target: typing.Optional[float], mixup: bool,
              draw_trigger: typing.Any,
              t_warmup: typing.Optional[int] = None) -> None:
    """``loss.png``, ``accuracy.png`` (per epoch) and ``lr_damping.png``
    (every update, redrawn at ``draw_trigger``) in the trainer's output
    folder; nothing without matplotlib."""
    if not PlotReport.available():
        return
    trainer.extend(PlotReport(
        ['main/loss', 'validation/main/loss'], 'epoch', filename='loss.png',
        postprocess=loss_postprocess(n_class, mixup)))
    trainer.extend(PlotReport(
        ['main/accuracy', 'validation/main/accuracy'], 'epoch',
        filename='accuracy.png',
        postprocess=accuracy_postprocess(n_class, accuracy_target, mixup)))
    trainer.extend(HyperparameterPlot(optimizer, 'lr_damping.png',
                                      draw_trigger, t_warmup))
