"""K-FAC's options compared on the Fashion-MNIST protocol of the large-batch
study (:mod:`chainerkfac.examples.batch_scaling`).

The protocol is the "medium" study's (``docs/batch-scaling.md``): balanced
subsets of 10,000 training and 2,000 test images, ResNet-8 of width 8, a
target of 80 % test accuracy, a budget of max(5 epochs, 60 steps), the test
accuracy measured 3 times per epoch, and the paper's schemes (warmup damping
γ(0) → γ(0)/10 over the first epoch, eq. 13-14; polynomial learning rate
and momentum decay, eq. 15-16; stale factors, eq. 20, set by
:class:`~chainerkfac.extensions.KFACSchedule`; ρ_BN = 4).  Nothing is tuned
here: at each mini-batch size B the learning rate and γ(0) are the setting
the medium study tuned for K-FAC (:data:`TUNED`, from
:data:`TUNED_SOURCE`).

Each variant (:data:`VARIANTS`, name → keyword arguments of
:class:`~chainerkfac.optimizers.KFAC` on top of that setting) is run with
seeds 0, 1, 2 (the seed fixes the initialization and the data order, so
the variants of one seed start alike).  Unlike the tuning runs of the
large-batch study, every run trains its whole budget, so that the factor
builds are counted both until the target is reached and in total, and the
best test accuracy is over the same number of steps for every variant.  A
run's record: the steps to the target (the first evaluation at or above it;
None if missed), its accuracy history, the best test accuracy, the factor
builds (each A, G or BN Fisher of a layer built counts one) in total, until
the target and at each evaluation, and the training seconds per step.

The records go to ``OUT/options.jsonl`` (``OUT/options-K-of-N.jsonl`` for
a shard), one line per finished run: a stopped study resumes where it
stopped.  The report (:func:`summarize`, :func:`format_table`,
:func:`plot`) gives, per B and variant, the median over the seeds of the
steps (a miss counts as infinite) with their spread, the seeds that reached
the target, the median builds (total and to the target), their ratio to
'paper' at the same B and the median seconds per step.
"""

import collections
import dataclasses
import inspect
import logging
import math
import os
import statistics
import typing

import chainer

from chainerkfac.examples import batch_scaling
from chainerkfac.optimizers import KFAC
from chainerkfac import plotting

logger = logging.getLogger('chainerkfac.options_study')

#: name → keyword arguments of KFAC, in the order of the report.
VARIANTS = collections.OrderedDict([
    # eq. 20 stale intervals (KFACSchedule), diagonal BN Fisher, empirical
    # Fisher, eq. 16 momentum
    ('paper', {}),
    # KFACSchedule still sets lr, momentum and damping; the adaptive
    # refresh ignores the intervals it sets
    ('adaptive', {'refresh': 'adaptive'}),
    # the same with a 3x looser tolerance: fewer builds, staler factors
    ('adaptive_0.3', {'refresh': 'adaptive', 'refresh_tolerance': 0.3}),
    ('unit_bn', {'bn_fisher': 'unit'}),
    ('sampled', {'fisher': 'sampled'}),
    ('lr_ratio', {'momentum_schedule': 'lr_ratio'}),
])

#: The variant the others are compared with.
BASELINE = 'paper'

#: Where :data:`TUNED` comes from: the medium study's tuned K-FAC settings.
TUNED_SOURCE = 'docs/batch_scaling_medium/summary.json'

#: B → (learning rate η(0), damping γ(0)) of K-FAC, from
#: :data:`TUNED_SOURCE` (B = 128: 117 steps, B = 512: 42 steps to 80 %).
TUNED = {128: (0.04, 2e-2), 512: (0.02, 2e-3)}

#: The medium study's data, model and budget (``docs/batch-scaling.md``),
#: at B = 128 and 512, 3 seeds.
MEDIUM = batch_scaling.StudyConfig(
    batch_sizes=(128, 512), target=0.80, budget_epochs=5.0, min_steps=60,
    evals_per_epoch=3, seeds=3, width=8, n_train=10000, n_test=2000)

#: ``--quick``: a smoke run (2,000 / 500 images, B = 128, one seed, two
#: variants, a lower target): about a minute on 2 CPU cores.
QUICK = dataclasses.replace(MEDIUM, batch_sizes=(128,), seeds=1,
                            n_train=2000, n_test=500, target=0.70)
QUICK_VARIANTS = ('paper', 'unit_bn')

#: The records' file name: ``OUT/options.jsonl``.
STEM = 'options'


# -- variants ----------------------------------------------------------------

def check_variants(names: typing.Iterable[str]) -> typing.List[str]:
    """``names`` as a list, each a variant KFAC accepts now; else a
    one-line ValueError (an unknown name, or keyword arguments this KFAC
    does not take or refuses)."""
    names = list(names)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError('unknown variant {}; expected one of {}'.format(
            ', '.join(repr(n) for n in unknown),
            ', '.join(repr(n) for n in VARIANTS)))
    accepted = inspect.signature(KFAC).parameters
    open_ended = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
    for name in names:
        options = VARIANTS[name]
        missing = sorted(set(options) - set(accepted))
        if missing and not open_ended:
            raise ValueError(
                'variant {!r}: this KFAC takes no keyword argument {} yet; '
                'leave it out with --variants'.format(
                    name, ', '.join(repr(k) for k in missing)))
        try:
            KFAC(log_coverage=False, **options)
        except (TypeError, ValueError) as e:
            raise ValueError('variant {!r} ({}): KFAC refuses it: {}'.format(
                name, options, ' '.join(str(e).split())))
    return names


def tuned_setting(batch_size: int,
                  tuned: typing.Optional[dict] = None
                  ) -> typing.Tuple[float, float]:
    """``(lr, damping)`` at ``batch_size`` (from ``tuned``, default
    :data:`TUNED`); a one-line ValueError for a B without one."""
    tuned = TUNED if tuned is None else tuned
    if batch_size not in tuned:
        raise ValueError(
            'no tuned K-FAC setting for B = {} (tuned at {}, from {}); give '
            'one with --setting B,LR,DAMPING'.format(
                batch_size, ', '.join(str(b) for b in sorted(tuned)),
                TUNED_SOURCE))
    lr, damping = tuned[batch_size]
    return lr, damping


def factor_builds(optimizer: chainer.Optimizer) -> int:
    """The factors ``optimizer`` has built so far (each A, G or BN Fisher
    of a layer counts one)."""
    builds = getattr(optimizer, 'factor_builds', None)
    if builds is not None:
        return int(builds)
    # A KFAC without the counter yet: each layer counts the factors it
    # stored (Layer.refreshes); every process stores every factor built
    # before stage 3, so this is rank 0's count too.
    return sum(sum(layer.refreshes.values())
               for layer in optimizer.kfac_layers)


def run_key(variant: str, trial: batch_scaling.Trial) -> str:
    """``paper/B128/lr0.04/d0.02/s0``: the trial's key under the variant's
    name instead of the optimizer's."""
    return variant + '/' + trial.key().split('/', 1)[1]


# -- one run -----------------------------------------------------------------

def run_variant(variant: str, trial: batch_scaling.Trial,
                config: batch_scaling.StudyConfig, train: typing.Sequence,
                test: typing.Sequence,
                device: chainer.backend.Device) -> dict:
    """Trains the whole budget with the variant's options
    (:func:`batch_scaling.run_trial`); the record, with the factor
    builds."""
    options = dict(VARIANTS[variant])
    builds = {0: 0}   # step -> factors built by the end of that update

    def count(optimizer, step):
        builds[step] = factor_builds(optimizer)

    def progress(step, steps, acc):
        logger.debug('%s: step %d/%d, test accuracy %.4f',
                     run_key(variant, trial), step, steps, acc)
    record = batch_scaling.run_trial(
        trial, config, train, test, device, progress, options=options,
        after_update=count, stop_at_target=False)
    record.update(
        key=run_key(variant, trial), variant=variant, options=options,
        factor_builds=builds[max(builds)],
        factor_builds_to_target=None if record['steps'] is None
        else builds[record['steps']],
        builds_history=[builds[step] for step, _ in record['history']])
    return record


# -- the study ---------------------------------------------------------------

def plan(config: batch_scaling.StudyConfig,
         variants: typing.Sequence[str] = tuple(VARIANTS),
         tuned: typing.Optional[dict] = None
         ) -> typing.List[typing.Tuple[str, batch_scaling.Trial]]:
    """``[(variant, trial)]`` of the study, B by B, variant by variant,
    seed by seed."""
    variants = check_variants(variants)
    runs = []
    for batch_size in config.batch_sizes:
        lr, damping = tuned_setting(batch_size, tuned)
        for variant in variants:
            for seed in range(config.seeds):
                runs.append((variant, batch_scaling.Trial(
                    'kfac', batch_size, lr, damping, seed)))
    return runs


def load_runs(out: str) -> typing.Dict[str, dict]:
    """``{key: record}`` of the runs in ``out`` whose variant still has
    the options it ran with (a redefined variant runs again)."""
    records = batch_scaling.load_records(out, STEM)
    return {key: r for key, r in records.items()
            if VARIANTS.get(r.get('variant')) == r.get('options')}


def run_study(config: batch_scaling.StudyConfig, train: typing.Sequence,
              test: typing.Sequence, device: chainer.backend.Device,
              out: str, variants: typing.Sequence[str] = tuple(VARIANTS),
              tuned: typing.Optional[dict] = None,
              shard: typing.Optional[typing.Tuple[int, int]] = None
              ) -> typing.List[dict]:
    """Runs (or resumes) the study, writing to ``out``; returns every
    record there.  ``shard=(k, n)``: only the runs whose index in
    :func:`plan` is k modulo n (each shard writes its own file; a run
    without a shard, or ``--report``, then finds them all)."""
    runs = plan(config, variants, tuned)
    os.makedirs(out, exist_ok=True)
    batch_scaling.check_settings(config, out)
    records = load_runs(out)
    path = batch_scaling.results_path(out, shard, STEM)
    for number, (variant, trial) in enumerate(runs, 1):
        if shard is not None and (number - 1) % shard[1] != shard[0]:
            continue
        key = run_key(variant, trial)
        if key in records:
            continue
        logger.info('[%d/%d] %s ...', number, len(runs), key)
        record = run_variant(variant, trial, config, train, test, device)
        batch_scaling.append_record(path, record)
        records[key] = record
        logger.info(
            '[%d/%d] %s: %s steps to the target, best test accuracy %.4f, '
            '%d factor builds (%s to the target), %.3f s/step', number,
            len(runs), key, record['steps'] or '-',
            record['best_accuracy'] or 0, record['factor_builds'],
            record['factor_builds_to_target'] or '-',
            record['seconds_per_step'])
    return list(records.values())


# -- results -----------------------------------------------------------------

def _inf(value):
    return math.inf if value is None else value


def _ratio(a, b):
    if not (math.isfinite(a) and math.isfinite(b)) or not b:
        return math.inf
    return a / b


def summarize(records: typing.Iterable[dict],
              config: batch_scaling.StudyConfig,
              variants: typing.Sequence[str] = tuple(VARIANTS),
              tuned: typing.Optional[dict] = None) -> typing.List[dict]:
    """One row per (B, variant) with at least one run of the study's
    seeds at the B's setting: medians over the seeds (a missed target
    counts as infinite steps and builds to the target) and the ratio of
    the builds to the baseline's at the same B (inf: no baseline)."""
    rows = []
    for batch_size in config.batch_sizes:
        lr, damping = tuned_setting(batch_size, tuned)
        cell = {}
        for variant in variants:
            runs = [r for r in records if r['variant'] == variant and
                    r['batch_size'] == batch_size and r['lr'] == lr and
                    r['damping'] == damping and r['seed'] < config.seeds]
            if not runs:
                continue
            steps = [_inf(r['steps']) for r in runs]
            cell[variant] = {
                'batch_size': batch_size, 'variant': variant, 'lr': lr,
                'damping': damping, 'steps': statistics.median(steps),
                'steps_min': min(steps), 'steps_max': max(steps),
                'seeds_reached': sum(r['steps'] is not None for r in runs),
                'seeds': len(runs),
                'builds': statistics.median(
                    r['factor_builds'] for r in runs),
                'builds_to_target': statistics.median(
                    _inf(r['factor_builds_to_target']) for r in runs),
                'best_accuracy': statistics.median(
                    r['best_accuracy'] or 0 for r in runs),
                'seconds_per_step': statistics.median(
                    r['seconds_per_step'] for r in runs)}
        base = cell.get(BASELINE)
        for row in cell.values():
            for name in ('builds', 'builds_to_target'):
                row[name + '_ratio'] = math.inf if base is None else \
                    _ratio(row[name], base[name])
            rows.append(row)
    return rows


def _count(value, form='{:g}'):
    return form.format(value) if math.isfinite(value) else '-'


def format_table(rows: typing.Iterable[dict]) -> typing.List[str]:
    """The report's lines: a header, one line per row, and what the
    columns mean."""
    head = '{:>5} {:<12} {:>6} {:>11} {:>6} {:>8} {:>8} {:>6} {:>6} {:>8} ' \
        '{:>7}'
    lines = [head.format('B', 'variant', 'steps', '(min-max)', 'seeds',
                         'builds', 'to tgt', 'ratio', 'r@tgt', 'best acc',
                         's/step')]
    for r in rows:
        spread = '({:g}-{:g})'.format(r['steps_min'], r['steps_max'])
        lines.append(
            '{:>5} {:<12} {:>6} {:>11} {:>6} {:>8} {:>8} {:>6} {:>6} '
            '{:>8.4f} {:>7.3f}'.format(
                r['batch_size'], r['variant'], _count(r['steps']), spread,
                '{}/{}'.format(r['seeds_reached'], r['seeds']),
                _count(r['builds']), _count(r['builds_to_target']),
                _count(r['builds_ratio'], '{:.2f}'),
                _count(r['builds_to_target_ratio'], '{:.2f}'),
                r['best_accuracy'], r['seconds_per_step']))
    lines.append('(medians over the seeds; steps and builds to the target '
                 '(to tgt): a miss counts as infinite (-); ratio, r@tgt: '
                 'builds, builds to the target over {}\'s at the same B)'
                 .format(BASELINE))
    return lines


def plot(rows: typing.Sequence[dict], path: str,
         target: float) -> typing.Any:
    """Two panels of bars per variant, one bar per B: the median steps to
    the target (whiskers: the seeds' spread; ×: missed) and the median
    factor builds (dots: until the target).  Returns the (closed)
    figure."""
    pyplot = plotting.pyplot()
    variants = [v for v in VARIANTS if any(r['variant'] == v for r in rows)]
    sizes = sorted({r['batch_size'] for r in rows})
    fig, (steps_ax, builds_ax) = pyplot.subplots(
        1, 2, figsize=(10, 4), sharex=True)
    width = 0.8 / max(1, len(sizes))
    for k, batch_size in enumerate(sizes):
        mine = {r['variant']: r for r in rows
                if r['batch_size'] == batch_size}
        xs = [i + (k - (len(sizes) - 1) / 2) * width
              for i, v in enumerate(variants) if v in mine]
        got = [mine[v] for v in variants if v in mine]
        steps = [r['steps'] if math.isfinite(r['steps']) else 0
                 for r in got]
        low = [s - r['steps_min'] if math.isfinite(r['steps']) else 0
               for s, r in zip(steps, got)]
        high = [r['steps_max'] - s if math.isfinite(r['steps_max']) else 0
                for s, r in zip(steps, got)]
        bars = steps_ax.bar(xs, steps, width, yerr=[low, high], capsize=3,
                            label='B = {}'.format(batch_size))
        color = bars.patches[0].get_facecolor() if bars.patches else None
        for x, r in zip(xs, got):
            if not math.isfinite(r['steps']):
                steps_ax.annotate('×', (x, 0), ha='center', va='bottom',
                                  color=color)
        builds_ax.bar(xs, [r['builds'] for r in got], width, color=color,
                      label='B = {} (total)'.format(batch_size))
        to_target = [(x, r['builds_to_target']) for x, r in zip(xs, got)
                     if math.isfinite(r['builds_to_target'])]
        if to_target:
            builds_ax.plot(*zip(*to_target), 'o', color='black',
                           markersize=4,
                           label=None if k else 'until the target')
    for ax in (steps_ax, builds_ax):
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)   # room for the legend
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants)
        ax.set_xlabel('K-FAC variant')
        ax.legend(fontsize=8)
    steps_ax.set_ylabel('steps to {:.0%} test accuracy (median)'.format(
        target))
    steps_ax.set_title('steps (whiskers: seeds; ×: missed)', fontsize=10)
    builds_ax.set_ylabel('factor builds (median)')
    builds_ax.set_title('factor builds over the budget', fontsize=10)
    plotting.save_figure(fig, path)
    return fig
