"""Every figure the project writes, opened as matplotlib data: labelled
axes, readable legends, and what each figure must let a reader tell apart
(the trainer's accuracy, loss and hyperparameters; the schedules, Diff(t)
percentiles, scaling model, Fisher memory, batch-scaling study and the
comparison with peer libraries)."""

import json
import math
import os

import numpy
import pytest

import chainerkfac  # noqa: F401 (first)
import chainer
import chainer.links as L
from chainer import training
from chainer.training import extensions

from chainerkfac.examples import batch_scaling
from chainerkfac.examples import fisher_diff_figure
from chainerkfac.examples import fisher_memory
from chainerkfac.examples import peers_figure
from chainerkfac.examples import scaling_model
from chainerkfac.examples import schedules_figure
from chainerkfac.extensions import fisher_diff
from chainerkfac.extensions import KFACSchedule
from chainerkfac import config as config_module
from chainerkfac import optimizers
from tests.examples.test_figures import fisher_memory_results
from chainerkfac import plotting
from chainerkfac.training import reports

def assert_labelled(fig):
    assert plotting.unlabelled_axes(fig) == []


def legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def lines_by_label(fig):
    return {line.get_label(): line for ax in fig.get_axes()
            for line in ax.get_lines()}


# -- the checker itself ------------------------------------------------------
def test_unlabelled_axes_names_what_is_missing():
    pyplot = plotting.pyplot()
    fig, (bare, done) = pyplot.subplots(1, 2)
    bare.plot([0, 1], [0, 1], label='a')
    bare.plot([0, 1], [1, 0], label='b')
    done.plot([0, 1], [0, 1], label='a')
    done.set_xlabel('epoch')
    done.set_ylabel('loss (nats)')
    problems = plotting.unlabelled_axes(fig)
    pyplot.close(fig)
    assert problems == ["axes 0 (''): no x label", "axes 0 (''): no y label",
                        "axes 0 (''): 2 labelled lines, no legend"]


def test_stacked_panels_share_the_x_label():
    pyplot = plotting.pyplot()
    fig, axes = pyplot.subplots(2, 1, sharex=True)
    for ax in axes:
        ax.plot([0, 1], [0, 1])
        ax.set_ylabel('y (units)')
    axes[1].set_xlabel('iteration')
    assert plotting.unlabelled_axes(fig) == []
    pyplot.close(fig)


# -- the trainer's figures ----------------------------------------------------
@pytest.fixture
def saved_figures(monkeypatch):
    """``{file name: Figure}`` of every figure saved while the test runs."""
    from matplotlib import figure
    saved = {}
    original = figure.Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[os.path.basename(str(fname))] = self
        return original(self, fname, *args, **kwargs)
    monkeypatch.setattr(figure.Figure, 'savefig', savefig)
    return saved


def small_trainer(out, epochs=3, n_class=3, t_warmup=4, draw=(5,
                                                             'iteration')):
    """A 60-example, 3-class K-FAC run with the trainer's three figures:
    batch 10, 6 updates per epoch."""
    rng = numpy.random.RandomState(0)
    x = rng.randn(60, 4).astype(numpy.float32)
    t = rng.randint(0, n_class, 60).astype(numpy.int32)
    data = chainer.datasets.TupleDataset(x, t)
    model = L.Classifier(L.Linear(4, n_class))
    optimizer = optimizers.KFAC(lr=0.05, damping=0.05)
    optimizer.setup(model)
    train_iter = chainer.iterators.SerialIterator(data, 10)
    val_iter = chainer.iterators.SerialIterator(data, 30, repeat=False,
                                                shuffle=False)
    updater = training.updaters.StandardUpdater(train_iter, optimizer)
    trainer = training.Trainer(updater, (epochs, 'epoch'), out=str(out))
    trainer.extend(KFACSchedule(
        lr=0.1, momentum=0.9, damping=0.05, damping_target=0.005,
        e_start=0.5, e_end=epochs, p_decay=2.0, batch_size=10, n_train=60,
        t_warmup=t_warmup))
    trainer.extend(extensions.Evaluator(val_iter, model), name='validation')
    reports.add_plots(trainer, optimizer, n_class=n_class,
                      accuracy_target=0.8, mixup=True, draw_trigger=draw,
                      t_warmup=t_warmup)
    return trainer, optimizer


def test_trainer_figures_are_labelled_with_chance_and_target(
        tmp_path, saved_figures):
    trainer, optimizer = small_trainer(tmp_path)
    trainer.run()
    for name in ('accuracy.png', 'loss.png', 'lr_damping.png'):
        assert (tmp_path / name).stat().st_size > 5000, name
        assert_labelled(saved_figures[name])

    (ax,) = saved_figures['accuracy.png'].get_axes()
    texts = legend_texts(ax)
    assert not [t for t in texts if 'main/' in t], texts
    assert texts[:2] == ['training (mixup samples, mean over the epoch)',
                         'validation']
    assert 'chance (1/3 = 0.333)' in texts and 'target (0.8)' in texts
    levels = {line.get_label(): line.get_ydata()[0]
              for line in ax.get_lines()}
    assert levels['chance (1/3 = 0.333)'] == pytest.approx(1 / 3)
    assert levels['target (0.8)'] == pytest.approx(0.8)
    assert 'fraction' in ax.get_ylabel() and ax.get_xlabel() == 'epoch'
    assert 'mixed-up' in ax.get_title()

    (ax,) = saved_figures['loss.png'].get_axes()
    assert 'nats' in ax.get_ylabel()
    assert 'chance (ln 3 = 1.1)' in legend_texts(ax)


def test_lr_damping_every_update_on_log_axes(tmp_path, saved_figures):
    trainer, optimizer = small_trainer(tmp_path)
    trainer.run()
    fig = saved_figures['lr_damping.png']
    lr_ax, damping_ax, momentum_ax = fig.get_axes()
    assert lr_ax.get_yscale() == 'log' and damping_ax.get_yscale() == 'log'
    assert 'momentum' in momentum_ax.get_ylabel()
    assert 'learning rate' in lr_ax.get_ylabel()
    assert 'damping' in damping_ax.get_ylabel()
    # 18 updates, one point each (drawn every 5 iterations and at the end)
    schedule = trainer.get_extension('KFACSchedule')
    lines = {ax: ax.get_lines()[0] for ax in fig.get_axes()}
    for ax, key in zip((lr_ax, damping_ax, momentum_ax),
                       ('lr', 'damping', 'momentum')):
        x, y = lines[ax].get_data()
        assert list(x) == list(range(18))
        expected = [schedule.values(t)[key] for t in range(18)]
        assert numpy.allclose(y, expected, rtol=1e-12), key
    # the damping warmup: γ falls from γ(0) to near γ_target by t_warmup
    assert lines[damping_ax].get_ydata()[0] == pytest.approx(0.05)
    marks = [line for line in damping_ax.get_lines()
             if line.get_label().startswith('t_warmup = 4')]
    assert marks and marks[0].get_xdata()[0] == 4


def test_lr_damping_rows_survive_a_snapshot(tmp_path):
    trainer, optimizer = small_trainer(tmp_path, epochs=1)
    trainer.run()
    plot = trainer.get_extension('HyperparameterPlot')
    assert len(plot.rows) == 6
    target = {}
    plot.serialize(chainer.serializers.DictionarySerializer(target))
    numpy.savez(str(tmp_path / 'saved.npz'), **target)
    again = reports.HyperparameterPlot(optimizer)
    with numpy.load(str(tmp_path / 'saved.npz')) as npz:
        again.serialize(chainer.serializers.NpzDeserializer(npz))
    assert again.rows == plot.rows
    # a snapshot written before this figure existed: an empty figure
    numpy.savez(str(tmp_path / 'old.npz'), other=numpy.zeros(1))
    older = reports.HyperparameterPlot(optimizer)
    with numpy.load(str(tmp_path / 'old.npz')) as npz:
        older.serialize(chainer.serializers.NpzDeserializer(npz))
    assert older.rows == []


# -- the scripts' figures -----------------------------------------------------
def test_schedules_figure_keeps_bs32k_visible_under_bs32k_eq21(tmp_path):
    results = []
    for name in ('bs32k', 'bs32k_eq21'):
        cfg = config_module.load_config(name)
        results.append((name, schedules_figure.trajectory(cfg, 1281167)))
    fig = schedules_figure.plot(results, str(tmp_path / 'schedules.png'))
    assert_labelled(fig)
    assert fig.legends or all(ax.get_legend() for ax in fig.get_axes())
    ax = fig.get_axes()[0]
    lower, upper = ax.get_lines()[:2]
    assert upper.get_label() == 'bs32k_eq21'
    # where both coincide, the wider solid line shows around the dashed one
    assert upper.get_linestyle() != lower.get_linestyle()
    assert lower.get_linewidth() > upper.get_linewidth()
    assert upper.get_marker() not in (None, 'None', '')
    assert ax.get_yscale() == 'log'  # η spans decades


def test_fisher_diff_percentiles_are_distinguishable(tmp_path):
    rows = [{'iteration': t, 'layer': '/l{}'.format(k), 'factor': f,
             'diff': 0.1 * (1 + k) * (2 if f == 'G' else 1)}
            for t in range(2, 30) for k in range(6) for f in 'AG']
    path = tmp_path / 'diff.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    log = fisher_diff.read_log(str(path))
    fig = fisher_diff_figure.plot([log], ['run'], str(tmp_path / 'd.png'),
                                  mark=500)
    assert_labelled(fig)
    lines = lines_by_label(fig)
    low = lines['5th percentile over layers']
    high = lines['95th percentile over layers']
    assert low.get_color() != high.get_color()
    assert low.get_marker() != high.get_marker()
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert '5th percentile over layers' in legend
    assert '95th percentile over layers' in legend


def test_scaling_legend_covers_no_curve(tmp_path):
    processes = [1, 2, 8, 64]
    values = {name: [1.0 + 0.1 * k + 0.01 * p for p in processes]
              for k, name in enumerate(scaling_model.CURVES)}
    fig = scaling_model.plot([('model', values, None),
                              ('here', values, {1: 1.2, 2: 1.1})],
                             processes, str(tmp_path / 'scaling.png'))
    assert_labelled(fig)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure is closed
    fig.draw(renderer)
    for ax in fig.get_axes():
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer))
        assert ax.get_xscale() == 'log' and ax.get_yscale() == 'log'


def test_fisher_memory_and_batch_scaling_figures_are_labelled(tmp_path):
    assert_labelled(fisher_memory.plot_bars(fisher_memory_results(),
                                            str(tmp_path / 'memory.png')))
    rows = [{'optimizer': name, 'batch_size': b, 'steps': s}
            for name in ('kfac', 'sgd')
            for b, s in ((32, 400), (128, 120), (512, math.inf))]
    fig = batch_scaling.plot(rows, str(tmp_path / 'bs.png'), 0.8)
    assert_labelled(fig)
    (ax,) = fig.get_axes()
    assert 'images' in ax.get_xlabel() and ax.get_xscale() == 'log'


def test_peers_figure_shows_absolute_times_and_every_peer(tmp_path):
    frameworks = ('chainerkfac', 'asdl', 'kfac-jax')
    resnet = {'chainerkfac': {'kfac': 14.8, 'sgd': 5.6},
              'asdl': {'kfac': 13.7, 'sgd': 1.95},
              'kfac-jax': "failed: ModuleNotFoundError: No module named "
                          "'kfac_jax'"}
    digits = {'chainerkfac': {'lr 0.05 γ 0.03': 15, 'lr 0.02 γ 0.03': None},
              'asdl': {'lr 0.05 γ 0.03': None},
              'kfac-jax': "failed: ModuleNotFoundError: No module named "
                          "'kfac_jax'"}
    fig = peers_figure.plot(resnet, digits, str(tmp_path / 'peers.png'),
                            frameworks, '112x112, batch 32')
    assert_labelled(fig)
    absolute, ratio, race = fig.get_axes()
    assert '(s' in absolute.get_ylabel()
    heights = sorted(round(bar.get_height(), 2)
                     for bars in absolute.containers for bar in bars)
    assert heights == [0, 0, 1.95, 5.6, 13.7, 14.8]
    assert 'ratio' in ratio.get_ylabel()
    for ax in fig.get_axes():
        assert [t.get_text() for t in ax.get_xticklabels()] == \
            list(frameworks)
    texts = [t.get_text().replace('\n', ' ') for ax in fig.get_axes()
             for t in ax.texts]
    assert sum("not installed: No module named 'kfac_jax'" in t
               for t in texts) == 3
    assert 'not within 400 iterations' in texts
