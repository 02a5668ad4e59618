"""Figures of the scripts: matplotlib without a display, saved one way."""

import logging
import os
import typing

logger = logging.getLogger('chainerkfac.figures')


def pyplot() -> typing.Any:
    """matplotlib's ``pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    return plt


def save_figure(fig: typing.Any, path: str, dpi: int = 100,
                log: bool = True) -> str:
    """Lays ``fig`` out tightly, writes it to ``path`` (making its folder),
    closes it, logs where it went (unless ``log`` is false: a figure
    redrawn during training) and returns ``path``.  Legends placed outside
    the axes are kept inside the image."""
    fig.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    pyplot().close(fig)
    if log:
        logger.info('wrote %s', path)
    return path


def unlabelled_axes(fig: typing.Any) -> typing.List[str]:
    """What a reader of ``fig`` would miss: one line per visible Axes
    without an x label (unless it shares its x axis with a labelled
    one), without a y label, or with several labelled lines
    (or bar groups) but no legend.  Empty for a figure fit to print."""
    problems = []
    visible = [a for a in fig.get_axes() if a.get_visible()]
    for k, ax in enumerate(visible):
        name = '{} ({!r})'.format(k, ax.get_title() or ax.get_ylabel())
        # a panel sharing its x axis with a labelled one (stacked panels)
        shared = any(other.get_xlabel().strip() and
                     ax.get_shared_x_axes().joined(ax, other)
                     for other in visible if other is not ax)
        if not ax.get_xlabel().strip() and not shared:
            problems.append('axes {}: no x label'.format(name))
        if not ax.get_ylabel().strip():
            problems.append('axes {}: no y label'.format(name))
        labelled = [a for a in list(ax.get_lines()) + list(ax.containers)
                    if not str(a.get_label()).startswith('_')]
        has_legend = ax.get_legend() is not None or bool(fig.legends)
        if len(labelled) > 1 and not has_legend:
            problems.append('axes {}: {} labelled lines, no legend'.format(
                name, len(labelled)))
    return problems
