"""Loss scaling and Chainer's mixed16 mode with K-FAC."""

import json
import os
import subprocess
import sys

import numpy
import pytest

import tests

import chainer
import chainer.functions as F

from chainerkfac.optimizers import KFAC

from tests import nets

from tests.mpi import mpi_env

ROOT = tests.ROOT


def Net():
    return nets.ConvBNLinear(2, 4, 5, 3)


def trajectory(dtype=numpy.float64, loss_scale=None, mixed16=False,
               accumulation_steps=1, updates=3):
    """Weights (float64 on the CPU) after ``updates`` K-FAC updates."""
    mode = chainer.mixed16 if mixed16 else dtype
    with chainer.using_config('dtype', mode):
        numpy.random.seed(0)
        model = Net()
        with chainer.no_backprop_mode():
            model(numpy.zeros((1, 2, 5, 5), chainer.get_dtype()))
        if not mixed16:
            for p in model.params():
                p.array = p.array.astype(dtype)
        opt = KFAC(lr=0.05, damping=1e-2, bn_fisher='full',
                   accumulation_steps=accumulation_steps)
        if mixed16:
            opt.use_fp32_update()
        if loss_scale is not None:
            opt.loss_scaling(scale=loss_scale)
        opt.setup(model)
        rng = numpy.random.RandomState(1)

        def lossfun(x, t):
            return F.softmax_cross_entropy(model(x), t)
        for _ in range(updates * accumulation_steps):
            x = rng.randn(6, 2, 5, 5).astype(chainer.get_dtype())
            t = rng.randint(0, 3, 6).astype(numpy.int32)
            opt.update(lossfun, x, t)
        return opt, {n: p.array.astype(numpy.float64)
                     for n, p in model.namedparams()}


@pytest.mark.parametrize('accumulation_steps', [1, 2])
def test_static_loss_scale_changes_nothing(accumulation_steps):
    _, plain = trajectory(accumulation_steps=accumulation_steps)
    _, scaled = trajectory(loss_scale=1024.0,
                           accumulation_steps=accumulation_steps)
    for name in plain:
        numpy.testing.assert_allclose(scaled[name], plain[name], rtol=1e-13,
                                      atol=1e-15, err_msg=name)


def test_mixed16_follows_float32():
    """float16 weights and activations, float32 master weights and BN: the
    trajectory stays within float16 noise of float32 (which K-FAC amplifies
    along the small eigenvalues of the 6-sample factors: up to ~15% of the
    step for the FC layer, ~5% elsewhere), and the loss scale changes only
    rounding."""
    _, reference = trajectory(numpy.float32)
    opt, mixed = trajectory(mixed16=True, loss_scale=256.0)
    _, unscaled = trajectory(mixed16=True)
    assert opt.target.conv.W.dtype == numpy.float16
    assert opt.target.bn.gamma.dtype == numpy.float32
    numpy.random.seed(0)
    initial = {n: p.array.astype(numpy.float64)
               for n, p in Net().namedparams()}
    for name in reference:
        step = numpy.abs(reference[name] - initial[name]).max()
        error = numpy.abs(mixed[name] - reference[name]).max()
        assert error <= 0.25 * step, (name, error, step)
        scale_effect = numpy.abs(mixed[name] - unscaled[name]).max()
        assert scale_effect <= 0.02 * step, (name, scale_effect, step)


@pytest.mark.slow
def test_trainer_mixed16_job(tmp_path):
    env = mpi_env()
    subprocess.check_call(
        [sys.executable, os.path.join(ROOT, 'scripts',
                                      'make_synthetic_imagenet.py'),
         'data/synthetic', '--classes', '4', '--per-class', '16',
         '--size', '40'], cwd=str(tmp_path), env=env)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'train_imagenet.py'),
         '--config', 'synthetic.yaml', '--out', 'result', '--set',
         'train.dtype=mixed16', 'train.epochs=2', 'train.log_interval=1',
         'train.device=cpu'],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'dtype: mixed16 (loss scale 256)' in proc.stdout
    log = json.loads((tmp_path / 'result' / 'log').read_text())
    assert log[-1]['epoch'] == 2
    assert all(numpy.isfinite(entry['main/loss']) for entry in log)
    with numpy.load(str(tmp_path / 'result' / 'snapshot_iter_8' /
                        'rank_0.npz'), allow_pickle=False) as npz:
        w = npz['updater/model:main/predictor/conv1/W']
        assert w.dtype == numpy.float16
