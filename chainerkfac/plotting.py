"""Figures of the scripts: matplotlib without a display, saved one way."""

import os


def pyplot():
    """matplotlib's ``pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Lays ``fig`` out tightly, writes it to ``path`` (making its folder),
    closes it and prints where it went."""
    fig.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    print('wrote {}'.format(path))
