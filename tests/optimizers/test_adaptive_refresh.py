"""``refresh='adaptive'``: every factor's interval from its relative change
(:mod:`chainerkfac.refresh`), against the rule worked by hand and the
change computed from the explicit factors; snapshots; the trainer's log.
The equality of P = 2 and P = 1 is the ``adaptive_refresh`` check of
``tests/mpi/worker.py``."""

import logging

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import serializers

from chainerkfac.extensions import FactorBuilds
from chainerkfac.optimizers import KFAC
from chainerkfac import refresh as refresh_module


def make_model(seed=0):
    numpy.random.seed(seed)
    return chainer.Sequential(L.Linear(5, 4), F.tanh, L.Linear(4, 3))


def batch(seed, n=16, scale=1.0):
    rng = numpy.random.RandomState(seed)
    x = (scale * rng.standard_normal((n, 5))).astype(numpy.float64)
    return x, rng.randint(0, 3, n).astype(numpy.int32)


def keys_of(opt):
    return [(layer, name) for layer in opt.kfac_layers
            for name in layer.factor_names]


def run(opt, model, batches):
    """Updates on ``batches``; returns, per update, the set of (layer
    name, factor) it built."""
    built = []
    for x, t in batches:
        due = opt.due_factors()
        built.append(set((layer.name, name) for layer, names in due.items()
                         for name in names))
        opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    return built


def setup(**kwargs):
    model = make_model()
    model.to_device('@numpy')
    for p in model.params():
        p.array = p.array.astype(numpy.float64)
    opt = KFAC(lr=kwargs.pop('lr', 0.0), refresh='adaptive',
               log_coverage=False, **kwargs).setup(model)
    return model, opt


def rule_schedule(steps, max_interval):
    """The updates that build a factor that never changes, by the rule
    worked by hand: built at 0 (interval 1), then each build doubles the
    interval up to the maximum."""
    t, k, out = 0, 1, []
    while t < steps:
        out.append(t)
        if t > 0:
            k = min(2 * k, max_interval)
        t += k
    return out


def test_factors_that_stop_changing_reach_the_maximum_interval():
    model, opt = setup(max_interval=8)
    x, t = batch(0)
    built = run(opt, model, [(x, t)] * 40)
    expected = rule_schedule(40, 8)
    assert expected == [0, 1, 3, 7, 15, 23, 31, 39]
    for layer, name in keys_of(opt):
        steps = [s for s, names in enumerate(built)
                 if (layer.name, name) in names]
        assert steps == expected, (layer.name, name, steps)
        assert opt.refresh_rule.interval(layer, name) == 8
        assert opt.refresh_rule.changes[(layer.name, name)] == 0.0
    # every factor counted once per build
    assert opt.factor_builds == len(expected) * len(keys_of(opt))


def test_a_factor_that_jumps_is_rebuilt_at_the_next_update():
    model, opt = setup(max_interval=4)
    x, t = batch(0)
    y, u = batch(1, scale=10.0)   # A of the first layer jumps
    batches = [(x, t)] * 12 + [(y, u)] * 6
    built = run(opt, model, batches)
    first = opt.kfac_layers[0]
    steps = [s for s, names in enumerate(built) if (first.name, 'A') in names]
    # steady: 0, 1, 3, 7, 11; the jump at 12 is seen at the build at 15,
    # which resets the interval: the next build is 16, then 18 (steady)
    assert steps == [0, 1, 3, 7, 11, 15, 16], steps


def explicit_a(x):
    """A of a Linear with bias: E[[x, 1][x, 1]ᵀ] over the batch."""
    xb = numpy.concatenate([x, numpy.ones((len(x), 1))], axis=1)
    return xb.T @ xb / len(x)


def test_the_change_is_the_relative_frobenius_change_of_the_factor():
    model, opt = setup(max_interval=4, refresh_tolerance=1e9)
    xs = [batch(s) for s in range(3)]
    run(opt, model, xs[:2])        # builds at 0 and 1
    first = opt.kfac_layers[0]
    old, new = explicit_a(xs[0][0]), explicit_a(xs[1][0])
    expected = numpy.linalg.norm(new - old) / numpy.linalg.norm(old)
    assert opt.refresh_rule.changes[(first.name, 'A')] == \
        pytest.approx(expected, rel=1e-12)
    # a change above the tolerance resets the interval
    model2, opt2 = setup(max_interval=4, refresh_tolerance=0.5 * expected)
    run(opt2, model2, xs[:2])
    assert opt2.refresh_rule.interval(opt2.kfac_layers[0], 'A') == 1
    assert opt.refresh_rule.interval(first, 'A') == 2


def test_a_resumed_run_builds_and_steps_as_the_uninterrupted_one(tmp_path):
    batches = [batch(s % 3) for s in range(6)] + [batch(0)] * 10
    model, opt = setup(lr=0.05, max_interval=4, refresh_tolerance=0.3)
    whole = run(opt, model, batches)
    model2, opt2 = setup(lr=0.05, max_interval=4, refresh_tolerance=0.3)
    first = run(opt2, model2, batches[:9])
    path = str(tmp_path / 'snapshot.npz')
    serializers.save_npz(path, opt2)
    serializers.save_npz(str(tmp_path / 'model.npz'), model2)
    model3, opt3 = setup(lr=0.05, max_interval=4, refresh_tolerance=0.3)
    serializers.load_npz(str(tmp_path / 'model.npz'), model3)
    serializers.load_npz(path, opt3)
    rest = run(opt3, model3, batches[9:])
    assert first + rest == whole
    assert opt3.factor_builds == opt.factor_builds
    for (name, p), (_, q) in zip(sorted(model.namedparams()),
                                 sorted(model3.namedparams())):
        numpy.testing.assert_array_equal(p.array, q.array, err_msg=name)
    # the schedule did change: not every factor at every update
    assert sum(len(b) for b in whole) < len(whole) * len(keys_of(opt))


@pytest.mark.parametrize('kwargs, message', [
    (dict(refresh='sometimes'), "refresh"),
    (dict(refresh='adaptive', refresh_tolerance=0), 'refresh_tolerance'),
    (dict(refresh='adaptive', max_interval=0), 'max_interval'),
    (dict(refresh='adaptive', max_interval=2, min_interval=3),
     'max_interval'),
    # checked under refresh='fixed' too
    (dict(min_interval=0), 'min_interval'),
    (dict(refresh_tolerance=-1), 'refresh_tolerance'),
])
def test_bad_options_are_one_line(kwargs, message):
    with pytest.raises(ValueError) as info:
        KFAC(**kwargs)
    assert message in str(info.value)
    assert '\n' not in str(info.value)


def test_fixed_refresh_keeps_the_intervals_of_eq20():
    model = make_model()
    opt = KFAC(lr=0.0, a_interval=2, g_interval=3,
               log_coverage=False).setup(model)
    x, t = batch(0)
    built = run(opt, model, [(x.astype('f'), t)] * 7)
    a = [s for s, names in enumerate(built) if ('/0', 'A') in names]
    g = [s for s, names in enumerate(built) if ('/0', 'G') in names]
    assert a == [0, 2, 4, 6] and g == [0, 3, 6]
    assert isinstance(opt.refresh_rule, refresh_module.FixedRefresh)
    assert opt.factor_builds == 2 * (4 + 3)


def test_the_trainer_extension_logs_the_builds_of_each_epoch(caplog,
                                                             tmp_path):
    model = make_model()
    classifier = L.Classifier(model)
    opt = KFAC(lr=0.0, refresh='adaptive', max_interval=4,
               log_coverage=False).setup(classifier)
    x, t = batch(0, n=8)   # every batch the same: the factors settle
    data = chainer.datasets.TupleDataset(
        numpy.tile(x.astype('f'), (4, 1)), numpy.tile(t, 4))
    it = chainer.iterators.SerialIterator(data, 8, shuffle=False)
    updater = chainer.training.StandardUpdater(it, opt)
    trainer = chainer.training.Trainer(updater, (3, 'epoch'),
                                       out=str(tmp_path))
    builds = FactorBuilds()
    trainer.extend(builds)
    due = []
    original = opt.due_factors

    def counting():
        result = original()
        due.append(sum(len(n) for n in result.values()))
        return result
    opt.due_factors = counting
    with caplog.at_level(logging.INFO, logger='chainerkfac'):
        trainer.run()
    assert [r['epoch'] for r in builds.records] == [1, 2, 3]
    assert [r['updates'] for r in builds.records] == [4, 4, 4]
    assert [r['builds'] for r in builds.records] == \
        [sum(due[0:4]), sum(due[4:8]), sum(due[8:12])]
    assert builds.records[0]['builds'] > builds.records[2]['builds']
    lines = [r.getMessage() for r in caplog.records
             if 'factor builds' in r.getMessage()]
    assert lines[0].startswith('epoch 1: {} factor builds in 4 updates'
                               .format(sum(due[0:4]))), lines


def test_the_mean_interval_is_the_fixed_one_or_the_adaptive_mean():
    model, opt = setup(max_interval=8)
    x, t = batch(0)
    run(opt, model, [(x, t)] * 4)   # built at 0, 1, 3: intervals 4
    assert opt.refresh_rule.mean_interval(opt.kfac_layers) == 4.0
    fixed = KFAC(g_interval=5, a_interval=2, log_coverage=False)
    assert fixed.refresh_rule.mean_interval([]) == 5.0


def test_the_epoch_counts_survive_a_trainer_snapshot(tmp_path):
    """Chainer's autoload runs after the extensions' initialize: the
    counts at the last epoch's end come from the snapshot."""
    def trainer_of(out, epochs):
        model = make_model()
        classifier = L.Classifier(model)
        opt = KFAC(lr=0.0, refresh='adaptive', max_interval=4,
                   log_coverage=False).setup(classifier)
        x, t = batch(0, n=8)
        data = chainer.datasets.TupleDataset(
            numpy.tile(x.astype('f'), (4, 1)), numpy.tile(t, 4))
        it = chainer.iterators.SerialIterator(data, 8, shuffle=False)
        trainer = chainer.training.Trainer(
            chainer.training.StandardUpdater(it, opt), (epochs, 'epoch'),
            out=str(out))
        builds = FactorBuilds()
        trainer.extend(builds)
        trainer.extend(chainer.training.extensions.snapshot(
            filename='snapshot', autoload=True), trigger=(2, 'epoch'))
        return trainer, builds
    whole, builds = trainer_of(tmp_path / 'whole', 3)
    whole.run()
    trainer_of(tmp_path / 'split', 2)[0].run()
    resumed, resumed_builds = trainer_of(tmp_path / 'split', 3)
    resumed.run()
    assert resumed.updater.iteration == 12
    assert resumed_builds.records == builds.records[2:]


def test_what_adaptive_refresh_ignores_or_cannot_load_is_said(caplog,
                                                              tmp_path):
    model, opt = setup(max_interval=4)
    opt.a_interval = 5
    x, t = batch(0)
    with caplog.at_level(logging.INFO, logger='chainerkfac'):
        run(opt, model, [(x, t)] * 2)
    said = [r.getMessage() for r in caplog.records]
    assert sum('a_interval=5' in m and 'not used' in m for m in said) == 1
    # a snapshot of a run with fixed refresh: every factor rebuilt next
    fixed_model = make_model()
    fixed = KFAC(lr=0.0, log_coverage=False).setup(fixed_model)
    run(fixed, fixed_model, [(x.astype('f'), t)] * 3)
    path = str(tmp_path / 'fixed.npz')
    serializers.save_npz(path, fixed)
    model2, opt2 = setup(max_interval=4)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='chainerkfac'):
        serializers.load_npz(path, opt2)
    assert any("refresh='fixed'" in r.getMessage() for r in caplog.records)
    assert all(names == set(layer.factor_names)
               for layer, names in opt2.due_factors().items())
    assert len(opt2.due_factors()) == len(opt2.kfac_layers)
