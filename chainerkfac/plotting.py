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


def save_figure(fig: typing.Any, path: str, dpi: int = 100) -> str:
    """Lays ``fig`` out tightly, writes it to ``path`` (making its folder),
    closes it, logs where it went and returns ``path``."""
    fig.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    logger.info('wrote %s', path)
    return path
