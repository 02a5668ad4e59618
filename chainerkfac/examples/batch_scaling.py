"""The paper's large-batch thesis on real data: steps to a test accuracy
target against the mini-batch size B, for K-FAC, MomentumSGD and LARS.

For every B and optimizer a small grid of trials (the learning rate; for
K-FAC also the damping) is trained from the same initialization until the
test accuracy reaches the target or the step budget runs out; the trial that
reaches it in the fewest steps is the tuned setting, which is then run again
with other seeds.  Every optimizer gets the same number of trials per B.

* K-FAC: the paper's schemes: warmup damping γ(0) → γ_target over
  ``warmup_epochs`` (eq. 13-14), polynomial learning rate (eq. 15) and
  momentum (eq. 16) decaying to 0 at the end of the budget, stale factors
  (eq. 20), diagonal BN Fisher; no running mixup (it slows the early
  progress a steps-to-target study measures), no weight rescaling.
* MomentumSGD (m = 0.9) with the learning rate scaled linearly with B
  (Goyal et al. 2017), linear warmup over ``warmup_epochs``, then the same
  polynomial decay.
* LARS: the same plus ``chainer.optimizer_hooks.GradientLARS`` (You et al.
  2017); its learning rate is the relative step per layer, scaled with √B.

Results go to a JSON lines file, one record per finished trial, so a study
that is stopped resumes where it stopped (finished trials are not rerun).
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import typing

import numpy

import chainer
import chainer.functions as F
from chainer.dataset import concat_examples

from chainerkfac import devices
from chainerkfac import errors
from chainerkfac.examples import digits
from chainerkfac.extensions import KFACSchedule
from chainerkfac import files
from chainerkfac import finite
from chainerkfac.links import ResNet8
from chainerkfac.optimizers import KFAC
from chainerkfac import plotting
from chainerkfac import schedules

OPTIMIZERS = ('kfac', 'sgd', 'lars')


@dataclasses.dataclass
class StudyConfig:
    """What a study measures and how much it may spend.

    The learning rate of a trial at batch size B is ``lr_base[opt] ×
    (B / reference_batch)^lr_exponent[opt] × factor`` for each factor of
    ``lr_factors[opt]``; K-FAC's trials are every (factor, damping) pair of
    ``lr_factors['kfac']`` × ``dampings``; the grids are sized so that every
    optimizer has the same number of trials.
    """

    batch_sizes: tuple = (128, 512, 2048, 8192)
    target: float = 0.88               # test accuracy to reach
    budget_epochs: float = 8.0         # a trial stops after this many epochs
    min_steps: int = 60                # ... or this many steps, if more
    evals_per_epoch: int = 4           # test accuracy this often (>= 1/step)
    seeds: int = 2                     # runs of the tuned setting
    width: int = 16                    # ResNet8 width
    n_train: int = 0                   # 0: all 60,000 (else a subset)
    n_test: int = 0                    # 0: all 10,000
    reference_batch: int = 128
    # grid centers at the reference batch, from a pilot on a 5,000-image
    # subset (B = 50, 250): SGD's best was at 2x, LARS' needed more than √B
    lr_base: dict = dataclasses.field(default_factory=lambda: {
        'kfac': 0.02, 'sgd': 0.1, 'lars': 0.02})
    lr_exponent: dict = dataclasses.field(default_factory=lambda: {
        'kfac': 0.5, 'sgd': 1.0, 'lars': 0.5})
    lr_factors: dict = dataclasses.field(default_factory=lambda: {
        'kfac': (0.5, 2.0), 'sgd': (0.25, 0.5, 1.0, 2.0),
        'lars': (0.5, 1.0, 2.0, 4.0)})
    dampings: tuple = (2e-3, 2e-2)     # K-FAC's γ(0); γ_target = γ(0)/10
    momentum: float = 0.9
    warmup_epochs: float = 1.0         # e_start of K-FAC, warmup of SGD
    p_decay: float = 2.0
    bn_damping_ratio: float = 4.0
    stale: str = 'eq20'

    def trials_per_optimizer(self) -> int:
        counts = {'kfac': len(self.lr_factors['kfac']) * len(self.dampings),
                  'sgd': len(self.lr_factors['sgd']),
                  'lars': len(self.lr_factors['lars'])}
        if len(set(counts.values())) != 1:
            raise ValueError('unequal trial budgets: {}'.format(counts))
        return counts['sgd']


#: The study of the README: all of Fashion-MNIST.
FULL = StudyConfig()

#: ``--quick``: 3,000 training and 1,000 test images, three batch sizes up
#: to a quarter of the subset, a lower target, two trials per optimizer and
#: batch size, one seed: about 14 minutes on a 2-core CPU (the end-to-end
#: test runs it with a third of the subset and two batch sizes).
QUICK = StudyConfig(batch_sizes=(30, 150, 750), target=0.75,
                    budget_epochs=3.0, min_steps=12, evals_per_epoch=2,
                    seeds=1, width=8, n_train=3000, n_test=1000,
                    reference_batch=30,
                    lr_factors={'kfac': (1.0,), 'sgd': (0.5, 2.0),
                                'lars': (0.5, 2.0)},
                    dampings=(2e-3, 2e-2))


@dataclasses.dataclass(frozen=True)
class Trial:
    optimizer: str
    batch_size: int
    lr: float
    damping: float = 0.0   # K-FAC's γ(0); 0 for the others
    seed: int = 0

    def key(self) -> str:
        return '{}/B{}/lr{:.6g}/d{:.6g}/s{}'.format(
            self.optimizer, self.batch_size, self.lr, self.damping,
            self.seed)


def grid(config: StudyConfig, optimizer: str,
         batch_size: int) -> typing.List[Trial]:
    """The trials (seed 0) tuning ``optimizer`` at ``batch_size``."""
    center = config.lr_base[optimizer] * (
        batch_size / config.reference_batch) ** config.lr_exponent[optimizer]
    dampings = config.dampings if optimizer == 'kfac' else (0.0,)
    return [Trial(optimizer, batch_size, center * f, d)
            for f in config.lr_factors[optimizer] for d in dampings]


def subset(dataset: typing.Sequence, n: int) -> typing.Sequence:
    """The first ``n`` examples of each class in turn (balanced), or all."""
    if not n or n >= len(dataset):
        return dataset
    labels = numpy.asarray([dataset[i][1] for i in range(len(dataset))])
    n_class = int(labels.max()) + 1
    picked = numpy.sort(numpy.concatenate([
        numpy.nonzero(labels == c)[0][:n // n_class]
        for c in range(n_class)]))
    return chainer.datasets.TupleDataset(
        *concat_examples([dataset[i] for i in picked]))


# -- one trial ---------------------------------------------------------------

def warmup_polynomial_lr(e: float, lr: float, warmup_epochs: float,
                         e_end: float, p_decay: float) -> float:
    """Linear warmup to ``lr`` over ``warmup_epochs`` (Goyal et al.), then
    eq. 15's polynomial decay to 0 at ``e_end``."""
    if e < warmup_epochs:
        return lr * (e + 1e-12) / warmup_epochs
    return schedules.polynomial_lr(e, lr, warmup_epochs, e_end, p_decay)


def budget_steps(config: StudyConfig, batch_size: int,
                 n_train: int) -> int:
    return max(int(math.ceil(config.budget_epochs * n_train / batch_size)),
               config.min_steps)


def make_optimizer(trial: Trial, config: StudyConfig, n_train: int,
                   steps: int, options: typing.Optional[dict] = None
                   ) -> typing.Tuple[chainer.Optimizer, typing.Callable]:
    """``(optimizer, schedule)``: ``schedule(optimizer, step)`` sets the
    hyperparameters of the update number ``step``.  ``options``: more
    keyword arguments of :class:`~chainerkfac.optimizers.KFAC` (K-FAC
    only; its ``momentum_schedule`` is the schedule's too)."""
    e_end = steps * trial.batch_size / n_train
    options = dict(options or {})
    if options and trial.optimizer != 'kfac':
        raise ValueError('options are keyword arguments of KFAC; {} takes '
                         'none, got {}'.format(trial.optimizer, options))
    if trial.optimizer == 'kfac':
        optimizer = KFAC(lr=trial.lr, momentum=config.momentum,
                         damping=trial.damping,
                         bn_damping_ratio=config.bn_damping_ratio,
                         **options)
        kfac = KFACSchedule(
            lr=trial.lr, momentum=config.momentum, damping=trial.damping,
            damping_target=trial.damping / 10, e_start=config.warmup_epochs,
            e_end=max(e_end, config.warmup_epochs * 1.001),
            p_decay=config.p_decay, batch_size=trial.batch_size,
            n_train=n_train, stale=config.stale,
            momentum_schedule=options.get('momentum_schedule', 'eq16'))
        return optimizer, lambda opt, step: kfac.apply(opt, step)
    optimizer = chainer.optimizers.MomentumSGD(lr=trial.lr,
                                               momentum=config.momentum)

    def schedule(opt, step):
        e = schedules.epoch(step, trial.batch_size, n_train)
        opt.lr = warmup_polynomial_lr(e, trial.lr, config.warmup_epochs,
                                      e_end, config.p_decay)
    return optimizer, schedule


def run_trial(trial: Trial, config: StudyConfig, train: typing.Sequence,
              test: typing.Sequence, device: chainer.backend.Device,
              progress: typing.Optional[typing.Callable] = None,
              options: typing.Optional[dict] = None,
              after_update: typing.Optional[typing.Callable] = None,
              stop_at_target: bool = True) -> dict:
    """Trains until the test accuracy reaches the target or the budget is
    spent; the record of the trial (JSON-serializable).

    ``options``: more keyword arguments of K-FAC (:func:`make_optimizer`);
    ``after_update(optimizer, step)``, if given, is called after every
    update (outside the timed part); ``stop_at_target=False`` trains the
    whole budget (``steps`` is still the first step at the target)."""
    n_train = len(train)
    steps = budget_steps(config, trial.batch_size, n_train)
    per_epoch = n_train / trial.batch_size
    eval_every = max(1, int(round(per_epoch / config.evals_per_epoch)))
    numpy.random.seed(trial.seed)
    model = ResNet8(n_class=10, width=config.width)
    model.to_device(device)
    optimizer, schedule = make_optimizer(trial, config, n_train, steps,
                                         options)
    optimizer.setup(model)
    if trial.optimizer == 'lars':
        optimizer.add_hook(chainer.optimizer_hooks.GradientLARS())
    order = chainer.iterators.ShuffleOrderSampler(
        numpy.random.RandomState(1000 + trial.seed))
    iterator = chainer.iterators.SerialIterator(
        train, trial.batch_size, order_sampler=order)

    loss_check = finite.LossCheck()  # K-FAC checks its loss itself

    def lossfun(x, t):
        loss = F.softmax_cross_entropy(model(x), t)
        if trial.optimizer != 'kfac':
            loss_check.record(loss.array, step)
        return loss

    history, reached, train_seconds, done = [], None, 0.0, 0
    status = 'budget'
    for step in range(1, steps + 1):
        x, t = concat_examples(iterator.next(), device)
        schedule(optimizer, step - 1)
        start = time.perf_counter()
        try:
            optimizer.update(lossfun, x, t)
            loss_check.check()
        except FloatingPointError as e:  # diverged: a failed trial
            status = 'diverged: ' + errors.one_line(e)
            break
        devices.synchronize(device)
        train_seconds += time.perf_counter() - start
        done = step
        if after_update is not None:
            after_update(optimizer, step)
        if step % eval_every and step != steps:
            continue
        acc = digits.accuracy(model, test, batchsize=2000, device=device)
        history.append((step, acc))
        if progress is not None:
            progress(step, steps, acc)
        if acc >= config.target and reached is None:
            reached, status = step, 'reached'
            if stop_at_target:
                break
    return dict(
        dataclasses.asdict(trial), key=trial.key(), status=status,
        steps=reached, epochs=None if reached is None else
        reached * trial.batch_size / n_train,
        budget_steps=steps, best_accuracy=max(a for _, a in history)
        if history else None, history=history,
        seconds_per_step=train_seconds / max(1, done))


# -- the study ---------------------------------------------------------------

def results_path(out: str,
                 shard: typing.Optional[typing.Tuple[int, int]] = None,
                 stem: str = 'trials') -> str:
    """``OUT/trials.jsonl``, or ``OUT/trials-K-of-N.jsonl`` for a shard
    (``stem``: another study's name instead of ``trials``)."""
    name = stem + '.jsonl' if shard is None else \
        '{}-{}-of-{}.jsonl'.format(stem, *shard)
    return os.path.join(out, name)


def study_parser(doc: str, out: str,
                 quick_help: str) -> argparse.ArgumentParser:
    """The command line a Fashion-MNIST study script starts from (the
    script's ``doc``, its default ``--out``): ``--data``, ``--out``,
    ``--device``, ``--quick`` and ``--batch-sizes``."""
    parser = argparse.ArgumentParser(
        description=doc.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument('--data', default=None,
                        help='folder of the four Fashion-MNIST IDX files')
    parser.add_argument('--out', default=out)
    parser.add_argument('--device', default='auto', choices=devices.CHOICES)
    parser.add_argument('--quick', action='store_true', help=quick_help)
    parser.add_argument('--batch-sizes', type=int, nargs='+')
    return parser


def replace_given(config: StudyConfig, **values: typing.Any) -> StudyConfig:
    """``config`` with the ``values`` given on the command line (None:
    not given; an empty ``batch_sizes``: not given)."""
    if 'batch_sizes' in values:
        values['batch_sizes'] = tuple(values['batch_sizes'] or ()) or None
    return dataclasses.replace(config, **{
        name: value for name, value in values.items() if value is not None})


def parse_shard(text: str) -> typing.Tuple[int, int]:
    """``'K/N'`` → ``(K, N)`` with 0 ≤ K < N (``--shard``); else an
    ``argparse.ArgumentTypeError``."""
    try:
        k, n = (int(v) for v in text.split('/'))
    except ValueError:
        raise argparse.ArgumentTypeError('expected K/N, got {!r}'.format(
            text))
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError('K/N needs 0 <= K < N, got {!r}'
                                         .format(text))
    return k, n


def load_records(out: str, stem: str = 'trials') -> typing.Dict[str, dict]:
    """``{key: record}`` of every ``trials*.jsonl`` (``stem*.jsonl``) in the
    folder ``out`` (the whole study's and its shards'); a line cut off by a
    kill is skipped (its trial runs again)."""
    records = {}
    if not os.path.isdir(out):
        return records
    for name in sorted(os.listdir(out)):
        if not (name.startswith(stem) and name.endswith('.jsonl')):
            continue
        with open(os.path.join(out, name)) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                records[record['key']] = record
    return records


def append_record(path: str, record: dict) -> None:
    files.append_lines(path, [json.dumps(record, sort_keys=True)])


class StudyError(ValueError):
    """A folder that holds a study with other settings (one line)."""


#: Settings that may differ between runs sharing a folder: which batch
#: sizes and how many seeds are run (each trial's record stands alone).
FREE_SETTINGS = ('batch_sizes', 'seeds')


def check_settings(config: StudyConfig, out: str) -> None:
    """Records ``config`` in ``out/study.json``, or checks that the study
    already there has the same settings: a resumed trial must not mix with
    records made under another target, budget or grid."""
    path = os.path.join(out, 'study.json')
    mine = {k: v for k, v in json.loads(json.dumps(
        dataclasses.asdict(config))).items() if k not in FREE_SETTINGS}
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        differ = sorted(k for k in set(mine) | set(theirs)
                        if mine.get(k) != theirs.get(k))
        if differ:
            raise StudyError(
                '{}: holds a study with other settings ({}); use another '
                '--out'.format(out, ', '.join(
                    '{} {} != {}'.format(k, theirs.get(k), mine.get(k))
                    for k in differ)))
        return
    with files.atomic_write(path, 'w') as f:
        json.dump(mine, f, indent=1, sort_keys=True)


def _steps_or_inf(record):
    return record['steps'] if record['steps'] is not None else math.inf


def best_of(records: typing.Iterable[dict]) -> dict:
    """The tuned setting: fewest steps to the target, then best accuracy."""
    return min(records, key=lambda r: (_steps_or_inf(r),
                                       -(r['best_accuracy'] or 0)))


def run_study(config: StudyConfig, train: typing.Sequence,
              test: typing.Sequence, device: chainer.backend.Device,
              out: str, optimizers: typing.Sequence[str] = OPTIMIZERS,
              shard: typing.Optional[typing.Tuple[int, int]] = None,
              log: typing.Callable = print) -> typing.List[dict]:
    """Runs (or resumes) the study, writing to ``out``; returns every
    record.  ``shard=(k, n)`` runs only the (B, optimizer) cells whose index
    is k modulo n, so n processes can share the work (each one writes its
    own file; a final run without a shard finds everything done and
    summarizes)."""
    config.trials_per_optimizer()
    os.makedirs(out, exist_ok=True)
    check_settings(config, out)
    records = load_records(out)
    path = results_path(out, shard)
    plan = []
    for batch_size in config.batch_sizes:
        for name in optimizers:
            plan.append((batch_size, name))
    for number, (batch_size, name) in enumerate(plan, 1):
        if shard is not None and (number - 1) % shard[1] != shard[0]:
            continue
        tuned = []
        for trial in grid(config, name, batch_size):
            tuned.append(_run_once(trial, config, train, test, device, path,
                                   records, log, number, len(plan)))
        best = best_of(tuned)
        for seed in range(1, config.seeds):
            trial = Trial(name, batch_size, best['lr'], best['damping'],
                          seed)
            _run_once(trial, config, train, test, device, path, records,
                      log, number, len(plan))
    return list(records.values())


def _run_once(trial, config, train, test, device, path, records, log,
              number, total):
    key = trial.key()
    if key in records:
        return records[key]
    label = '[{}/{}] {}'.format(number, total, key)

    def progress(step, steps, acc):
        sys.stderr.write('\r{} {:>6}/{} steps, test accuracy {:.4f}'.format(
            label, step, steps, acc))
        sys.stderr.flush()
    record = run_trial(trial, config, train, test, device, progress)
    sys.stderr.write('\n')
    append_record(path, record)
    records[key] = record
    log('{}: {} {} steps, best test accuracy {:.4f}, {:.3f} s/step'.format(
        label, record['status'], record['steps'] if record['steps']
        else '-', record['best_accuracy'] or 0, record['seconds_per_step']))
    return record


# -- results -----------------------------------------------------------------

def summarize(records: typing.Sequence[dict],
              config: StudyConfig) -> typing.List[dict]:
    """One row per (B, optimizer) of the study whose grid is complete: the
    tuned setting and the median steps over its seeds (a seed that misses
    the target counts as not reaching it: the median is then infinite if
    half of them miss)."""
    rows = []
    for batch_size in config.batch_sizes:
        for name in OPTIMIZERS:
            keys = {t.key() for t in grid(config, name, batch_size)}
            tuned = [r for r in records if r['key'] in keys]
            if len(tuned) < len(keys):
                continue
            best = best_of(tuned)
            runs = [r for r in records if r['optimizer'] == name and
                    r['batch_size'] == batch_size and r['lr'] == best['lr']
                    and r['damping'] == best['damping']]
            steps = statistics.median(_steps_or_inf(r) for r in runs)
            grid_lrs = sorted({r['lr'] for r in tuned})
            rows.append({
                'batch_size': batch_size, 'optimizer': name,
                'steps': steps,
                'epochs': steps * batch_size / (config.n_train or 60000),
                'lr': best['lr'], 'damping': best['damping'],
                # flagged for grids of 3+ learning rates (of 2, both are
                # edges)
                'lr_at_grid_edge': len(grid_lrs) > 2 and best['lr'] in (
                    grid_lrs[0], grid_lrs[-1]),
                'seeds_reached': sum(r['steps'] is not None for r in runs),
                'seeds': len(runs),
                'best_accuracy': max(r['best_accuracy'] or 0 for r in runs),
                'seconds_per_step': statistics.median(
                    r['seconds_per_step'] for r in runs)})
    return rows


def incomplete_cells(records: typing.Sequence[dict], config: StudyConfig,
                     optimizers: typing.Sequence[str] = OPTIMIZERS
                     ) -> typing.List[typing.Tuple[int, str, int, int]]:
    """``[(B, optimizer, trials done, grid size)]`` of the cells whose grid
    is not finished."""
    out = []
    for batch_size in config.batch_sizes:
        for name in optimizers:
            keys = {t.key() for t in grid(config, name, batch_size)}
            done = sum(1 for r in records if r['key'] in keys)
            if done < len(keys):
                out.append((batch_size, name, done, len(keys)))
    return out


def critical_batch_size(rows: typing.Iterable[dict], optimizer: str,
                        factor: float = 2.0) -> typing.Optional[int]:
    """The largest B whose steps to the target are within ``factor`` of
    perfect scaling from the smallest B (steps ∝ 1/B): steps(B) ≤ factor ·
    steps(B₀) · B₀/B.  None when the smallest B misses the target."""
    mine = sorted((r for r in rows if r['optimizer'] == optimizer),
                  key=lambda r: r['batch_size'])
    if not mine or not math.isfinite(mine[0]['steps']):
        return None
    b0, s0 = mine[0]['batch_size'], mine[0]['steps']
    critical = b0
    for r in mine[1:]:
        if r['steps'] <= factor * s0 * b0 / r['batch_size']:
            critical = r['batch_size']
        else:
            break
    return critical


def format_table(rows: typing.Iterable[dict]) -> typing.List[str]:
    lines = ['{:>7} {:<6} {:>8} {:>8} {:>10} {:>9} {:>7} {:>9} {:>10}'.format(
        'B', 'opt', 'steps', 'epochs', 'lr', 'damping', 'seeds', 'best acc',
        's/step')]
    for r in rows:
        steps = '-' if not math.isfinite(r['steps']) else \
            '{:g}'.format(r['steps'])
        epochs = '-' if not math.isfinite(r['epochs']) else \
            '{:.2f}'.format(r['epochs'])
        lines.append(
            '{:>7} {:<6} {:>8} {:>8} {:>10} {:>9} {:>7} {:>9.4f} {:>10.4f}'
            .format(r['batch_size'], r['optimizer'], steps, epochs,
                    '{:.4g}{}'.format(r['lr'],
                                      '*' if r['lr_at_grid_edge'] else ''),
                    '{:.0e}'.format(r['damping']) if r['damping'] else '-',
                    '{}/{}'.format(r['seeds_reached'], r['seeds']),
                    r['best_accuracy'], r['seconds_per_step']))
    return lines


def plot(rows: typing.Sequence[dict], path: str,
         target: float) -> typing.Any:
    """Steps to the target vs B (log-log) per optimizer, with perfect
    scaling (steps ∝ 1/B) from each optimizer's smallest B.  Returns the
    (closed) figure."""
    pyplot = plotting.pyplot()
    fig, ax = pyplot.subplots(figsize=(6, 4.5))
    for name, marker in zip(OPTIMIZERS, 'osd'):
        mine = sorted((r for r in rows if r['optimizer'] == name),
                      key=lambda r: r['batch_size'])
        ok = [r for r in mine if math.isfinite(r['steps'])]
        if not ok:
            continue
        line, = ax.plot([r['batch_size'] for r in ok],
                        [r['steps'] for r in ok], marker=marker, label=name)
        b0, s0 = mine[0]['batch_size'], mine[0]['steps']
        if math.isfinite(s0):
            bs = [r['batch_size'] for r in mine]
            ax.plot(bs, [s0 * b0 / b for b in bs], ':',
                    color=line.get_color(), linewidth=1)
        for r in mine:
            if not math.isfinite(r['steps']):
                ax.annotate('×', (r['batch_size'], ax.get_ylim()[1]),
                            color=line.get_color(), ha='center')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('mini-batch size B (images)')
    ax.set_ylabel('steps (updates) to {:.0%} test accuracy'.format(target))
    ax.set_title('Fashion-MNIST, ResNet-8 (dotted: perfect scaling; '
                 '×: not reached)',
                 fontsize=10)
    ax.legend(fontsize=8)
    plotting.save_figure(fig, path)
    return fig
