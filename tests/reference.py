"""Independent reference implementation of one K-FAC step.

Written from the written conventions only
(tests/optimizers/test_reference.py pins the
package's optimizer to it); it shares no code with :mod:`chainerkfac`.
Clarity over speed: per-sample / per-position Python loops, dense NumPy,
float64.  Chainer is used only as an autograd engine (parameter gradients and
gradients w.r.t. layer outputs through ``retain_grad=True``).

Conventions (n samples, per-sample losses l_i, g_i = dl_i/ds for a layer
output s):

* Linear: a_i = x_i flattened (+ a trailing 1 with a bias);
  A = 1/n sum_i a_i a_i^T, G = 1/n sum_i g_i g_i^T.
* Convolution2D: a_{i,t} = zero-padded input patch at output position t,
  flattened as (in_channel, kh, kw) (+ 1 with a bias), g_{i,t} = output
  gradient at t;  A = 1/n sum_{i,t} a a^T,  G = 1/(n T) sum_{i,t} g g^T.
* Damping: pi = sqrt((tr A / dim A) / (tr G / dim G)),
  A_bar = A + pi sqrt(gamma) I, G_bar = G + sqrt(gamma) / pi I;
  direction = reshape_F((A_bar kron G_bar)^-1 vec_F(grad)).
* BatchNormalization: u_i = sum_t g_{i,c,t} xhat_{i,c,t},
  v_i = sum_t g_{i,c,t};
  F = 1/n sum_i [u; v][u; v]^T (or its diagonal);
  direction = (F + rho_BN gamma I)^-1 [grad_gamma; grad_beta].
* Other parameters: the raw gradient.
* Update: w <- w - lr d + m (w - w_prev), then optional rescaling of
  Linear/Conv W: w <- sqrt(2 d_out) w / (||w||_F + 1e-9).
* Staleness: at update t, A is rebuilt iff t % a_interval == 0, G and the BN
  F iff t % g_interval == 0; damped matrices are rebuilt (with the current
  gamma, from the currently stored A and G) iff a factor of the layer was
  rebuilt, otherwise the stored damped matrices are reused.
"""

import math

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np


RESCALE_EPS = 1e-9


# ---------------------------------------------------------------------------
# Pure NumPy building blocks
# ---------------------------------------------------------------------------

def conv_out_size(size, k, s, p):
    """Output length of a convolution (chainer's default cover_all=False)."""
    return (size + 2 * p - k) // s + 1


def conv_patches(x, ksize, stride, pad):
    """Patches of ONE sample by explicit slicing.

    x: (C, H, W).  Returns (T, C*kh*kw) whose row t is the zero-padded input
    patch at output position t (row-major over (out_y, out_x)), flattened in
    (in_channel, kh, kw) order, i.e. the order of ``W.reshape(out, -1)``.
    """
    kh, kw = ksize
    sy, sx = stride
    ph, pw = pad
    C, H, W = x.shape
    xp = np.zeros((C, H + 2 * ph, W + 2 * pw), dtype=np.float64)
    xp[:, ph:ph + H, pw:pw + W] = x
    out_h = conv_out_size(H, kh, sy, ph)
    out_w = conv_out_size(W, kw, sx, pw)
    rows = []
    for oy in range(out_h):
        for ox in range(out_w):
            y0 = oy * sy
            x0 = ox * sx
            patch = xp[:, y0:y0 + kh, x0:x0 + kw]  # (C, kh, kw)
            assert patch.shape == (C, kh, kw)
            rows.append(patch.reshape(-1))
    return np.array(rows), out_h, out_w


def linear_factors(xs, gs, bias):
    """xs: (n, ...) inputs, gs: (n, out) per-sample output gradients."""
    n = xs.shape[0]
    din = int(np.prod(xs.shape[1:])) + (1 if bias else 0)
    dout = gs.shape[1]
    A = np.zeros((din, din))
    G = np.zeros((dout, dout))
    for i in range(n):
        a = xs[i].reshape(-1)
        if bias:
            a = np.concatenate([a, [1.0]])
        g = gs[i]
        A += np.outer(a, a)
        G += np.outer(g, g)
    return A / n, G / n


def conv_factors(xs, gs, ksize, stride, pad, bias):
    """xs: (n, C, H, W) inputs, gs: (n, O, out_h, out_w) output gradients."""
    n = xs.shape[0]
    O = gs.shape[1]
    A = None
    G = np.zeros((O, O))
    T = None
    for i in range(n):
        P, out_h, out_w = conv_patches(xs[i], ksize, stride, pad)
        assert (out_h, out_w) == gs.shape[2:], (out_h, out_w, gs.shape)
        T = out_h * out_w
        if A is None:
            A = np.zeros((P.shape[1] + (1 if bias else 0),) * 2)
        for t in range(T):
            oy, ox = divmod(t, out_w)
            a = P[t]
            if bias:
                a = np.concatenate([a, [1.0]])
            g = gs[i, :, oy, ox]
            A += np.outer(a, a)
            G += np.outer(g, g)
    return A / n, G / (n * T)


def bn_xhat(x, eps):
    """Training-mode normalized input: batch statistics, biased variance."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    mean = x.mean(axis=axes).reshape(shape)
    var = ((x - mean) ** 2).mean(axis=axes).reshape(shape)
    return (x - mean) / np.sqrt(var + eps)


def bn_per_sample(xhat, gs):
    """Per-sample [u_i; v_i] (n, 2C) for BN parameters (gamma first)."""
    n, C = gs.shape[:2]
    rows = []
    for i in range(n):
        u = np.zeros(C)
        v = np.zeros(C)
        for c in range(C):
            gc = gs[i, c].reshape(-1)      # over spatial positions (T=1 in 2D)
            xc = xhat[i, c].reshape(-1)
            u[c] = np.sum(gc * xc)
            v[c] = np.sum(gc)
        rows.append(np.concatenate([u, v]))
    return np.array(rows)


def bn_fisher(xhat, gs, mode):
    uv = bn_per_sample(xhat, gs)
    n = uv.shape[0]
    Fm = np.zeros((uv.shape[1],) * 2)
    for i in range(n):
        Fm += np.outer(uv[i], uv[i])
    Fm /= n
    if mode == 'full':
        return Fm
    if mode == 'diagonal':
        return np.diag(Fm).copy()
    if mode == 'unit':  # the 2 x 2 blocks of (gamma_c, beta_c), zeros else
        C = Fm.shape[0] // 2
        mask = np.zeros_like(Fm)
        for c in range(C):
            for a in (c, C + c):
                mask[a, c] = mask[a, C + c] = 1
        return Fm * mask
    raise ValueError(mode)


def pi_factor(A, G):
    return math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))


def damp_kfac(A, G, gamma):
    """Factored Tikhonov damping; returns (A_bar, G_bar)."""
    pi = pi_factor(A, G)
    sg = math.sqrt(gamma)
    A_bar = A + pi * sg * np.eye(A.shape[0])
    G_bar = G + (sg / pi) * np.eye(G.shape[0])
    return A_bar, G_bar


def vec(M):
    """Column stacking (Fortran order)."""
    return np.asarray(M).reshape(-1, order='F')


def unvec(v, shape):
    return np.asarray(v).reshape(shape, order='F')


def kron_direction(grad_mat, A_bar, G_bar):
    """(A_bar kron G_bar)^-1 vec(grad), reshaped back to grad's shape.

    Equals G_bar^-1 grad A_bar^-1 (A_bar symmetric): (B^T kron C) vec(X) =
    vec(C X B) with column stacking.
    """
    K = np.kron(A_bar, G_bar)
    sol = np.linalg.solve(K, vec(grad_mat))
    return unvec(sol, grad_mat.shape)


def bn_damp(Fm, gamma_bn):
    if Fm.ndim == 1:
        return Fm + gamma_bn
    return Fm + gamma_bn * np.eye(Fm.shape[0])


def bn_direction(F_damped, grad):
    if F_damped.ndim == 1:
        return grad / F_damped
    return np.linalg.solve(F_damped, grad)


def rescale(W):
    W = np.asarray(W)
    return math.sqrt(2.0 * W.shape[0]) * W / (np.sqrt(np.sum(W * W)) +
                                              RESCALE_EPS)


# ---------------------------------------------------------------------------
# Chainer glue: recording layer inputs / outputs in an explicit forward
# ---------------------------------------------------------------------------

class Tape(object):
    """Records (link, input array, output Variable) for every tracked call."""

    def __init__(self):
        self.records = []

    def __call__(self, link, x):
        xin = x.array if isinstance(x, chainer.Variable) else x
        y = link(x)
        self.records.append((link, np.array(xin, dtype=np.float64, copy=True),
                             y))
        return y


def run(tape, link, x):
    """Apply ``link`` to ``x``; record it when ``tape`` is not None.

    Test models route every Linear / Convolution2D / BatchNormalization call
    through this in their ``forward(x, tape=None)``.
    """
    if tape is None:
        return link(x)
    return tape(link, x)


def kind_of(link):
    if isinstance(link, L.Convolution2D):
        return 'conv'
    if isinstance(link, L.Linear):
        return 'linear'
    if isinstance(link, L.BatchNormalization):
        return 'bn'
    return None


def _loss(y, t, loss_reduction):
    ls = F.softmax_cross_entropy(y, t, reduce='no')
    if loss_reduction == 'mean':
        return F.mean(ls)
    if loss_reduction == 'sum':
        return F.sum(ls)
    raise ValueError(loss_reduction)


def capture(model, x, t, loss_reduction='mean', per_sample=False):
    """Forward/backward of ``model`` on a batch.

    Returns (param_grads, layers) with param_grads {param path: grad copy}
    (gradient of the batch loss) and layers {link path: dict(kind, link, x,
    g)} where g holds the per-sample output gradients dl_i/ds.  With
    ``per_sample`` (models without BN) every g_i comes from a separate
    forward/backward of sample i alone; otherwise g_i is the batch backprop
    gradient times n ('mean') or times 1 ('sum').
    """
    names = {id(l): name for name, l in model.namedlinks()}
    n = x.shape[0]

    tape = Tape()
    y = model.forward(x, tape=tape)
    loss = _loss(y, t, loss_reduction)
    model.cleargrads()
    loss.backward(retain_grad=True)
    param_grads = {name: np.array(p.grad, dtype=np.float64, copy=True)
                   for name, p in model.namedparams()}
    scale = float(n) if loss_reduction == 'mean' else 1.0
    layers = {}
    order = []
    for link, xin, out in tape.records:
        name = names[id(link)]
        assert name not in layers, 'each tracked link must be called once'
        layers[name] = dict(kind=kind_of(link), link=link, x=xin,
                            g=scale * np.array(out.grad, dtype=np.float64))
        order.append(name)

    if per_sample:
        assert not any(layers[k]['kind'] == 'bn' for k in layers), \
            'per-sample output gradients are only valid without BN'
        for name in order:
            layers[name]['g'] = np.zeros_like(layers[name]['g'])
        for i in range(n):
            tape_i = Tape()
            y_i = model.forward(x[i:i + 1], tape=tape_i)
            loss_i = F.sum(F.softmax_cross_entropy(y_i, t[i:i + 1],
                                                   reduce='no'))  # = l_i
            model.cleargrads()
            loss_i.backward(retain_grad=True)
            for link, _, out in tape_i.records:
                layers[names[id(link)]]['g'][i] = out.grad[0]
    model.cleargrads()
    return param_grads, layers, order


def layer_factors(info, bn_mode='full'):
    """Undamped factors of one captured layer: dict with A, G or F."""
    link = info['link']
    kind = info['kind']
    if kind == 'linear':
        A, G = linear_factors(info['x'], info['g'], link.b is not None)
        return dict(A=A, G=G)
    if kind == 'conv':
        assert link.groups == 1 and tuple(link.dilate) == (1, 1)
        ks = link.ksize
        ks = (ks, ks) if isinstance(ks, int) else tuple(ks)
        A, G = conv_factors(info['x'], info['g'], ks, tuple(link.stride),
                            tuple(link.pad), link.b is not None)
        return dict(A=A, G=G)
    if kind == 'bn':
        xhat = bn_xhat(info['x'], link.eps)
        return dict(F=bn_fisher(xhat, info['g'], bn_mode))
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# The reference optimizer
# ---------------------------------------------------------------------------

class ReferenceKFAC(object):
    """Reference K-FAC acting in place on the parameters of ``model``.

    ``model`` must have ``forward(x, tape=None)`` routing its tracked links
    through :func:`run`, and be float64.
    """

    def __init__(self, model, lr=0.1, momentum=0.9, damping=1e-3,
                 bn_damping_ratio=1.0, a_interval=1, g_interval=1,
                 weight_rescaling=False, bn_fisher='full',
                 loss_reduction='mean', per_sample=False):
        self.model = model
        self.lr = lr
        self.momentum = momentum
        self.damping = damping
        self.bn_damping_ratio = bn_damping_ratio
        self.a_interval = a_interval
        self.g_interval = g_interval
        self.weight_rescaling = weight_rescaling
        self.bn_fisher = bn_fisher
        self.loss_reduction = loss_reduction
        self.per_sample = per_sample
        self.t = 0
        self.prev = {name: np.array(p.array, copy=True)
                     for name, p in model.namedparams()}  # w(-1) = w(0)
        self.state = {}   # link path -> dict(A, G, A_bar, G_bar, F, F_damped)
        self.refreshed = []  # per update: (refresh_A, refresh_G)

    def update(self, x, t):
        grads, layers, order = capture(self.model, x, t, self.loss_reduction,
                                       self.per_sample)
        self.step(grads, layers, order,
                  lambda name, mode='full': layer_factors(layers[name], mode))

    def step(self, grads, layers, order, factors_of):
        """One update from the gradients ``grads`` and the layers' factors
        ``factors_of(name, bn_mode)`` (those of one batch, or their means
        over processes)."""
        model = self.model
        step = self.t
        refresh_A = step % self.a_interval == 0
        refresh_G = step % self.g_interval == 0
        self.refreshed.append((refresh_A, refresh_G))
        directions = dict(grads)  # every other parameter: the raw gradient
        for name in order:
            info = layers[name]
            link = info['link']
            st = self.state.setdefault(name, {})
            if info['kind'] in ('linear', 'conv'):
                if refresh_A or refresh_G:
                    fac = factors_of(name)
                    if refresh_A:
                        st['A'] = fac['A']
                    if refresh_G:
                        st['G'] = fac['G']
                    st['A_bar'], st['G_bar'] = damp_kfac(
                        st['A'], st['G'], self.damping)
                gW = grads[name + '/W']
                out = gW.shape[0]
                cols = [gW.reshape(out, -1)]
                if link.b is not None:
                    cols.append(grads[name + '/b'].reshape(out, 1))
                gmat = np.concatenate(cols, axis=1)
                d = kron_direction(gmat, st['A_bar'], st['G_bar'])
                nw = gW.reshape(out, -1).shape[1]
                directions[name + '/W'] = d[:, :nw].reshape(gW.shape)
                if link.b is not None:
                    directions[name + '/b'] = d[:, nw]
            elif info['kind'] == 'bn':
                if refresh_G:
                    st['F'] = factors_of(name, self.bn_fisher)['F']
                    st['F_damped'] = bn_damp(
                        st['F'], self.bn_damping_ratio * self.damping)
                C = grads[name + '/gamma'].shape[0]
                gvec = np.concatenate([grads[name + '/gamma'],
                                       grads[name + '/beta']])
                d = bn_direction(st['F_damped'], gvec)
                directions[name + '/gamma'] = d[:C]
                directions[name + '/beta'] = d[C:]

        # eq. 17, then eq. 18
        kfac_W = set(name + '/W' for name in order
                     if layers[name]['kind'] in ('linear', 'conv'))
        for pname, p in model.namedparams():
            w = np.array(p.array, copy=True)
            new = w - self.lr * directions[pname] + \
                self.momentum * (w - self.prev[pname])
            self.prev[pname] = w
            if self.weight_rescaling and pname in kfac_W:
                new = rescale(new)
            p.array[...] = new
        self.t += 1

    def params(self):
        return {name: np.array(p.array, copy=True)
                for name, p in self.model.namedparams()}
