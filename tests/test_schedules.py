import math

import chainer
import chainer.links as L
import numpy
import pytest
from chainer import training

from chainerkfac import schedules
from chainerkfac.extensions import KFACSchedule


# Table 3 of the paper: (e_start, BS, t_warmup).
TABLE3_WARMUP = [
    (1, 4096, 313),
    (1, 8192, 157),
    (1, 16384, 79),
    (1.5, 32768, 59),
    (2, 65536, 40),
    (3, 131072, 30),
]


@pytest.mark.parametrize('e_start, batch_size, expected', TABLE3_WARMUP)
def test_warmup_iterations_table3(e_start, batch_size, expected):
    assert schedules.warmup_iterations(e_start, batch_size) == expected


def test_warmup_iterations_exact():
    # 0.7 * 10 == 7.000000000000001 in floating point.
    assert schedules.warmup_iterations(0.7, 1, 10) == 7
    assert schedules.warmup_iterations(3, 1281167) == 3
    assert schedules.warmup_iterations(1, 10, 101) == 11
    assert isinstance(schedules.warmup_iterations(1, 4096), int)


def test_epoch():
    assert schedules.epoch(10, 4, 8) == 5
    assert schedules.epoch(3, 2, 4) == 1.5


@pytest.mark.parametrize('damping, target, t_warmup', [
    (2.5e-2, 2.5e-4, 313),
    (2.0e-2, 2.0e-4, 59),
    (1.0e-2, 1.0e-4, 30),
    (1.0, 0.5, 7),
])
def test_warmup_damping_recursion(damping, target, t_warmup):
    alpha = 2 * math.log10(damping / target) / t_warmup
    assert schedules.warmup_damping_alpha(damping, target, t_warmup) == \
        pytest.approx(alpha, rel=1e-15)
    checks = {0, 1, 2, 10, t_warmup // 2, t_warmup, 3 * t_warmup}
    gamma = damping
    for t in range(3 * t_warmup + 1):
        if t in checks:
            assert schedules.warmup_damping(t, damping, target, t_warmup) == \
                pytest.approx(gamma, rel=1e-12)
        gamma = (1 - alpha) * gamma + alpha * target


def test_warmup_damping_monotone_to_target():
    damping, target, t_warmup = 2.5e-2, 2.5e-4, 313
    gammas = [schedules.warmup_damping(t, damping, target, t_warmup)
              for t in range(5 * t_warmup)]
    assert gammas[0] == damping
    assert all(a > b for a, b in zip(gammas, gammas[1:]))
    assert all(g > target for g in gammas)
    assert schedules.warmup_damping(20 * t_warmup, damping, target,
                                    t_warmup) == pytest.approx(target)


def test_warmup_damping_constant():
    assert schedules.warmup_damping(5, 1e-3, 1e-3, 10) == 1e-3


@pytest.mark.parametrize('damping, target, t_warmup, name', [
    (0, 1e-4, 10, 'damping'),
    (-1e-2, 1e-4, 10, 'damping'),
    (1e-2, 0, 10, 'damping_target'),
    (1e-2, 1e-4, 0, 't_warmup'),
    (1e-4, 1e-2, 10, 'damping_target'),
])
def test_warmup_damping_invalid(damping, target, t_warmup, name):
    with pytest.raises(ValueError, match=name):
        schedules.warmup_damping_alpha(damping, target, t_warmup)
    with pytest.raises(ValueError, match=name):
        schedules.warmup_damping(1, damping, target, t_warmup)


def test_warmup_iterations_invalid():
    with pytest.raises(ValueError, match='batch_size'):
        schedules.warmup_iterations(1, 0)


def test_polynomial_lr():
    lr, e_start, e_end, p = 8.18e-3, 1, 53, 11.0
    args = lr, e_start, e_end, p
    assert schedules.polynomial_lr(0, *args) == lr
    assert schedules.polynomial_lr(0.5, *args) == lr
    assert schedules.polynomial_lr(1, *args) == lr
    assert schedules.polynomial_lr(27, *args) == \
        pytest.approx(lr * 0.5 ** 11, rel=1e-12)
    assert schedules.polynomial_lr(14, *args) == \
        pytest.approx(lr * 0.75 ** 11, rel=1e-12)
    assert schedules.polynomial_lr(53, *args) == 0
    assert schedules.polynomial_lr(60, *args) == 0


def test_momentum_ratio_constant():
    lr, m0, e_start, e_end, p = 1.25e-2, 0.993, 1, 53.5, 8.0
    for e in [0, 0.5, 1, 2.3, 10, 27.25, 53.4]:
        m = schedules.momentum(e, lr, m0, e_start, e_end, p)
        eta = schedules.polynomial_lr(e, lr, e_start, e_end, p)
        assert m / eta == pytest.approx(m0 / lr, rel=1e-12)
    assert schedules.momentum(0, lr, m0, e_start, e_end, p) == m0
    assert schedules.momentum(53.5, lr, m0, e_start, e_end, p) == 0


@pytest.mark.parametrize('iteration, e, expected', [
    (0, 0, 1),
    (499, 30, 1),
    (500, 0, 1),
    (500, 4.99, 1),
    (500, 5, 6),
    (600, 9.9, 6),
    (700, 10, 11),
    (800, 15, 16),
    (900, 19.99, 16),
    (1000, 20, 20),
    (5000, 100, 20),
])
def test_stale_interval_eq20(iteration, e, expected):
    assert schedules.stale_interval_eq20(iteration, e) == expected
    assert schedules.stale_interval('eq20', iteration, e) == expected


@pytest.mark.parametrize('e, expected', [
    (0, 1), (12.999, 1), (13, 20), (50, 20)])
def test_stale_interval_eq21(e, expected):
    assert schedules.stale_interval_eq21(e) == expected
    assert schedules.stale_interval('eq21', 1000, e) == expected


def test_stale_interval_none_and_invalid():
    assert schedules.stale_interval('none', 10000, 50) == 1
    with pytest.raises(ValueError, match='eq22'):
        schedules.stale_interval('eq22', 0, 0)


NAMES = 'lr', 'momentum', 'damping', 'a_interval', 'g_interval'


class RecordingSGD(chainer.optimizers.MomentumSGD):

    def __init__(self):
        super(RecordingSGD, self).__init__()
        self.damping = None
        self.a_interval = None
        self.g_interval = None
        self.seen = []

    def update(self, lossfun=None, *args, **kwds):
        self.seen.append(
            (self.t, {name: getattr(self, name) for name in NAMES}))
        super(RecordingSGD, self).update(lossfun, *args, **kwds)


def _run(tmp_path, schedule, n_iter, start=0):
    x = numpy.random.RandomState(0).randn(8, 3).astype(numpy.float32)
    t = numpy.arange(8, dtype=numpy.int32) % 2
    model = L.Classifier(L.Linear(3, 2))
    optimizer = RecordingSGD()
    optimizer.setup(model)
    optimizer.t = start
    iterator = chainer.iterators.SerialIterator(
        chainer.datasets.TupleDataset(x, t), 2)
    updater = training.updaters.StandardUpdater(iterator, optimizer)
    updater.iteration = start
    trainer = training.Trainer(
        updater, (n_iter, 'iteration'), out=str(tmp_path))
    trainer.extend(schedule)
    trainer.run()
    return optimizer.seen


def _schedule():
    # batch_size / n_train = 2 epochs per iteration: eq. 21 switches at e=14.
    return KFACSchedule(
        lr=0.1, momentum=0.9, damping=1e-2, damping_target=1e-4, e_start=2,
        e_end=20, p_decay=2.0, batch_size=8, n_train=4, t_warmup=5,
        stale='eq21', a_interval_factor=2)


def test_kfac_schedule_values():
    schedule = _schedule()
    v = schedule.values(0)
    assert v == {'lr': 0.1, 'momentum': 0.9, 'damping': 1e-2,
                 'a_interval': 2, 'g_interval': 1, 'epoch': 0}
    v = schedule.values(6)  # e = 12
    assert v['epoch'] == 12
    assert v['lr'] == pytest.approx(0.1 * (1 - 10 / 18) ** 2, rel=1e-12)
    assert v['momentum'] == pytest.approx(0.9 * (1 - 10 / 18) ** 2,
                                          rel=1e-12)
    assert (v['a_interval'], v['g_interval']) == (2, 1)
    v = schedule.values(7)  # e = 14
    assert (v['a_interval'], v['g_interval']) == (40, 20)
    assert schedule.values(10)['lr'] == 0


def test_kfac_schedule_default_warmup():
    schedule = KFACSchedule(
        lr=8.18e-3, momentum=0.997, damping=2.5e-2, damping_target=2.5e-4,
        e_start=1, e_end=53, p_decay=11.0, batch_size=4096)
    alpha = 2 * math.log10(100) / 313
    assert schedule.values(1)['damping'] == \
        pytest.approx(2.5e-2 * (1 - alpha) + alpha * 2.5e-4, rel=1e-12)


def test_kfac_schedule_invalid():
    with pytest.raises(ValueError, match='eq22'):
        KFACSchedule(0.1, 0.9, 1e-2, 1e-4, 1, 10, 2.0, 8, 40, stale='eq22')
    with pytest.raises(ValueError, match='warmup is too short'):
        KFACSchedule(0.1, 0.9, 1e-2, 1e-4, 1, 10, 2.0, 8, 4)
    with pytest.raises(ValueError, match='damping_target'):
        KFACSchedule(0.1, 0.9, 1e-4, 1e-2, 1, 10, 2.0, 8, 4)


def test_kfac_schedule_trainer(tmp_path):
    schedule = _schedule()
    seen = _run(tmp_path, schedule, 9)
    assert [it for it, _ in seen] == list(range(9))
    for iteration, attrs in seen:
        expected = schedule.values(iteration)
        del expected['epoch']
        assert attrs == expected
    assert seen[7][1]['g_interval'] == 20
    assert seen[2][1]['lr'] < seen[1][1]['lr'] == 0.1


def test_kfac_schedule_trainer_resume(tmp_path):
    schedule = _schedule()
    seen = _run(tmp_path, schedule, 7, start=4)
    assert [it for it, _ in seen] == [4, 5, 6]
    for iteration, attrs in seen:
        expected = schedule.values(iteration)
        del expected['epoch']
        assert attrs == expected
