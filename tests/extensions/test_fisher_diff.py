"""FisherDiff (Figure 5): Diff(t) of every factor at every refresh, logged."""

import json
import math

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import training

from chainerkfac import extensions
from chainerkfac import optimizers

from tests.examples.test_figures import MLP


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
