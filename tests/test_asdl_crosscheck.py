"""Our Fisher blocks against ASDL's (the paper's first author's PyTorch
library), on the same weights and batch in float64.

Runs when torch and ASDL (PyPI ``asdfghjkl``, imported as ``asdl``) are
installed: ``pip install -r requirements-bench.txt``; skipped otherwise.

ASDL's empirical Fisher (``FISHER_EMP``) of the sum-reduced cross-entropy
with ``data_size=n`` scales both of its Kronecker factors by 1/n and divides
a convolution's A by the number of output positions T, where ours keeps
A = Σ a aᵀ / n and G = Σ g gᵀ / (n T) for the mean loss (per-sample
gradients n·gy): the split differs, the product A ⊗ G = Σ a aᵀ ⊗ Σ g gᵀ /
(n² T) must not.  The diagonal BN Fisher is Σ_i (∂ℓ_i/∂θ)² / n on both sides.
"""

import numpy
import pytest

torch = pytest.importorskip(
    'torch', reason='torch is not installed (pip install -r '
    'requirements-bench.txt)')
asdl = pytest.importorskip(
    'asdl', reason='ASDL is not installed (pip install -r '
    'requirements-bench.txt)')

import chainer  # NOQA: E402
import chainer.functions as F  # NOQA: E402
import chainer.links as L  # NOQA: E402

from chainerkfac import optimizers  # NOQA: E402

N = 8
EPS = 2e-5  # Chainer's BatchNormalization default


class ChainerNet(chainer.Chain):
    def __init__(self):
        super(ChainerNet, self).__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 4, 3, pad=1)
            self.bn1 = L.BatchNormalization(4, eps=EPS)
            self.conv2 = L.Convolution2D(4, 5, 3, pad=1, nobias=True)
            self.bn2 = L.BatchNormalization(5, eps=EPS)
            self.fc = L.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(F.mean(h, axis=(2, 3)))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super(TorchNet, self).__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, eps=EPS)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5, eps=EPS)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


def copy_weights(src, dst):
    with torch.no_grad():
        for name in ('conv1', 'conv2', 'fc'):
            link, module = getattr(src, name), getattr(dst, name)
            module.weight.copy_(torch.from_numpy(link.W.array))
            if link.b is not None:
                module.bias.copy_(torch.from_numpy(link.b.array))
        for name in ('bn1', 'bn2'):
            link, module = getattr(src, name), getattr(dst, name)
            module.weight.copy_(torch.from_numpy(link.gamma.array))
            module.bias.copy_(torch.from_numpy(link.beta.array))


@pytest.fixture(scope='module')
def both():
    rng = numpy.random.RandomState(0)
    numpy.random.seed(0)
    net = ChainerNet()
    net.to_device('@numpy')
    for param in net.params():
        param.array = rng.standard_normal(param.shape) * 0.5
    for bn in (net.bn1, net.bn2):
        bn.gamma.array = 1 + 0.2 * rng.standard_normal(bn.gamma.shape)
    x = rng.standard_normal((N, 3, 6, 6))
    t = rng.randint(0, 3, N).astype(numpy.int32)
    tnet = TorchNet().double()
    copy_weights(net, tnet)

    optimizer = optimizers.KFAC(lr=0.0, momentum=0.0, bn_fisher='diagonal')
    optimizer.setup(net)
    optimizer.update(lambda: F.softmax_cross_entropy(net(x), t))
    ours = {layer.name.lstrip('/'): layer for layer in optimizer.kfac_layers}

    with chainer.using_config('train', True), chainer.no_backprop_mode():
        logits = net(x).array
    tx, tt = torch.from_numpy(x), torch.from_numpy(t.astype(numpy.int64))
    assert numpy.allclose(tnet(tx).detach().numpy(), logits, rtol=1e-12,
                          atol=1e-12)

    theirs = {}
    for shape in (asdl.SHAPE_KRON, asdl.SHAPE_DIAG):
        config = asdl.FisherConfig(fisher_type=asdl.FISHER_EMP,
                                   fisher_shapes=[shape], data_size=N)
        maker = asdl.get_fisher_maker(tnet, config)
        dummy = maker.setup_model_call(tnet, tx)
        maker.setup_loss_call(torch.nn.functional.cross_entropy, dummy, tt,
                              reduction='sum')
        maker.forward_and_backward()
        for name, module in tnet.named_children():
            theirs[(name, shape)] = getattr(module, 'fisher', None)
    return ours, theirs


def relative_error(a, b):
    return numpy.abs(a - b).max() / numpy.abs(b).max()


@pytest.mark.parametrize('name', ['conv1', 'conv2', 'fc'])
def test_kronecker_product_equals_asdl(both, name):
    ours, theirs = both
    layer = ours[name]
    a, g = layer.factor('A'), layer.factor('G')
    kron = theirs[(name, asdl.SHAPE_KRON)].kron
    a2, b2 = kron.A.numpy(), kron.B.numpy()
    if a.shape != a2.shape:
        # the weight part: one side keeps the bias's row of ones in A
        d = min(a.shape[0], a2.shape[0])
        assert abs(a.shape[0] - a2.shape[0]) == 1
        a, a2 = a[:d, :d], a2[:d, :d]
    assert g.shape == b2.shape
    assert relative_error(numpy.kron(a, g), numpy.kron(a2, b2)) < 1e-12
    # the split itself differs (else this test would not need products)
    if name != 'fc':
        assert relative_error(a, a2) > 1e-3


@pytest.mark.parametrize('name', ['bn1', 'bn2'])
def test_diagonal_bn_fisher_equals_asdl(both, name):
    ours, theirs = both
    diag = theirs[(name, asdl.SHAPE_DIAG)].diag
    expected = numpy.concatenate([diag.weight.numpy().ravel(),
                                  diag.bias.numpy().ravel()])
    got = ours[name].factor('F')
    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-12
