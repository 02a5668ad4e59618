"""Batched Cholesky with one host check, the two inverse methods, damping
without host values, and the non-finite checks."""

import math

import numpy
import pytest

import chainer.functions as F

from chainerkfac import damping
from chainerkfac import finite
from chainerkfac import inverse
from chainerkfac.optimizers import KFAC

from tests import nets


def spd(n, seed, dtype=numpy.float64):
    rng = numpy.random.RandomState(seed)
    x = rng.randn(n, n + 3)
    return (x.dot(x.T) / n).astype(dtype)


def test_cholesky_many_one_check_for_all_blocks(monkeypatch):
    calls = []
    to_host = inverse._to_host
    monkeypatch.setattr(inverse, '_to_host',
                        lambda a: calls.append(a.shape) or to_host(a))
    mats = [spd(n, n) for n in (3, 7, 20)]
    out = inverse.cholesky_many([(m, 0.5) for m in mats])
    assert calls == [(3,)]  # one transfer of 3 flags
    for m, c in zip(mats, out):
        numpy.testing.assert_allclose(
            c, numpy.linalg.cholesky(m + 0.5 * numpy.eye(len(m))),
            rtol=1e-12)


def test_cholesky_many_retries_only_the_failed_block(monkeypatch):
    factorized = []
    potrf = inverse.potrf
    monkeypatch.setattr(inverse, 'potrf',
                        lambda m: factorized.append(m.shape[0]) or potrf(m))
    bad = numpy.diag([1.0, -2.0, 3.0])
    good = spd(5, 1)
    inverse._warned[0] = False
    with pytest.warns(RuntimeWarning, match='not positive definite'):
        c_good, c_bad = inverse.cholesky_many([(good, 0.1), (bad, 0.1)])
    assert factorized[:2] == [5, 3] and set(factorized[2:]) == {3}
    assert len(factorized) == 2 + 2  # 0.1 -> 1 -> 10: two retries
    numpy.testing.assert_allclose(c_bad.dot(c_bad.T), bad + 10 * numpy.eye(3),
                                  rtol=1e-12)
    numpy.testing.assert_allclose(
        c_good, numpy.linalg.cholesky(good + 0.1 * numpy.eye(5)), rtol=1e-12)


def test_potrf_reports_the_failing_minor():
    _, info = inverse.potrf(numpy.diag([1.0, 2.0, -1.0, 4.0]))
    assert int(info) == 3
    _, info = inverse.potrf(spd(4, 0))
    assert int(info) == 0


def test_cholesky_accepts_a_0d_array_damping():
    m = spd(4, 2)
    c = inverse.cholesky(m, numpy.asarray(0.25))
    numpy.testing.assert_allclose(c.dot(c.T), m + 0.25 * numpy.eye(4),
                                  rtol=1e-12)


def test_cholesky_inverse_and_apply_methods_agree():
    m = spd(6, 3)
    c = inverse.cholesky(m)
    explicit = inverse.cholesky_inverse(c)
    numpy.testing.assert_allclose(explicit, numpy.linalg.inv(m), rtol=1e-10)
    b = numpy.random.RandomState(0).randn(6, 4)
    numpy.testing.assert_allclose(
        inverse.apply(c, b, 'solve'), numpy.linalg.solve(m, b), rtol=1e-10)
    numpy.testing.assert_allclose(
        inverse.apply(c, b, 'explicit', explicit), numpy.linalg.solve(m, b),
        rtol=1e-10)


def test_resolve_method():
    assert inverse.resolve_method('auto', numpy) == 'solve'
    assert inverse.resolve_method('explicit', numpy) == 'explicit'
    with pytest.raises(ValueError, match='inverse_method'):
        inverse.resolve_method('lu', numpy)
    with pytest.raises(ValueError, match='inverse_method'):
        KFAC(inverse_method='lu')


def test_pi_is_an_array_equal_to_the_formula():
    A, G = spd(5, 4), spd(3, 5) * 7
    p = damping.pi(A, G)
    assert isinstance(p, numpy.ndarray) and p.shape == ()
    expected = math.sqrt((numpy.trace(A) / 5) / (numpy.trace(G) / 3))
    assert float(p) == pytest.approx(expected, rel=1e-14)
    assert float(damping.pi(A, numpy.zeros((3, 3)))) == 1.0
    assert float(damping.pi(A * numpy.nan, G)) == 1.0
    a, g = damping.kronecker_damping(A, G, 0.04)
    assert float(a) == pytest.approx(expected * 0.2)
    assert float(g) == pytest.approx(0.2 / expected)


def Net():
    return nets.ConvBNLinear(2, 3, 5, 4)


def trajectory(method, bn_fisher, intervals=1):
    numpy.random.seed(0)
    model = Net()
    model.to_device('@numpy')
    for p in model.params():
        p.array = p.array.astype(numpy.float64)
    opt = KFAC(lr=0.1, damping=1e-2, bn_fisher=bn_fisher,
               inverse_method=method, a_interval=intervals,
               g_interval=intervals).setup(model)
    rng = numpy.random.RandomState(1)

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)
    for _ in range(4):
        x = rng.randn(6, 2, 5, 5)
        t = rng.randint(0, 4, 6).astype(numpy.int32)
        opt.update(lossfun, x, t)
    return {n: p.array for n, p in model.namedparams()}


@pytest.mark.parametrize('bn_fisher', ['diagonal', 'full'])
@pytest.mark.parametrize('intervals', [1, 2])
def test_explicit_inverse_method_equals_triangular_solves(bn_fisher,
                                                          intervals):
    solve = trajectory('solve', bn_fisher, intervals)
    explicit = trajectory('explicit', bn_fisher, intervals)
    for name in solve:
        numpy.testing.assert_allclose(explicit[name], solve[name],
                                      rtol=1e-9, atol=1e-12, err_msg=name)


def test_loss_check_on_numpy_raises_at_once():
    check = finite.LossCheck()
    check.record(numpy.float32(1.5), 0)
    with pytest.raises(FloatingPointError, match='non-finite loss inf at '
                                                 'update 7'):
        check.record(numpy.array(numpy.inf, numpy.float32), 7)
    check.check()  # nothing pending on NumPy


def test_first_non_finite_names_the_array():
    arrays = [('a', numpy.ones(3)), ('b', None), ('c', numpy.array(2.0)),
              ('d', numpy.array([1.0, numpy.nan])), ('e', numpy.ones(2))]
    assert finite.first_non_finite(arrays) == 'd'
    assert finite.first_non_finite(arrays[:3]) is None
    assert finite.all_finite([numpy.float32(1), 2.0])
    assert not finite.all_finite([numpy.float64('nan')])
