"""Figure 3 (schedules): η, m, γ and the stale interval of trainer configs
against the iteration and the epoch, exactly as
:class:`~chainerkfac.extensions.KFACSchedule` hands them to the optimizer
(``scripts/plot_schedules.py``)."""

import math
import typing

import numpy

from chainerkfac.extensions import KFACSchedule
from chainerkfac import plotting

CURVES = (('lr', 'learning rate η (eq. 15)', 'log'),
          ('momentum', 'momentum m (eq. 16)', 'linear'),
          ('damping', 'damping γ (eq. 13-14)', 'log'),
          ('g_interval', 'stale interval\n(iterations, eq. 20/21)', 'linear'))
# Curves that coincide stay visible: each config is drawn narrower than the
# one before it (bs4k, bs8k and bs16k share their epochs and γ target), and
# bs32k_eq21, which differs from bs32k in the stale interval only, is drawn
# last, dashed with markers.
STYLES = {'bs32k_eq21': dict(linestyle='--', marker='x', markersize=4,
                             linewidth=1.2, color='black')}


def style(k: int, name: str) -> dict:
    """The line style of the k-th config drawn."""
    out = dict(linewidth=max(1.2, 4.0 - 0.5 * k), color='C{}'.format(k % 10),
               alpha=0.85)
    out.update(STYLES.get(name, {}))
    return out


def trajectory(cfg: typing.Any, n_train: int) -> dict:
    """``{name: array}`` of the schedule's values at iterations 0 … T−1
    (T = ⌈epochs·n_train/BS⌉), with ``iteration`` and ``epoch``."""
    schedule = KFACSchedule.from_config(cfg, n_train)
    total = int(math.ceil(cfg.train.epochs * n_train / cfg.train.batch_size))
    rows = [schedule.values(t) for t in range(total)]
    out = {key: numpy.array([r[key] for r in rows], dtype=float)
           for key in rows[0]}
    out['iteration'] = numpy.arange(total)
    return out


def plot(results: typing.Sequence[tuple], path: str) -> typing.Any:
    """Draws every schedule against the iteration (left, symlog: the
    warmup of the first epoch and the end both visible) and the epoch
    (right); returns the (closed) figure."""
    pyplot = plotting.pyplot()

    fig, axes = pyplot.subplots(len(CURVES), 2, figsize=(10, 11),
                                squeeze=False)
    for k, (name, curves) in enumerate(results):
        line = style(k, name)
        if line.get('marker'):
            line['markevery'] = max(1, len(curves['iteration']) // 25)
        for row, (key, title, scale) in enumerate(CURVES):
            values = curves[key]
            if scale == 'log':  # η = 0 at the last iteration: left out
                values = numpy.where(values > 0, values, numpy.nan)
            for col, x in enumerate(('iteration', 'epoch')):
                ax = axes[row][col]
                ax.plot(curves[x], values, label=name, **line)
                ax.set_xlabel('iteration t' if x == 'iteration' else 'epoch')
                ax.set_ylabel(title)
                ax.set_yscale(scale)
                if col == 0:
                    ax.set_xscale('symlog', linthresh=100)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=len(labels),
               fontsize=8, bbox_to_anchor=(0.5, 1.0), frameon=False)
    plotting.save_figure(fig, path)
    return fig
