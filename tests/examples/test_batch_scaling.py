"""The large-batch study: its bookkeeping on hand-made results, and the
quick study, cut smaller, end to end on the real Fashion-MNIST."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

import tests

from chainerkfac.datasets import DatasetError
from chainerkfac.datasets import fashion_mnist
from chainerkfac.examples import batch_scaling as study

from tests.mpi import mpi_env

ROOT = tests.ROOT
SCRIPT = os.path.join(ROOT, 'scripts', 'batch_scaling.py')


def row(optimizer, batch_size, steps):
    return {'optimizer': optimizer, 'batch_size': batch_size,
            'steps': steps}


def test_critical_batch_size_is_within_2x_of_perfect_scaling():
    rows = [row('sgd', 128, 1000), row('sgd', 512, 300),   # 2x: <= 500
            row('sgd', 2048, 150),                          # 2x: <= 125
            row('sgd', 8192, 30),                           # after a miss
            row('kfac', 128, 400), row('kfac', 512, 200),   # 2x: <= 200
            row('kfac', 2048, math.inf),
            row('lars', 128, math.inf), row('lars', 512, 10)]
    assert study.critical_batch_size(rows, 'sgd') == 512
    assert study.critical_batch_size(rows, 'kfac') == 512
    assert study.critical_batch_size(rows, 'lars') is None


def test_grids_give_every_optimizer_the_same_budget():
    config = study.FULL
    sizes = {name: len(study.grid(config, name, 512))
             for name in study.OPTIMIZERS}
    assert len(set(sizes.values())) == 1
    assert sizes['sgd'] == config.trials_per_optimizer()
    sgd = sorted(t.lr for t in study.grid(config, 'sgd', 512))
    # linear scaling from B = 128: 4x the base, times the factors
    assert sgd == pytest.approx([0.1 * 4 * f for f in (0.25, 0.5, 1, 2)])
    kfac = study.grid(config, 'kfac', 512)
    assert {t.damping for t in kfac} == set(config.dampings)
    assert sorted({t.lr for t in kfac}) == pytest.approx(
        [0.02 * 2 * f for f in (0.5, 2.0)])  # sqrt scaling
    unequal = dataclasses.replace(config, dampings=(1e-3,))
    with pytest.raises(ValueError, match='unequal trial budgets'):
        unequal.trials_per_optimizer()


def test_sgd_schedule_warmup_then_polynomial_decay():
    f = study.warmup_polynomial_lr
    assert f(0.5, 0.4, 1.0, 5.0, 2.0) == pytest.approx(0.2)
    assert f(1.0, 0.4, 1.0, 5.0, 2.0) == pytest.approx(0.4)
    assert f(3.0, 0.4, 1.0, 5.0, 2.0) == pytest.approx(0.4 * 0.25)
    assert f(5.0, 0.4, 1.0, 5.0, 2.0) == 0.0


def record(optimizer, batch_size, lr, seed, steps, acc=0.9, damping=0.0):
    trial = study.Trial(optimizer, batch_size, lr, damping, seed)
    return dict(dataclasses.asdict(trial), key=trial.key(), steps=steps,
                best_accuracy=acc, seconds_per_step=0.1, status='x')


def test_summarize_takes_the_tuned_setting_and_the_median_over_seeds():
    config = dataclasses.replace(study.FULL, batch_sizes=(128,),
                                 n_train=1280)
    lrs = sorted(t.lr for t in study.grid(config, 'sgd', 128))
    assert lrs == pytest.approx([0.025, 0.05, 0.1, 0.2])
    records = [record('sgd', 128, lrs[0], 0, 60),
               record('sgd', 128, lrs[1], 0, 50),
               record('sgd', 128, lrs[2], 0, 40),
               record('sgd', 128, lrs[3], 0, None, acc=0.5),
               record('sgd', 128, lrs[2], 1, None, acc=0.87),
               record('sgd', 128, lrs[2], 2, 44)]
    rows = study.summarize(records, config)
    assert len(rows) == 1
    r = rows[0]
    assert r['lr'] == lrs[2] and not r['lr_at_grid_edge']
    assert r['steps'] == 44          # median of 40, inf, 44
    assert r['epochs'] == pytest.approx(44 * 128 / 1280)
    assert (r['seeds_reached'], r['seeds']) == (2, 3)
    lines = study.format_table(rows)
    assert lines[1].split()[:4] == ['128', 'sgd', '44', '4.40']
    # a cell whose grid is not finished is not reported, but listed
    assert study.summarize(records[1:], config) == []
    assert study.incomplete_cells(records[1:], config, ['sgd']) == [
        (128, 'sgd', 3, 4)]


def test_study_resumes_without_rerunning(tmp_path, monkeypatch):
    config = dataclasses.replace(
        study.QUICK, batch_sizes=(50, 100), seeds=2,
        lr_factors={'kfac': (1.0,), 'sgd': (0.5, 2.0), 'lars': (0.5, 2.0)})
    ran = []

    def fake(trial, config, train, test, device, progress=None):
        ran.append(trial.key())
        steps = {0.5: 30, 2.0: 20, 1.0: 10}
        factor = trial.lr / study.grid(config, trial.optimizer,
                                       trial.batch_size)[0].lr
        return record(trial.optimizer, trial.batch_size, trial.lr,
                      trial.seed, steps.get(round(factor, 3), 25),
                      damping=trial.damping)
    monkeypatch.setattr(study, 'run_trial', fake)
    out = str(tmp_path)
    first = study.run_study(config, None, None, None, out, log=lambda m: 0)
    # 2 sizes x 3 optimizers x (2 trials + 1 more seed of the tuned one)
    assert len(ran) == len(first) == 2 * 3 * 3
    assert len(open(study.results_path(out)).readlines()) == 18
    ran.clear()
    again = study.run_study(config, None, None, None, out, log=lambda m: 0)
    assert ran == [] and len(again) == 18
    # a line cut off by a kill: that trial runs again, nothing else
    path = study.results_path(out)
    lines = open(path).readlines()
    with open(path, 'w') as f:
        f.writelines(lines[:-1] + [lines[-1][:20]])
    study.run_study(config, None, None, None, out, log=lambda m: 0)
    assert len(ran) == 1
    # shards split the cells; together they are the whole study
    ran.clear()
    other = str(tmp_path / 'sharded')
    for k in range(2):
        study.run_study(config, None, None, None, other, shard=(k, 2),
                        log=lambda m: 0)
    assert len(ran) == 18 and len(study.load_records(other)) == 18
    assert sorted(os.listdir(other)) == ['study.json', 'trials-0-of-2.jsonl',
                                         'trials-1-of-2.jsonl']


def test_a_folder_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(study, 'run_trial', lambda *a, **k: 1 / 0)
    config = dataclasses.replace(study.QUICK, batch_sizes=())
    study.run_study(config, None, None, None, str(tmp_path))
    # other batch sizes or seeds: the same study, extended
    study.run_study(dataclasses.replace(config, seeds=3), None, None, None,
                    str(tmp_path))
    with pytest.raises(study.StudyError,
                       match=r'other settings \(target 0.75 != 0.8\)'):
        study.run_study(dataclasses.replace(config, target=0.8), None,
                        None, None, str(tmp_path))


def test_bad_data_folder_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, '--quick', '--data', str(tmp_path),
         '--out', str(tmp_path / 'out')], env=mpi_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith('error: ')]
    assert len(errors) == 1 and errors[0].startswith('error: Fashion-MNIST')
    assert not (tmp_path / 'out').exists()


#: The ``--quick`` study cut to a fifth of its trained images (2 batch
#: sizes, a third of the subset, a lower target): the same code path on
#: the real data in under 3 minutes on 2 cores, instead of 14 to 18.
SMALLER = {'batch_sizes': (20, 100), 'n_train': 1000, 'n_test': 500,
           'target': 0.65}


def smaller_flags():
    flags = []
    for name, value in SMALLER.items():
        flags.append('--' + name.replace('_', '-'))
        flags.extend(str(v) for v in (
            value if isinstance(value, tuple) else (value,)))
    return flags


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    try:
        fashion_mnist.find_directory()
    except DatasetError:
        pytest.skip('Fashion-MNIST is not installed (make fashion-mnist)')
    out = tmp_path / 'quick'
    command = [sys.executable, SCRIPT, '--quick', '--device', 'cpu',
               '--out', str(out)] + smaller_flags()
    proc = subprocess.run(command, env=mpi_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = dataclasses.replace(study.QUICK, **SMALLER)
    cells = len(config.batch_sizes) * len(study.OPTIMIZERS)
    lines = (out / 'trials.jsonl').read_text().splitlines()
    assert len(lines) == cells * config.trials_per_optimizer()
    table = [line for line in proc.stdout.splitlines()
             if line.split()[:1] and line.split()[0].isdigit()]
    assert len(table) == cells
    for name in study.OPTIMIZERS:
        assert 'critical batch size (within 2x of perfect scaling): ' \
            + name in proc.stdout
    summary = json.loads((out / 'summary.json').read_text())
    # the flags changed these settings of --quick's and nothing else
    assert summary['config'] == json.loads(json.dumps(
        dataclasses.asdict(config)))
    # the smallest batch reaches the target with every optimizer
    smallest = [r for r in summary['rows']
                if r['batch_size'] == config.batch_sizes[0]]
    assert all(r['seeds_reached'] == 1 for r in smallest), smallest
    assert (out / 'steps_vs_batch.png').stat().st_size > 0
    # a second run finds every trial done
    again = subprocess.run(command, env=mpi_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=300)
    assert again.returncode == 0
    assert len((out / 'trials.jsonl').read_text().splitlines()) == \
        len(lines)
    # --report only reads the records
    report = subprocess.run(command + ['--report'], env=mpi_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert [line for line in report.stdout.splitlines()
            if line.split()[:1] and line.split()[0].isdigit()] == table
