"""The options study: its factor-build counts, steps to the target and
options checked on scikit-learn's digits, its bookkeeping (resume, shards,
the report) on hand-made records, and its errors."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest

import tests

import chainer
import chainer.links as L

from chainerkfac import datasets
from chainerkfac.examples import batch_scaling
from chainerkfac.examples import options_study as study
from chainerkfac import plotting
from chainerkfac import schedules
from chainerkfac.links import ResNet8

from tests.mpi import mpi_env

SCRIPT = os.path.join(tests.ROOT, 'scripts', 'options_study.py')
#: the variants the script knows (a test adds one to the module's table)
VARIANT_NAMES = tuple(study.VARIANTS)
CPU = chainer.get_device('@numpy')


@pytest.fixture(scope='module')
def digits():
    """1,000 training and 100 test images of 8 x 8 (balanced)."""
    train, test = datasets.get_digits()
    return batch_scaling.subset(train, 1000), batch_scaling.subset(test, 100)


def tiny(**changes):
    """The study's protocol on the digits: ResNet-8 of width 2."""
    return dataclasses.replace(
        study.MEDIUM, width=2, n_train=0, n_test=0, budget_epochs=0.01,
        evals_per_epoch=4, seeds=1, **changes)


def n_factors(width):
    """A and G per convolution and linear layer, one BN Fisher per BN
    layer, counted on the model itself."""
    counts = {L.Convolution2D: 2, L.Linear: 2, L.BatchNormalization: 1}
    return sum(counts.get(type(link), 0)
               for link in ResNet8(n_class=10, width=width).links())


def test_paper_builds_follow_eq20_and_steps_are_the_first_eval_at_target(
        digits):
    train, test = digits
    # B = 10 on 1,000 images: 100 steps an epoch, so the 520 steps pass
    # eq. 20's first 500 iterations at epoch 5 (interval 6)
    config = tiny(batch_sizes=(10,), min_steps=520, target=0.8)
    trial = batch_scaling.Trial('kfac', 10, 0.04, 2e-2, 0)
    record = study.run_variant('paper', trial, config, train, test, CPU)

    def due(t):
        return t % schedules.stale_interval('eq20', t, t * 10 / 1000) == 0

    def builds(steps):   # after the updates t = 0 .. steps - 1
        return sum(due(t) for t in range(steps)) * n_factors(2)
    assert n_factors(2) == 29
    assert record['factor_builds'] == builds(520) == (500 + 3) * 29
    history = record['history']
    assert [s for s, _ in history] == list(range(25, 520, 25)) + [520]
    first = next(s for s, a in history if a >= config.target)
    assert record['steps'] == first < 520   # then trained to the budget
    assert record['status'] == 'reached'
    assert record['factor_builds_to_target'] == builds(first)
    assert record['builds_history'] == [builds(s) for s, _ in history]
    assert record['best_accuracy'] == max(a for _, a in history)
    assert record['key'] == 'paper/B10/lr0.04/d0.02/s0'
    assert record['options'] == {} and record['variant'] == 'paper'


@pytest.fixture
def made(monkeypatch):
    """The optimizers run_trial makes, and the momentum of every update."""
    made = []
    original = batch_scaling.make_optimizer

    def spy(*args, **kwargs):
        optimizer, schedule = original(*args, **kwargs)
        made.append((optimizer, []))

        def recording(opt, step):
            schedule(opt, step)
            made[-1][1].append(opt.momentum)
        return optimizer, recording
    monkeypatch.setattr(batch_scaling, 'make_optimizer', spy)
    return made


def test_variant_options_reach_the_optimizer(digits, made):
    train, test = digits
    train = batch_scaling.subset(train, 40)
    # B = 20 on 40 images: 2 steps an epoch, 6 steps: e_end = 3
    config = tiny(batch_sizes=(20,), min_steps=6)
    trial = batch_scaling.Trial('kfac', 20, 0.04, 2e-2, 0)
    for name in ('paper', 'unit_bn', 'lr_ratio'):
        study.run_variant(name, trial, config, train, test, CPU)
    (paper, m_paper), (unit, _), (ratio, m_ratio) = made
    assert paper.bn_fisher == 'diagonal' and unit.bn_fisher == 'unit'
    bn = [layer for layer in unit.kfac_layers
          if isinstance(layer.link, L.BatchNormalization)]
    assert len(bn) == 9 and all(layer.mode == 'unit' for layer in bn)
    assert paper.hyperparam.momentum_schedule == 'eq16'
    assert ratio.hyperparam.momentum_schedule == 'lr_ratio'
    # eq. 16: m(0)·(1 − (e − 1)/(3 − 1))² after the first epoch; lr_ratio:
    # m(0) throughout (the update rule scales it by η(t)/η(t−1))
    eq16 = [0.9 if e < 1 else 0.9 * (1 - (e - 1) / 2) ** 2
            for e in (t * 20 / 40 for t in range(6))]
    assert m_paper == pytest.approx(eq16)
    assert m_ratio == [0.9] * 6
    # 6 updates, every factor due in each (eq. 20 below 500 iterations):
    # the optimizer's count, and the layers' own without it
    assert study.factor_builds(paper) == 6 * n_factors(2)
    assert study.factor_builds(types.SimpleNamespace(
        kfac_layers=paper.kfac_layers)) == 6 * n_factors(2)


def fake_record(variant, trial, steps=40, builds=1000):
    return dict(dataclasses.asdict(trial), key=study.run_key(variant, trial),
                variant=variant, options=dict(study.VARIANTS[variant]),
                steps=steps, best_accuracy=0.9, seconds_per_step=0.1,
                factor_builds=builds,
                factor_builds_to_target=None if steps is None else builds // 2,
                status='x', history=[])


def test_study_resumes_without_rerunning(tmp_path, monkeypatch):
    ran = []

    def fake(variant, trial, config, train, test, device):
        ran.append(study.run_key(variant, trial))
        return fake_record(variant, trial)
    monkeypatch.setattr(study, 'run_variant', fake)
    config = dataclasses.replace(study.MEDIUM, seeds=2)
    variants = ['paper', 'unit_bn']
    out = str(tmp_path / 'one')

    def run(out, **kwargs):
        return study.run_study(config, None, None, None, out, variants,
                               **kwargs)
    first = run(out)
    # 2 batch sizes x 2 variants x 2 seeds, at the tuned settings
    assert len(ran) == len(set(ran)) == len(first) == 8
    assert 'unit_bn/B512/lr0.02/d0.002/s1' in ran
    path = os.path.join(out, 'options.jsonl')
    assert len(open(path).readlines()) == 8
    ran.clear()
    assert len(run(out)) == 8 and ran == []
    # a line cut off by a kill: that run again, nothing else
    lines = open(path).readlines()
    with open(path, 'w') as f:
        f.writelines(lines[:-1] + [lines[-1][:20]])
    run(out)
    assert ran == [json.loads(lines[-1])['key']]
    # a variant whose options changed runs again
    ran.clear()
    monkeypatch.setitem(study.VARIANTS, 'unit_bn', {'bn_fisher': 'full'})
    run(out)
    assert sorted(ran) == sorted(k for k in (
        r['key'] for r in first) if k.startswith('unit_bn/'))
    # shards split the runs; together they are the whole study
    ran.clear()
    other = str(tmp_path / 'sharded')
    for k in range(2):
        run(other, shard=(k, 2))
    assert len(ran) == len(set(ran)) == 8
    assert len(study.load_runs(other)) == 8
    assert sorted(os.listdir(other)) == [
        'options-0-of-2.jsonl', 'options-1-of-2.jsonl', 'study.json']


def test_report_medians_spread_and_build_ratios(tmp_path):
    config = dataclasses.replace(study.MEDIUM, batch_sizes=(128,))
    trial = batch_scaling.Trial('kfac', 128, 0.04, 2e-2, 0)
    records = []
    for seed, steps, builds in ((0, 100, 2900), (1, 120, 3000),
                                (2, None, 3100)):
        records.append(fake_record('paper', dataclasses.replace(
            trial, seed=seed), steps, builds))
    for seed, steps, builds in ((0, 90, 1450), (1, 110, 1500),
                                (2, 130, 1550)):
        records.append(fake_record('unit_bn', dataclasses.replace(
            trial, seed=seed), steps, builds))
    # another setting at the same B is not this study's
    records.append(fake_record('paper', dataclasses.replace(
        trial, lr=0.02), 1, 1))
    rows = study.summarize(records, config)
    paper, unit = rows
    assert (paper['steps'], paper['steps_min'], paper['steps_max']) == (
        120, 100, math.inf)             # median of 100, 120, missed
    assert (paper['seeds_reached'], paper['seeds']) == (2, 3)
    assert paper['builds'] == 3000 and unit['builds'] == 1500
    assert unit['builds_ratio'] == 0.5
    # to the target: 1450, 1500 / 725, 750 (a miss is infinite)
    assert paper['builds_to_target'] == 1500
    assert unit['builds_to_target'] == 750
    assert unit['builds_to_target_ratio'] == 0.5
    lines = study.format_table(rows)
    assert lines[1].split()[:8] == ['128', 'paper', '120', '(100-inf)',
                                    '2/3', '3000', '1500', '1.00']
    assert lines[2].split()[:9] == ['128', 'unit_bn', '110', '(90-130)',
                                    '3/3', '1500', '750', '0.50', '0.50']
    fig = study.plot(rows, str(tmp_path / 'options.png'), 0.8)
    assert plotting.unlabelled_axes(fig) == []
    assert (tmp_path / 'options.png').stat().st_size > 0


def test_bad_variants_are_one_line(monkeypatch, tmp_path):
    with pytest.raises(ValueError) as error:
        study.plan(study.MEDIUM, ['paper', 'bogus'])
    message = str(error.value)
    assert "unknown variant 'bogus'" in message and '\n' not in message
    monkeypatch.setitem(study.VARIANTS, 'future', {'no_such_option': 1})
    with pytest.raises(ValueError, match="variant 'future': .*"
                       "'no_such_option'"):
        study.check_variants(['future'])
    proc = subprocess.run(
        [sys.executable, SCRIPT, '--variants', 'paper', 'bogus', '--out',
         str(tmp_path / 'out')], env=mpi_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: unknown variant 'bogus'; expected one of " + ', '.join(
            repr(name) for name in VARIANT_NAMES)]
    assert not (tmp_path / 'out').exists()


def test_the_documented_table_is_the_recorded_study():
    """docs/batch-scaling.md's table of the options: every row from the
    records kept in docs/options_study/."""
    records = study.load_runs(os.path.join(tests.ROOT, 'docs',
                                           'options_study'))
    rows = study.summarize(records.values(), study.MEDIUM)
    assert len(rows) == 2 * len(VARIANT_NAMES)
    with open(os.path.join(tests.ROOT, 'docs', 'batch-scaling.md')) as f:
        text = f.read()
    text = text[text.index('## The options beyond the paper'):]
    for r in rows:
        cells = '| {} | {} | {:g} ({:g}-{:g}) | {:,} ({:,}) |'.format(
            r['batch_size'], r['variant'], r['steps'], r['steps_min'],
            r['steps_max'], int(r['builds']), int(r['builds_to_target']))
        assert cells in text, cells
