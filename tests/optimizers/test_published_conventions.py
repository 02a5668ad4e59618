"""The conventions of the authors' published code (github
tyohei/chainerkfac) as options, against hand-computed updates of that
code's rules: its momentum scaled by η(t)/η(t−1) when η decreases
(``momentum_schedule='lr_ratio'``), its weight rescaling that only shrinks
and that the momentum excludes (``weight_rescaling_variant='published'``).
"""

import math

import numpy
import pytest

import chainer
from chainer import optimizer as optimizer_module

from chainerkfac import config as config_module
from chainerkfac.extensions import KFACSchedule
from chainerkfac.optimizers import kfac as kfac_module

LRS = (0.1, 0.1, 0.05, 0.05, 0.02, 0.03)


def published_updates(w, grads, lrs, momentum, rescale):
    """The published code's update: v ← m'·v − η·g, w ← w + v, with
    m' = m·η/η_prev when η < η_prev; then, with ``rescale``, w ← w·s when
    s = sqrt(2·d_out)/(‖w‖ + 1e-9) < 1 (v unchanged)."""
    w, v, lr_prev, out = w.copy(), numpy.zeros_like(w), None, []
    for g, lr in zip(grads, lrs):
        m = momentum * lr / lr_prev if lr_prev and lr < lr_prev \
            else momentum
        v = m * v - lr * g
        w = w + v
        if rescale:
            s = math.sqrt(2.0 * w.shape[0]) / (numpy.linalg.norm(w) + 1e-9)
            if s < 1:
                w = w * s
        out.append(w.copy())
        lr_prev = lr
    return out


def rule_updates(w, grads, lrs, momentum, rescale, **options):
    """The same updates by :class:`KFACRule` under the optimizer's
    hyperparameters (``lr_prev`` set after each update, as KFAC does)."""
    hp = optimizer_module.Hyperparameter(kfac_module._default_hyperparam)
    hp.momentum, hp.weight_rescaling = momentum, rescale
    for key, value in options.items():
        setattr(hp, key, value)
    rule = kfac_module.KFACRule(hp, rescale=True)
    param = chainer.Parameter(w.copy())
    out = []
    for g, lr in zip(grads, lrs):
        hp.lr = lr
        param.grad = g.copy()
        rule.update(param)
        hp.lr_prev = lr
        out.append(param.array.copy())
    return out


def case(seed, scale):
    rng = numpy.random.RandomState(seed)
    w = rng.randn(4, 3) * scale
    grads = [rng.randn(4, 3) for _ in LRS]
    return w, grads


@pytest.mark.parametrize('rescale', [False, True])
def test_lr_ratio_momentum_and_published_rescaling_are_the_published_rule(
        rescale):
    w, grads = case(0, 2.0)  # ‖w‖ > sqrt(2·4): the rescaling shrinks
    expected = published_updates(w, grads, LRS, 0.9, rescale)
    got = rule_updates(w, grads, LRS, 0.9, rescale,
                       momentum_schedule='lr_ratio',
                       weight_rescaling_variant='published')
    for k, (a, b) in enumerate(zip(got, expected)):
        numpy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14,
                                      err_msg='update {}'.format(k))


def test_published_rescaling_never_grows_the_weight():
    w, grads = case(1, 0.01)  # ‖w‖ far below sqrt(2·4)
    grads = [g * 1e-3 for g in grads]
    got = rule_updates(w, grads, LRS, 0.9, True,
                       momentum_schedule='lr_ratio',
                       weight_rescaling_variant='published')
    paper = rule_updates(w, grads, LRS, 0.9, True)
    assert all(numpy.linalg.norm(x) < 1.0 for x in got)
    for x in paper:  # eq. 18 as the paper writes it: to sqrt(2·d_out)
        assert numpy.linalg.norm(x) == pytest.approx(math.sqrt(8), 1e-6)


def test_eq16_is_the_default_and_ignores_the_lr_ratio():
    w, grads = case(2, 1.0)
    plain = rule_updates(w, grads, LRS, 0.9, False)
    expected = published_updates(w, grads, (0.1,) * len(LRS), 0.9, False)
    # with η constant the two rules agree; eq16 never scales m by the ratio
    assert not numpy.allclose(plain[-1], published_updates(
        w, grads, LRS, 0.9, False)[-1])
    numpy.testing.assert_allclose(
        rule_updates(w, grads, (0.1,) * len(LRS), 0.9, False)[-1],
        expected[-1], rtol=1e-12)


def test_bad_choices_are_one_line_errors():
    with pytest.raises(ValueError, match='momentum_schedule must be one of'):
        kfac_module.KFAC(momentum_schedule='eq15')
    with pytest.raises(ValueError,
                       match='weight_rescaling_variant must be one of'):
        kfac_module.KFAC(weight_rescaling_variant='always')


def test_published_config_keeps_m0_and_a_constant_damping():
    cfg = config_module.load_config('bs32k_published.yaml')
    o = cfg.optimizer
    assert (o.momentum_schedule, o.weight_rescaling_variant, o.bn_fisher,
            o.stale) == ('lr_ratio', 'published', 'full', 'none')
    schedule = KFACSchedule.from_config(cfg, 1281167)
    paper = KFACSchedule.from_config(config_module.load_config(
        'bs32k.yaml'), 1281167)
    for iteration in (0, 50, 500, 1500):
        values = schedule.values(iteration)
        assert values['momentum'] == o.momentum
        assert values['damping'] == o.damping == o.damping_target
        assert values['lr'] == paper.values(iteration)['lr']
    assert paper.values(1500)['momentum'] < o.momentum


def test_kfac_keeps_the_previous_lr_across_updates_and_snapshots():
    """Through KFAC itself (raw gradients, set by hand): lr_prev follows
    the updates and survives a save and load."""
    import io
    from chainer import serializers
    import chainer.links as L
    w, grads = case(3, 1.0)
    expected = published_updates(w, grads, LRS, 0.9, False)

    def fresh():
        with chainer.using_config('dtype', numpy.float64):
            link = L.Linear(3, 4, nobias=True)
        link.W.array[...] = w
        return link, kfac_module.KFAC(
            momentum=0.9, momentum_schedule='lr_ratio', skip_layers='Linear',
            log_coverage=False).setup(link)
    link, opt = fresh()
    for k, (g, lr) in enumerate(zip(grads, LRS)):
        if k == 3:  # resume from a snapshot of the optimizer and weights
            saved = io.BytesIO()
            serializers.save_npz(saved, opt)
            weights = link.W.array.copy()
            link, opt = fresh()
            link.W.array[...] = weights
            saved.seek(0)
            serializers.load_npz(saved, opt)
        opt.lr = lr
        link.W.grad = g.copy()
        opt.update()
        numpy.testing.assert_allclose(link.W.array, expected[k], rtol=1e-12,
                                      err_msg='update {}'.format(k))
