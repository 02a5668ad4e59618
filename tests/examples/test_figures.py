"""Figures of the paper: the refresh fraction of a schedule, Figure 5's
checks, and the plotting scripts (headless)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy
import pytest

import tests

import chainer
import chainer.functions as F
import chainer.links as L

from chainerkfac.examples import fisher_diff_figure
from chainerkfac import extensions
from chainerkfac import schedules

ROOT = tests.ROOT
PNG = b'\x89PNG\r\n\x1a\n'


def script(name, *args, check=True):
    """Runs ``scripts/<name>.py args`` as a command: its finished process."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', name + '.py')] +
        [str(a) for a in args], check=check, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True)


def assert_png(path):
    with open(str(path), 'rb') as f:
        assert f.read(8) == PNG
    assert os.path.getsize(str(path)) > 5000


# -- Diff(t) ----------------------------------------------------------------


class MLP(chainer.Chain):
    def __init__(self):
        super(MLP, self).__init__()
        with self.init_scope():
            self.l1 = L.Linear(4, 6)
            self.bn = L.BatchNormalization(6)
            self.l2 = L.Linear(6, 3)

    def forward(self, x):
        return self.l2(F.relu(self.bn(self.l1(x))))


def test_refresh_fraction_hand_computed():
    assert schedules.refresh_fraction('none', 1, 3, 10) == 1.0
    # eq. 21, 10 examples, batch 1, 26 epochs: t < 130 every step (130),
    # then every 20th: 140, 160, ..., 240 (6)
    assert schedules.refresh_fraction('eq21', 1, 26, 10) == \
        pytest.approx(136 / 260)


# -- plotting entry points (headless) ---------------------------------------
def test_plot_schedules_writes_png(tmp_path):
    out = tmp_path / 'schedules.png'
    lines = script('plot_schedules', '--config', 'bs32k.yaml', '--out',
                   out).stdout.splitlines()
    assert_png(out)
    assert 'wrote {}'.format(out) in lines
    row = [line.split() for line in lines if line.startswith('bs32k')][0]
    # 1,281,167 / 32,768 iterations per epoch, t_warmup 59 (Table 3)
    assert row[2] == '39.10' and row[4] == '59'


def synthetic_log(path, a_scale, g_scale, iterations=40, layers=5):
    """Diff decaying from 10x to 1x its scale over the iterations."""
    with open(str(path), 'w') as f:
        for t in range(2, iterations + 2):
            decay = 1 + 9 * math.exp(-t / 4.0)
            for k in range(layers):
                for factor, scale in (('A', a_scale), ('G', g_scale)):
                    f.write(json.dumps({
                        'iteration': t, 'layer': '/l{}'.format(k),
                        'factor': factor,
                        'diff': scale * decay * (1 + 0.1 * k)}) + '\n')


def test_plot_fisher_diff_writes_png_and_checks_the_claims(tmp_path):
    small, large = tmp_path / 'small.jsonl', tmp_path / 'large.jsonl'
    synthetic_log(small, 0.1, 0.3)
    synthetic_log(large, 0.05, 0.01)  # here G < A: must be reported
    logs = [extensions.fisher_diff.read_log(str(small)),
            extensions.fisher_diff.read_log(str(large))]
    observed = fisher_diff_figure.report(logs, ['bs1', 'bs2'], 0.1)
    assert observed['bs1 A: fast change early']
    assert observed['bs1: A < G']
    assert not observed['bs2: A < G']
    assert observed['bs2 vs bs1 A: slower']
    assert observed['bs2 vs bs1 G: slower']
    iterations, table = extensions.fisher_diff.percentiles(logs[0]['A'])
    assert list(iterations) == list(range(2, 42))
    assert table.shape == (5, 40)
    assert numpy.all(numpy.diff(table, axis=0) >= 0)  # 5th <= ... <= 95th
    out = tmp_path / 'diff.png'
    script('plot_fisher_diff', small, large, '--out', out)
    assert_png(out)


def test_plot_fisher_diff_rejects_a_bad_log(tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"iteration": 2}\n')
    done = script('plot_fisher_diff', bad, check=False)
    assert done.returncode == 1
    assert 'bad.jsonl:1: not a FisherDiff' in done.stderr.splitlines()[-1]


def test_scaling_model_writes_png(tmp_path):
    out = tmp_path / 'scaling.png'
    text = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'scaling_model.py'),
         '--processes', '1', '2', '64', '256', '--out', str(out)],
        check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
    assert_png(out)
    assert 'T(1)/T(64)' in text
    last = text.strip().splitlines()[-1]
    match = re.match(r'^T\(256\)/min: every-step (\d+\.\d{3}), '
                     r'stale (\d+\.\d{3})$', last)
    assert match, last
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[0] in ('1', '2', '64', '256'):
            rows.setdefault(int(cells[0]), [float(c) for c in cells[1:]])
    every = [rows[p][2] for p in (1, 2, 64, 256)]
    stale = [rows[p][3] for p in (1, 2, 64, 256)]
    assert float(match.group(1)) == round(every[-1] / min(every), 3)
    assert float(match.group(2)) == round(stale[-1] / min(stale), 3)


def fisher_memory_results():
    """Made-up measures of every configuration of Figure 4's script."""
    from chainerkfac.examples import fisher_memory as module
    part = {'conv_A': 3 * 2 ** 20, 'conv_G': 2 ** 20, 'fc': 2 ** 19,
            'bn': 2 ** 18}
    part['total'] = sum(part.values())
    return {(bn, dtype): {'dense': part, 'packed': part}
            for bn, dtype in module.CONFIGS}


def test_fisher_memory_bar_chart(tmp_path):
    from chainerkfac.examples import fisher_memory as module
    results = fisher_memory_results()
    out = tmp_path / 'memory.png'
    module.plot_bars(results, str(out))
    assert_png(out)


def test_bench_peers_redraws_the_documented_run(tmp_path):
    out = tmp_path / 'peers.png'
    done = script('bench_peers', '--replot',
                  os.path.join(ROOT, 'docs', 'figures', 'peers.json'),
                  '--out', out)
    assert_png(out)
    assert 'wrote {}'.format(out) in done.stdout.splitlines()
