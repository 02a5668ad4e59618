"""The figure of ``scripts/bench_peers.py``: chainerkfac beside peer K-FAC
libraries, every framework that was asked for in every panel.

Panels: the absolute time of one K-FAC update and of the same framework's
momentum-SGD update on ResNet-50, their ratio, and the iterations of the
digits race.  A framework without a number (not installed, failed, not run,
target not reached) says why in its place.
"""

import textwrap
import typing

import numpy

from chainerkfac import plotting


def status(result: typing.Any, skipped: str) -> typing.Optional[str]:
    """What a panel says of a framework without a number: ``None`` when
    ``result`` is one."""
    if result is None:
        return 'not run ({})'.format(skipped)
    if isinstance(result, dict):
        return None
    text = str(result)
    parts = text.split(': ', 2)  # 'failed', the exception's type, message
    if len(parts) == 3 and (parts[1] == 'ModuleNotFoundError' or
                            'not found: create' in parts[2]):
        text = 'not installed: ' + parts[2]
    return textwrap.fill(textwrap.shorten(text, 160), 28)


def plot(resnet: dict, digits: dict, path: str,
         frameworks: typing.Sequence[str], setting: str = '',
         target: float = 0.97, digits_batch: int = 64,
         max_iterations: int = 400) -> typing.Any:
    """Three panels, every framework of ``frameworks`` in each: the
    absolute time of one K-FAC and one SGD update, their ratio, and the
    digits race (iterations to ``target``, best of the grid; a run that
    missed it within ``max_iterations`` says so); a framework without a
    number says why in its place.  Returns the (closed) figure.

    ``resnet``: ``{framework: {'kfac': s, 'sgd': s} or 'failed: ...'}``;
    ``digits``: ``{framework: {grid point: iterations or None} or
    'failed: ...'}``, as ``bench_peers.py --json`` writes them.
    """
    pyplot = plotting.pyplot()
    fig, axes = pyplot.subplots(1, 3, figsize=(15, 4.8))
    x = numpy.arange(len(frameworks))

    def explain(ax, reasons):
        top = ax.get_ylim()[1]
        for k, why in enumerate(reasons):
            if why is not None:
                ax.text(k, 0.03 * top, why, ha='center', va='bottom',
                        fontsize=7, color='C3')

    timed = {n: r for n, r in resnet.items() if isinstance(r, dict)}
    for j, (key, label) in enumerate((('kfac', 'K-FAC update'),
                                      ('sgd', 'own momentum-SGD update'))):
        values = [timed[n][key] if n in timed else 0 for n in frameworks]
        bars = axes[0].bar(x + (j - 0.5) * 0.38, values, 0.38, label=label,
                           color='C{}'.format(j))
        axes[0].bar_label(bars, ['{:.2f}'.format(v) if v else ''
                                 for v in values], fontsize=7)
    axes[0].set_ylabel('time of one update (s, median)')
    axes[0].set_title('ResNet-50 {}: absolute'.format(setting), fontsize=10)
    axes[0].legend(fontsize=8, loc='upper right')
    axes[0].margins(y=0.15)
    ratios = [timed[n]['kfac'] / timed[n]['sgd'] if n in timed else 0
              for n in frameworks]
    bars = axes[1].bar(x, ratios, 0.5, color='C2')
    axes[1].bar_label(bars, ['{:.2f}x'.format(r) if r else ''
                             for r in ratios], fontsize=8)
    axes[1].set_ylabel('K-FAC update / own SGD update (ratio)')
    axes[1].set_title('ResNet-50 {}: relative'.format(setting), fontsize=10)
    axes[1].margins(y=0.15)
    best = []
    for n in frameworks:
        r = digits.get(n)
        found = [v for v in r.values() if isinstance(v, (int, float))] \
            if isinstance(r, dict) else []
        best.append(min(found) if found else 0)
    bars = axes[2].bar(x, best, 0.5, color='C4')
    axes[2].bar_label(bars, [str(b) if b else '' for b in best], fontsize=8)
    axes[2].set_ylabel('iterations to {:.0%} test accuracy '
                       '(best of grid)'.format(target))
    axes[2].set_title('digits, batch {}'.format(digits_batch), fontsize=10)
    axes[2].margins(y=0.15)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(frameworks)
        ax.set_xlabel('framework (CPU)')
    reasons = [status(resnet.get(n), '--skip-resnet') for n in frameworks]
    explain(axes[0], reasons)
    explain(axes[1], reasons)
    explain(axes[2], [
        'not within {} iterations'.format(max_iterations)
        if isinstance(digits.get(n), dict) and not b
        else status(digits.get(n), '--skip-digits')
        for n, b in zip(frameworks, best)])
    plotting.save_figure(fig, path)
    return fig
