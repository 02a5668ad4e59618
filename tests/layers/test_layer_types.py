"""The layer types real models use, each against an independent reference
(float64, 1e-10): grouped, dilated (both links) and transposed
convolutions, embeddings, and BatchNormalization without γ or β.

Every reference is written here or in tests/reference.py with explicit
loops over samples and positions (no code of the package): the factors from
the layer's recorded input and Chainer's output gradients (times n: the
per-sample gradients of a mean loss in a model without BN across samples),
and the direction of one step (lr 1, momentum 0) by an explicit Kronecker
solve of the π-damped factors.  The distributed runs of these links are in
tests/mpi/own_model_worker.py (``layer_types``).
"""

import math

import numpy
import pytest

import chainer
import chainer.functions as F
import chainer.links as L

from chainerkfac.optimizers import KFAC

from tests import reference

GAMMA = 1e-2
TOL = dict(rtol=1e-10, atol=1e-13)


def float64(factory):
    numpy.random.seed(0)
    with chainer.using_config('dtype', numpy.float64):
        return factory()


class One(chainer.Chain):
    """``link`` between an input and a Linear head (loss over 3 classes)."""

    def __init__(self, link, features):
        super(One, self).__init__()
        with self.init_scope():
            self.link = link
            self.head = L.Linear(features, 3)

    def forward(self, x, tape=None):
        h = reference.run(tape, self.link, x)
        return self.head(F.tanh(F.reshape(h, (h.shape[0], -1))))


def record(model, x, t):
    """(input of model.link, per-sample output gradients, raw gradient of
    the link's W)."""
    tape = reference.Tape()
    loss = F.softmax_cross_entropy(model.forward(x, tape=tape), t)
    model.cleargrads()
    loss.backward(retain_grad=True)
    (_, xin, out), = [r for r in tape.records if r[0] is model.link]
    n = x.shape[0]
    grad = model.link.W.grad.copy()
    model.cleargrads()
    return xin, n * numpy.array(out.grad, dtype=numpy.float64), grad


def step(model, x, t, **kwargs):
    """The K-FAC direction of one step (lr 1, momentum 0) and the layer."""
    opt = KFAC(lr=1.0, momentum=0.0, damping=GAMMA, **kwargs).setup(model)
    w0 = model.link.W.array.copy()
    opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    layer = [layer for layer in opt.kfac_layers if layer.name == '/link'][0]
    return w0 - model.link.W.array, layer


def rng_batch(shape, n=3, seed=1):
    rng = numpy.random.RandomState(seed)
    return rng.randn(n, *shape), rng.randint(0, 3, n).astype(numpy.int32)


def dilated_patches(x, k, stride, pad, dilate):
    """(T, C·k·k) patches of one sample x (C, H, W) at the dilated taps."""
    C, H, W = x.shape
    xp = numpy.zeros((C, H + 2 * pad, W + 2 * pad))
    xp[:, pad:pad + H, pad:pad + W] = x
    span = dilate * (k - 1) + 1
    oh = (H + 2 * pad - span) // stride + 1
    ow = (W + 2 * pad - span) // stride + 1
    rows = []
    for oy in range(oh):
        for ox in range(ow):
            patch = numpy.empty((C, k, k))
            for u in range(k):
                for v in range(k):
                    patch[:, u, v] = xp[:, oy * stride + u * dilate,
                                        ox * stride + v * dilate]
            rows.append(patch.reshape(-1))
    return numpy.array(rows), oh, ow


def conv_factors(xs, gs, k, stride, pad, dilate, bias):
    n = xs.shape[0]
    A, G, T = 0, 0, None
    for i in range(n):
        P, oh, ow = dilated_patches(xs[i], k, stride, pad, dilate)
        T = oh * ow
        for t in range(T):
            a = numpy.concatenate([P[t], [1.0]]) if bias else P[t]
            g = gs[i, :, t // ow, t % ow]
            A = A + numpy.outer(a, a)
            G = G + numpy.outer(g, g)
    return A / n, G / (n * T)


def kron_step(grad, A, G):
    A_bar, G_bar = reference.damp_kfac(A, G, GAMMA)
    return reference.kron_direction(grad, A_bar, G_bar)


# -- dilated convolutions ---------------------------------------------------

@pytest.mark.parametrize('make,size', [
    (lambda: L.Convolution2D(2, 3, 3, stride=2, pad=2, dilate=2), 7),
    (lambda: L.DilatedConvolution2D(2, 3, 3, stride=1, pad=1, dilate=2), 6),
], ids=['Convolution2D', 'DilatedConvolution2D'])
def test_dilated_convolution(make, size):
    model = float64(lambda: One(make(), 3 * 16))  # 4 x 4 outputs
    link = model.link
    stride, pad = link.stride[0], link.pad[0]
    dilate = link.dilate[0] if isinstance(link.dilate, tuple) else link.dilate
    x, t = rng_batch((2, size, size))
    xin, gs, _ = record(model, x, t)
    A, G = conv_factors(xin, gs, 3, stride, pad, dilate, True)
    grad = numpy.concatenate([_raw(model, x, t),
                              _raw_b(model, x, t)[:, None]], axis=1)
    direction, layer = step(model, x, t)
    numpy.testing.assert_allclose(layer.factor('A'), A, **TOL)
    numpy.testing.assert_allclose(layer.factor('G'), G, **TOL)
    numpy.testing.assert_allclose(direction.reshape(3, -1),
                                  kron_step(grad, A, G)[:, :-1], **TOL)


def _raw(model, x, t):
    model.cleargrads()
    F.softmax_cross_entropy(model(x), t).backward()
    return model.link.W.grad.reshape(model.link.W.shape[0], -1).copy()


def _raw_b(model, x, t):
    model.cleargrads()
    F.softmax_cross_entropy(model(x), t).backward()
    return model.link.b.grad.copy()


# -- grouped convolution ----------------------------------------------------

def test_grouped_convolution_is_one_block_per_group():
    model = float64(lambda: One(L.Convolution2D(4, 6, 3, pad=1, groups=2),
                                6 * 16))
    x, t = rng_batch((4, 4, 4))
    xin, gs, _ = record(model, x, t)
    w_raw, b_raw = _raw(model, x, t), _raw_b(model, x, t)
    direction, layer = step(model, x, t)
    expected = []
    for j in range(2):
        A, G = conv_factors(xin[:, 2 * j:2 * j + 2], gs[:, 3 * j:3 * j + 3],
                            3, 1, 1, 1, True)
        numpy.testing.assert_allclose(layer.factor('A{}'.format(j)), A,
                                      **TOL)
        numpy.testing.assert_allclose(layer.factor('G{}'.format(j)), G,
                                      **TOL)
        grad = numpy.concatenate([w_raw[3 * j:3 * j + 3],
                                  b_raw[3 * j:3 * j + 3, None]], axis=1)
        expected.append(kron_step(grad, A, G)[:, :-1])
    numpy.testing.assert_allclose(direction.reshape(6, -1),
                                  numpy.concatenate(expected), **TOL)


# -- transposed convolution -------------------------------------------------

def deconv_patches(gy, k, stride, pad, in_h, in_w):
    """c_{t} for every input position t of one sample: the output-gradient
    entries that input position reaches, as (out, k, k) flattened."""
    O, oh, ow = gy.shape
    out = []
    for p in range(in_h):
        for q in range(in_w):
            c = numpy.zeros((O, k, k))
            for u in range(k):
                for v in range(k):
                    y, z = p * stride - pad + u, q * stride - pad + v
                    if 0 <= y < oh and 0 <= z < ow:
                        c[:, u, v] = gy[:, y, z]
            out.append(c.reshape(-1))
    return numpy.array(out)


def test_deconvolution():
    model = float64(lambda: One(L.Deconvolution2D(3, 2, 3, stride=2, pad=1),
                                2 * 7 * 7))
    x, t = rng_batch((3, 4, 4))
    # an input that needs its gradient: Chainer 7.8.1's Deconvolution2D
    # backward fails when only W's gradient is asked for
    x = chainer.Variable(x)
    xin, gs, w_grad = record(model, x, t)
    n = x.shape[0]
    A, G, grad = 0, 0, 0
    for i in range(n):
        C = deconv_patches(gs[i], 3, 2, 1, 4, 4)
        X = xin[i].reshape(3, -1).T  # (T, in)
        for xt, ct in zip(X, C):
            A = A + numpy.outer(xt, xt)
            G = G + numpy.outer(ct, ct)
            grad = grad + numpy.outer(xt, ct) / n
    A, G = A / n, G / (n * 16)
    # the patches are right: Σ_t x cᵀ is Chainer's gradient of W
    numpy.testing.assert_allclose(grad, w_grad.reshape(3, -1), **TOL)
    direction, layer = step(model, x, t)
    numpy.testing.assert_allclose(layer.factor('A'), A, **TOL)
    numpy.testing.assert_allclose(layer.factor('G'), G, **TOL)
    # 𝒢 = Ā⁻¹ ∇M Ḡ⁻¹: M's rows are the input side
    expected = kron_step(grad.T, A, G).T
    numpy.testing.assert_allclose(direction.reshape(3, -1), expected, **TOL)
    assert [p.name for p in layer.params] == ['W']  # b: raw gradient


# -- embeddings -------------------------------------------------------------

class Embed(chainer.Chain):
    def __init__(self):
        super(Embed, self).__init__()
        with self.init_scope():
            self.link = L.EmbedID(7, 4, ignore_label=-1)
            self.head = L.Linear(4 * 5, 3)

    def forward(self, x, tape=None):
        h = reference.run(tape, self.link, x)
        return self.head(F.tanh(h))


def test_embed_id_has_a_diagonal_input_factor():
    model = float64(Embed)
    rng = numpy.random.RandomState(2)
    ids = rng.randint(-1, 6, (4, 5)).astype(numpy.int32)  # 7th word unused
    t = rng.randint(0, 3, 4).astype(numpy.int32)
    xin, gs, w_grad = record(model, ids, t)
    n, T = ids.shape
    A = numpy.zeros(7)
    G = 0
    for i in range(n):
        for k in range(T):
            if ids[i, k] == -1:
                continue
            A[ids[i, k]] += 1
            G = G + numpy.outer(gs[i, k], gs[i, k])
    A, G = A / n, G / (n * T)
    direction, layer = step(model, ids, t)
    numpy.testing.assert_allclose(layer.factor('A'), A, **TOL)
    numpy.testing.assert_allclose(layer.factor('G'), G, **TOL)
    pi = math.sqrt((A.sum() / 7) / (numpy.trace(G) / 4))
    A_bar = numpy.diag(A + pi * math.sqrt(GAMMA))
    G_bar = G + math.sqrt(GAMMA) / pi * numpy.eye(4)
    expected = reference.kron_direction(w_grad.T, A_bar, G_bar).T
    numpy.testing.assert_allclose(direction, expected, **TOL)
    assert numpy.all(direction[6] == 0)  # an absent word keeps its row


# -- BatchNormalization without gamma or beta -------------------------------

@pytest.mark.parametrize('use_gamma,use_beta', [(False, True), (True, False)])
@pytest.mark.parametrize('bn_fisher', ['full', 'diagonal'])
def test_batch_normalization_with_one_parameter(use_gamma, use_beta,
                                                bn_fisher):
    model = float64(lambda: One(L.BatchNormalization(
        3, use_gamma=use_gamma, use_beta=use_beta), 3 * 4))
    link = model.link
    param = link.gamma if use_gamma else link.beta
    x, t = rng_batch((3, 2, 2), n=5)
    tape = reference.Tape()
    loss = F.softmax_cross_entropy(model.forward(x, tape=tape), t)
    model.cleargrads()
    loss.backward(retain_grad=True)
    (_, xin, out), = [r for r in tape.records if r[0] is link]
    grad = param.grad.copy()
    gs = 5 * numpy.array(out.grad)
    uv = reference.bn_per_sample(reference.bn_xhat(xin, link.eps), gs)
    uv = uv[:, :3] if use_gamma else uv[:, 3:]
    Fm = sum(numpy.outer(r, r) for r in uv) / 5
    if bn_fisher == 'diagonal':
        Fm = numpy.diag(Fm).copy()
    model.cleargrads()
    opt = KFAC(lr=1.0, momentum=0.0, damping=GAMMA, bn_damping_ratio=2.0,
               bn_fisher=bn_fisher).setup(model)
    p0 = param.array.copy()
    opt.update(lambda: F.softmax_cross_entropy(model(x), t))
    layer = [layer for layer in opt.kfac_layers if layer.name == '/link'][0]
    numpy.testing.assert_allclose(layer.factor('F'), Fm, **TOL)
    expected = reference.bn_direction(reference.bn_damp(Fm, 2.0 * GAMMA),
                                      grad)
    numpy.testing.assert_allclose(p0 - param.array, expected, **TOL)
