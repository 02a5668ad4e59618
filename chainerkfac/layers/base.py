"""The K-FAC block of one link: its factors, their inverses, preconditioning.

A subclass per link type says how to build its factors from what the
backward pass of its function hands over (the retained inputs and the output
gradient), how to invert them and how to precondition the link's gradient.
Adding a layer type is adding one such file and listing it in ``__init__``.
"""

import collections
import typing

import numpy

import chainer
from chainer import backend
from chainer.types import NdArray

from chainerkfac.distributed import packing
from chainerkfac import damping as damping_module
from chainerkfac import factors as factors_module
from chainerkfac import inverse as inverse_module


_EMPTY = numpy.zeros((0,), dtype=numpy.float32)


class Layer(object):
    """Base class of the K-FAC blocks.

    Class attributes of a subclass:
        link_type: the Chainer link class it covers.
        function_type: the ``FunctionNode`` that carries the link's input and
            output gradient in the backward pass; the link's first parameter
            is that function's second input.
        factor_names: the names of its factors, e.g. ``('A', 'G')``.
        intervals: factor name -> the hyperparameter giving its refresh
            interval (``'a_interval'`` or ``'g_interval'``).
    """

    link_type = None
    function_type = None
    factor_names = ()
    intervals = {}

    def __init__(self, name, link, factor_dtype=None):
        self.name = name
        self.link = link
        self._factor_dtype = None if factor_dtype is None else \
            numpy.dtype(factor_dtype)
        self.state = {}
        self._explicit = {}  # name -> explicit inverse (method 'explicit')
        #: factor name -> how many times it was set (see :meth:`set_factor`)
        self.refreshes = collections.Counter()
        self.check_link()

    #: The index of the function input that is :attr:`param`'s node.
    param_input = 1

    #: The prefix of the factors built from the link's input (A, A0, ...);
    #: the others (G, the BN Fisher) are built from output gradients.
    input_side = 'A'

    def scales_with_loss(self, name: str) -> bool:
        """Whether factor ``name`` is built from output gradients, so
        that a loss scale S multiplies it by S²."""
        return not name.startswith(self.input_side)

    # -- what subclasses provide -------------------------------------------
    @classmethod
    def covers(cls, link: chainer.Link) -> bool:
        """Whether this block type is the one for ``link``."""
        return isinstance(link, cls.link_type)

    @classmethod
    def unsupported(cls, link: chainer.Link) -> typing.Optional[str]:
        """Why this block does not cover ``link`` (one phrase), or None.

        A link whose parameters are reparameterized by a link hook
        (``SpectralNormalization``, ``WeightStandardization``) is not
        covered: its function sees the transformed weight, not the
        parameter."""
        from chainer import link_hooks
        for hook in link.local_link_hooks.values():
            if isinstance(hook, (link_hooks.SpectralNormalization,
                                 link_hooks.WeightStandardization)):
                return '{} with {}: the function sees the reparameterized ' \
                    'weight'.format(type(link).__name__, type(hook).__name__)
        return None

    def check_link(self) -> None:
        """Raises ValueError when the link is configured in a way not
        covered (see :meth:`unsupported`)."""
        reason = self.unsupported(self.link)
        if reason is not None:
            raise ValueError('K-FAC does not cover link {}: {}'.format(
                self.name, reason))

    @property
    def params(self) -> list:
        """The link's parameters preconditioned by this block, in order."""
        raise NotImplementedError

    def factor_shapes(self) -> dict:
        """``{name: shape}`` of the factors (the link must be initialized)."""
        raise NotImplementedError

    def build(self, function: chainer.FunctionNode, in_data: tuple,
              gy: NdArray, multiplier: float, names: typing.Iterable) -> dict:
        """Factors ``names`` as ``{name: (data, scale)}``.

        Args:
            function: the link's function node (in its backward pass).
            in_data: its retained input arrays.
            gy: the gradient w.r.t. its output, as backprop delivers it.
            multiplier: ``n`` for a mean-reduced loss (per-sample gradients
                are ``n * gy``), 1 for a sum-reduced loss.
            names: the factors due.
        """
        raise NotImplementedError

    def damped_blocks(self, damping: float,
                      bn_damping_ratio: float) -> dict:
        """``{name: (factor, added diagonal)}`` of every factor: a square
        one's damped inverse is kept as a Cholesky factor, a vector's
        (a diagonal factor) as its reciprocals (a query: it changes
        nothing; :func:`compute_inverses` stores the inverses)."""
        raise NotImplementedError

    def vector_inverse(self, name: str, factor: NdArray,
                       added: float) -> NdArray:
        """The damped inverse of a factor kept as a vector (a diagonal
        one: its reciprocals ``1 / (factor + added)``)."""
        return 1 / (factor + added)

    def precondition(self, method: str = 'solve') -> None:
        """Replaces the parameters' gradients by the preconditioned ones
        (``method``: ``'solve'`` or ``'explicit'``, see
        :mod:`chainerkfac.inverse`)."""
        raise NotImplementedError

    # -- inverses ----------------------------------------------------------
    def set_inverse(self, name: str, value: NdArray) -> None:
        """Stores ``<name>_inv``: the lower Cholesky factor of a square
        damped block, the reciprocal of a diagonal one."""
        self.state[name + '_inv'] = value
        self._explicit.pop(name, None)

    def apply_inverse(self, name: str, b: NdArray,
                      method: str) -> NdArray:
        """(damped factor ``name``)⁻¹ @ b by ``method``; the explicit
        inverse is formed from the Cholesky factor at its first use and
        kept until the next refresh (it is not part of snapshots)."""
        c = self.state[name + '_inv']
        explicit = None
        if method == 'explicit':
            explicit = self._explicit.get(name)
            if explicit is None:
                explicit = inverse_module.cholesky_inverse(c)
                self._explicit[name] = explicit
        return inverse_module.apply(c, b, method, explicit)

    # -- shared ------------------------------------------------------------
    @property
    def factor_dtype(self) -> numpy.dtype:
        """The dtype factors are stored in: the one given, else that of the
        link's parameters once they are initialized (float64 when one of
        them is float64, float32 otherwise; an uninitialized parameter's
        dtype says nothing)."""
        if self._factor_dtype is None:
            dtypes = [numpy.dtype(p.array.dtype) for p in self.params
                      if p.array is not None]
            if not dtypes:
                raise RuntimeError(
                    'K-FAC: link {} is not initialized yet'.format(self.name))
            self._factor_dtype = numpy.dtype(
                numpy.float64 if numpy.dtype(numpy.float64) in dtypes
                else numpy.float32)
        return self._factor_dtype

    def initialized(self) -> bool:
        return all(p.array is not None for p in self.params)

    #: A link called U times in one pass: its uses are taken as more
    #: positions, as a convolution's (KFC, Grosse & Martens, ICML 2016; for
    #: recurrences the independence-over-time approximation of Martens, Ba &
    #: Johnson, ICLR 2018): the factors whose names start with this prefix
    #: (the input side, a sum over positions / n) are summed over the uses,
    #: the others (the gradient side, a mean over positions) averaged.  None:
    #: the block covers one call per pass.
    summed_over_uses = None

    def combine_uses(self, name: str,
                     values: typing.Sequence[NdArray]) -> NdArray:
        """Factor ``name`` of a link used several times in one pass, from
        the dense factors of its uses (see :attr:`summed_over_uses`)."""
        if self.summed_over_uses is not None:
            total = values[0]
            for value in values[1:]:
                total = total + value
            return total if name.startswith(self.summed_over_uses) else \
                total / len(values)
        raise RuntimeError(
            'K-FAC: link {} was called more than once in one forward pass; '
            '{} blocks cover one call per pass: exclude the link with '
            'skip_layers'.format(self.name, type(self).__name__))

    @property
    def param(self) -> chainer.Parameter:
        """The parameter whose node identifies the link's function."""
        return self.params[0]

    def has_grad(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def matches(self, function: chainer.FunctionNode) -> bool:
        inputs = function.inputs
        i = self.param_input
        return (isinstance(function, self.function_type) and len(inputs) > i
                and inputs[i] is self.param.node)

    def set_factor(self, name: str, data: NdArray,
                   scale: NdArray) -> None:
        """Stores a freshly built factor (counted in ``refreshes``)."""
        self.refreshes[name] += 1
        self.state[name] = data
        self.state[name + '_scale'] = scale

    def factor(self, name: str) -> typing.Optional[NdArray]:
        """The dense (undamped) factor ``name`` as last built, or None."""
        data = self.state.get(name)
        if data is None:
            return None
        return factors_module.dense(data, self.state[name + '_scale'])

    def damped_pair(self, damping: float, a: str = 'A',
                    g: str = 'G') -> typing.Tuple[tuple, tuple]:
        """``((A, damping_a), (G, damping_g))`` of the Kronecker pair
        ``a``, ``g``: γ split between them by π (eq. 12-14)."""
        A, G = self.factor(a), self.factor(g)
        damping_a, damping_g = damping_module.kronecker_damping(A, G, damping)
        return (A, damping_a), (G, damping_g)

    def inverse(self, name: str) -> typing.Optional[NdArray]:
        return self.state.get(name + '_inv')

    def has_inverses(self) -> bool:
        return all(self.inverse(n) is not None for n in self.factor_names)

    def drop_factors(self) -> None:
        """Forgets the factors, their scales and inverses (a process keeps
        those of the layers it owns only)."""
        for key in self.state_keys():
            self.state[key] = None
        self._explicit = {}

    def state_keys(self) -> typing.Iterator[str]:
        for name in self.factor_names:
            yield name
            yield name + '_scale'
            yield name + '_inv'

    def factor_nbytes(self, packed: bool = False) -> dict:
        """``{factor name: bytes}`` held by the factors (not their
        inverses; 0 for one not built yet); ``packed``: a square factor
        as its upper triangle, N(N+1)/2 values, as stages 3 and 6 send it
        (a vector, e.g. a diagonal BN Fisher, stays as is)."""
        sizes = collections.OrderedDict()
        for name in self.factor_names:
            array = self.state.get(name)
            sizes[name] = factors_module.nbytes(array) if (
                array is None or not packed) else \
                packing.packed_size(array.shape) * array.itemsize
        return sizes

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        loading = isinstance(serializer, chainer.serializer.Deserializer)
        device = self.param.device
        for key in self.state_keys():
            value = self.state.get(key)
            if loading:
                value = serializer(key, None)
                if value is not None and value.ndim == 1 and value.size == 0:
                    value = None
                if value is not None:
                    value = device.send(numpy.asarray(value))
                self.state[key] = value
                self._explicit = {}
            else:
                serializer(key, _EMPTY if value is None else value)

    def __repr__(self):
        return '<{} {}>'.format(type(self).__name__, self.name)


def compute_inverses(layers: typing.Iterable[Layer], damping: float,
                     bn_damping_ratio: float) -> None:
    """Refreshes the damped inverses of ``layers`` from their current
    factors: a diagonal factor's reciprocals, every square block factorized
    in one batch (:func:`chainerkfac.inverse.cholesky_many`: one host
    synchronization)."""
    keys, blocks = [], []
    for layer in layers:
        for name, (factor, added) in layer.damped_blocks(
                damping, bn_damping_ratio).items():
            if factor.ndim == 1:
                layer.set_inverse(name, layer.vector_inverse(name, factor,
                                                             added))
                continue
            keys.append((layer, name))
            blocks.append((factor, added))
    if blocks:
        for (layer, name), c in zip(keys,
                                    inverse_module.cholesky_many(blocks)):
            layer.set_inverse(name, c)


def weight_and_bias(link: chainer.Link) -> list:
    """``[W]``, or ``[W, b]`` when ``link`` has a bias: the parameters of a
    Kronecker block, in the order of :func:`grad_matrix`'s columns."""
    return [link.W] if link.b is None else [link.W, link.b]


def input_dim(link: chainer.Link) -> int:
    """The side of A for ``link``'s weight: its input values per output
    (in × kh × kw for a convolution), +1 for the bias."""
    w = link.W
    return w.size // w.shape[0] + (link.b is not None)


def grad_matrix(params: typing.Sequence[chainer.Parameter]) -> NdArray:
    """``[∇W | ∇b]``: W's gradient as (out, -1) with b's as last column."""
    w = params[0]
    g = w.grad.reshape(w.shape[0], -1)
    if len(params) == 1:
        return g
    xp = backend.get_array_module(g)
    return xp.concatenate([g, params[1].grad.reshape(-1, 1)], axis=1)


def set_grad_matrix(params: typing.Sequence[chainer.Parameter],
                    matrix: NdArray) -> None:
    """Writes ``[∇W | ∇b]`` back into the parameters' gradients."""
    w = params[0]
    ncol = w.size // w.shape[0]
    w.grad[...] = matrix[:, :ncol].reshape(w.shape)
    if len(params) > 1:
        params[1].grad[...] = matrix[:, ncol]
