"""Figures of the paper: Diff(t) (Figure 5), the α–β scaling model (Figure 2),
the refresh fraction of a schedule and the plotting scripts (headless)."""

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
from chainer import training

from chainerkfac.distributed import assignment
from chainerkfac.examples import fisher_diff_figure
from chainerkfac import extensions
from chainerkfac import optimizers
from chainerkfac import scaling
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
def test_relative_change_is_the_relative_frobenius_norm():
    rng = numpy.random.RandomState(0)
    old = rng.randn(5, 5)
    new = old + 0.1 * rng.randn(5, 5)
    expected = math.sqrt(((new - old) ** 2).sum()) / math.sqrt(
        (old ** 2).sum())
    assert extensions.relative_change(new, old) == pytest.approx(
        expected, rel=1e-12)
    # float16 factors are widened before the norms (no overflow at 300²·25)
    big = numpy.full((5, 5), 300, numpy.float16)
    assert extensions.relative_change(big * 2, big) == pytest.approx(1.0)
    assert math.isnan(extensions.relative_change(new, numpy.zeros((5, 5))))


class MLP(chainer.Chain):
    def __init__(self):
        super(MLP, self).__init__()
        with self.init_scope():
            self.l1 = L.Linear(4, 6)
            self.bn = L.BatchNormalization(6)
            self.l2 = L.Linear(6, 3)

    def forward(self, x):
        return self.l2(F.relu(self.bn(self.l1(x))))


def make_run(a_interval=1, seed=0):
    numpy.random.seed(seed)
    model = MLP()
    optimizer = optimizers.KFAC(lr=0.05, damping=1e-2,
                                a_interval=a_interval)
    optimizer.setup(model)
    rng = numpy.random.RandomState(seed)

    def step():
        x = rng.randn(8, 4).astype(numpy.float32)
        t = rng.randint(0, 3, 8).astype(numpy.int32)
        optimizer.update(
            lambda: F.softmax_cross_entropy(model(x), t))
    return model, optimizer, step


def factors_now(optimizer):
    return {(layer.name, name): numpy.array(layer.factor(name), copy=True)
            for layer in optimizer.kfac_layers for name in layer.factor_names}


def test_fisher_diff_records_every_refresh_against_the_previous_one():
    # A every 2 updates, G and the BN Fisher every update
    _, optimizer, step = make_run(a_interval=2)
    recorder = extensions.FisherDiff()
    history = []
    for _ in range(4):
        step()
        history.append(factors_now(optimizer))
        recorder.observe(optimizer)
    got = {(r['iteration'], r['layer'], r['factor']): r['diff']
           for r in recorder.records}

    def diff(key, t_new, t_old):
        new, old = history[t_new - 1][key], history[t_old - 1][key]
        return numpy.linalg.norm(new - old) / numpy.linalg.norm(old)

    expected = {}
    for t in (2, 3, 4):  # optimizer.t after the update
        for key in history[0]:
            if key[1] == 'A':
                if t == 3:  # built at update number 2 (t: 2 -> 3)
                    expected[(t,) + key] = diff(key, 3, 1)
            else:
                expected[(t,) + key] = diff(key, t, t - 1)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert value > 0
        assert got[key] == pytest.approx(value, rel=1e-5), key


def test_fisher_diff_extension_writes_json_lines(tmp_path):
    numpy.random.seed(0)
    model = L.Classifier(MLP())
    optimizer = optimizers.KFAC(lr=0.05, damping=1e-2)
    optimizer.setup(model)
    rng = numpy.random.RandomState(1)
    data = chainer.datasets.TupleDataset(
        rng.randn(64, 4).astype(numpy.float32),
        rng.randint(0, 3, 64).astype(numpy.int32))
    iterator = chainer.iterators.SerialIterator(data, 16)

    def update_func(it, opt):
        batch = chainer.dataset.concat_examples(it.next())
        opt.update(model, *batch)

    class Updater(training.updaters.StandardUpdater):
        def update_core(self):
            update_func(self._iterators['main'], self._optimizers['main'])

    trainer = training.Trainer(Updater(iterator, optimizer), (7, 'iteration'),
                               out=str(tmp_path))
    trainer.extend(extensions.FisherDiff(flush_interval=3))
    trainer.run()
    lines = (tmp_path / 'fisher_diff.jsonl').read_text().splitlines()
    records = [json.loads(line) for line in lines]
    # 3 layers, 5 factors (A, G; F; A, G), refreshed at iterations 2..7
    assert len(records) == 5 * 6
    assert sorted(set(r['iteration'] for r in records)) == list(range(2, 8))
    assert set(r['factor'] for r in records) == {'A', 'G', 'F'}


# -- the α–β model ----------------------------------------------------------
UNIT = scaling.Network(latency=1.0, bandwidth=1.0, algorithm='ring')
HALVING = scaling.Network(latency=1.0, bandwidth=1.0, algorithm='halving')


def test_ring_hand_computed():
    # 3 steps, each as long as the largest segment: 3·(1 + 4)
    assert scaling.collective_time([1, 2, 3, 4], UNIT) == 15
    assert scaling.collective_time([7], UNIT) == 0
    # equal segments: (P − 1)·α + (P − 1)/P·n·β
    net = scaling.Network(latency=2e-6, bandwidth=1e9)
    n = 8e6
    assert scaling.collective_time([n / 8] * 8, net) == pytest.approx(
        7 * 2e-6 + 7 / 8 * n / 1e9)


def test_recursive_halving_hand_computed():
    # step 1: halves {0,1} / {2,3} exchange 3 and 7 bytes -> 1 + 7;
    # step 2: pairs exchange 2,1 and 4,3 bytes -> 1 + 4
    assert scaling.collective_time([1, 2, 3, 4], HALVING) == 13
    # P = 3: rank 2 hands its 6-byte vector to rank 0 (1 + 6), ranks 0, 1
    # halve segments [1 + 3, 2] (1 + 4), rank 2 gets its 3 bytes (1 + 3)
    assert scaling.collective_time([1, 2, 3], HALVING) == 16
    net = scaling.Network(latency=3e-6, bandwidth=2e9, algorithm='halving')
    n = 64e6
    assert scaling.collective_time([n / 16] * 16, net) == pytest.approx(
        4 * 3e-6 + 15 / 16 * n / 2e9)


GROUPED = scaling.Network(latency=1.0, bandwidth=1.0, algorithm='grouped')


def test_grouped_hand_computed():
    # P − 1 latencies; the link leaving rank 0 carries every segment but
    # rank 0's own (the smallest): 2 + 3 + 4
    assert scaling.collective_time([1, 2, 3, 4], GROUPED) == 3 + 9
    # empty segments (idle ranks) cost latency only
    assert scaling.collective_time([0, 5, 0, 0], GROUPED) == 3 + 5
    # equal segments: the ring's (P − 1)·α + (P − 1)/P·n·β
    net = scaling.Network(latency=2e-6, bandwidth=1e9, algorithm='grouped')
    assert scaling.collective_time([1e6] * 8, net) == pytest.approx(
        7 * 2e-6 + 7e6 / 1e9)
    assert scaling.Network(1e-6, 1e9).algorithm == 'grouped'


def test_padded_bytes():
    assert scaling.padded_bytes([1, 2, 3, 4]) == 16
    assert scaling.padded_bytes([0, 5, 0]) == 15
    assert scaling.padded_bytes([]) == 0


def test_allreduce_is_reduce_scatter_plus_all_gather():
    net = scaling.Network(latency=5e-6, bandwidth=10e9)
    assert scaling.allreduce_time(1e8, 4, net) == pytest.approx(
        2 * (3 * 5e-6 + 3 / 4 * 1e8 / 10e9))
    assert scaling.allreduce_time(1e8, 1, net) == 0


def test_network_rejects_bad_values():
    with pytest.raises(ValueError, match='algorithm'):
        scaling.Network(1e-6, 1e9, 'tree')
    with pytest.raises(ValueError, match='bandwidth'):
        scaling.Network(1e-6, 0)


LAYERS = (
    scaling.LayerInfo('conv', 10, ((3, 3), (2, 2))),  # packed 6 + 3
    scaling.LayerInfo('bn', 4, ((4,),)),
    scaling.LayerInfo('fc', 6, ((3, 3), (2, 2))),
)


def plan_of(owners, primary):
    costs = [layer.cost for layer in LAYERS]
    return assignment.Assignment(costs, 2, owners, primary)


def test_stage_counts_follow_the_plan():
    plan = plan_of(((0,), (1,), (0, 1)), (0, 1, 1))
    fp32 = scaling.stage3_counts(plan, LAYERS, scaling.DENSE_FP32, True)
    assert fp32 == [(10 + 13) * 4 + (6 + 13) * 4,
                    (4 + 4) * 4 + (6 + 13) * 4]
    fp16 = scaling.stage3_counts(plan, LAYERS, scaling.PACKED_FP16, True)
    assert fp16 == [10 * 4 + 9 * 2 + 6 * 4 + 9 * 2,
                    4 * 4 + 4 * 2 + 6 * 4 + 9 * 2]
    stale = scaling.stage3_counts(plan, LAYERS, scaling.PACKED_FP16, False)
    assert stale == [(10 + 6) * 4, (4 + 6) * 4]
    assert scaling.stage6_counts(plan, LAYERS) == [10 * 4, (4 + 6) * 4]


def test_iteration_stages_use_the_slowest_rank():
    costs = scaling.StageCosts(forward_backward=1.0, factors=0.5,
                               update=0.1, inverse_rate=10.0,
                               precondition_rate=20.0)
    plan = plan_of(((0,), (1,), (0, 1)), (0, 1, 1))
    stages = scaling.iteration_stages(2, LAYERS, costs, UNIT,
                                      scaling.DENSE_FP32, True, plan)
    kron = 27 / 3 + 8 / 3                       # potrf d³/3 of A and G
    inv = [2 * kron, 4 + kron]                  # BN: 4 divisions
    pre = [2 * 6 * 5 * 2, 2 * 6 * 5]           # 2·d_A·d_G·(d_A + d_G)
    assert stages['inverse'] == pytest.approx(max(inv) / 10.0)
    assert stages['precondition'] == pytest.approx(max(pre) / 20.0)
    assert stages['reduce_scatter'] == 1 + max(
        scaling.stage3_counts(plan, LAYERS, scaling.DENSE_FP32, True))
    assert stages['total'] == pytest.approx(sum(
        v for k, v in stages.items() if k != 'total'))
    stale = scaling.iteration_stages(2, LAYERS, costs, UNIT,
                                     scaling.DENSE_FP32, False, plan)
    assert stale['inverse'] == stale['factors'] == 0
    mixed = scaling.kfac_time(2, LAYERS, costs, UNIT, scaling.DENSE_FP32,
                              refresh_fraction=0.25)
    fresh = scaling.kfac_time(2, LAYERS, costs, UNIT, scaling.DENSE_FP32)
    assert fresh > mixed > stale['total']
    # one process: no communication, every FLOP on it
    alone = scaling.iteration_stages(1, LAYERS, costs, UNIT,
                                     scaling.DENSE_FP32)
    assert alone['reduce_scatter'] == alone['all_gather'] == 0
    assert alone['inverse'] == pytest.approx((2 * kron + 4) / 10.0)


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


def test_stage3_bytes_flat_past_the_layer_count():
    """ResNet-50: with one owner per layer, the bytes of stages 3 and 6 at
    any P > 107 are those of P = 107; the paper's replicated layout sends a
    copy per replica."""
    from chainerkfac.examples.scaling_model import resnet50_layers
    layers = resnet50_layers()
    assert len(layers) == 107

    def stage3(p, redundant=False):
        plan = scaling.plan_of(layers, p, redundant)
        return scaling.stage3_counts(plan, layers, scaling.PACKED_FP16, True)

    payload = sum(layer.grad_elements * 4 + layer.factor_elements(True) * 2
                  for layer in layers)
    base = stage3(107)
    assert sum(base) == payload
    for p in (108, 256, 1024):
        counts = stage3(p)
        assert sum(counts) == payload
        assert sorted(counts)[-107:] == sorted(base)
        assert sorted(scaling.stage6_counts(scaling.plan_of(layers, p),
                                            layers))[-107:] == \
            sorted(scaling.stage6_counts(scaling.plan_of(layers, 107),
                                         layers))
    replicated = [sum(stage3(p, True)) for p in (107, 256, 1024)]
    assert replicated[0] == payload < replicated[1] < replicated[2]


def test_fisher_memory_bar_chart(tmp_path):
    from chainerkfac.examples import fisher_memory as module
    part = {'conv_A': 3 * 2 ** 20, 'conv_G': 2 ** 20, 'fc': 2 ** 19,
            'bn': 2 ** 18}
    part['total'] = sum(part.values())
    results = {(bn, dtype): {'dense': part, 'packed': part}
               for bn, dtype in module.CONFIGS}
    out = tmp_path / 'memory.png'
    module.plot_bars(results, str(out))
    assert_png(out)
