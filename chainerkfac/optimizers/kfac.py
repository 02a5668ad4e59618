"""The K-FAC optimizer of Osawa et al., CVPR 2019, on one process."""

import collections
import contextlib
import math
import time
import typing

import numpy

import chainer
from chainer import backend
from chainer.backends import cuda
from chainer import optimizer

from chainerkfac import coverage as coverage_module
from chainerkfac import errors
from chainerkfac import factors
from chainerkfac import finite
from chainerkfac import framework
from chainerkfac import hooks
from chainerkfac import inverse as inverse_module
from chainerkfac import layers as layers_module


_default_hyperparam = optimizer.Hyperparameter()
_default_hyperparam.lr = 0.01
_default_hyperparam.momentum = 0.9
_default_hyperparam.damping = 1e-3
_default_hyperparam.bn_damping_ratio = 1.0
_default_hyperparam.a_interval = 1
_default_hyperparam.g_interval = 1
_default_hyperparam.weight_rescaling = False

BN_FISHER = ('diagonal', 'full')
FACTOR_DTYPES = ('float32', 'float16')
LOSS_REDUCTIONS = ('mean', 'sum')
#: The section of an optimizer's serialization that holds the layers' K-FAC
#: state (``<section>/<layer name>/<factor>``, ``_scale``, ``_inv``).
STATE_SECTION = 'kfac'


class KFACRule(optimizer.UpdateRule):
    """Eq. 17 for one parameter, then eq. 18 for a Linear/Conv weight.

    ``w(t+1) = w(t) − η·𝒢(t) + m·(w(t) − w(t−1))``, where the direction 𝒢 is
    what ``param.grad`` holds at update time (preconditioned by the optimizer
    for covered links, the raw gradient otherwise), and ``w(−1) = w(0)``.

    Args:
        parent_hyperparam: the optimizer's hyperparameter.
        rescale (bool): this parameter is the weight of a Linear or
            Convolution2D link (eq. 18 applies when ``weight_rescaling``).
    """

    def __init__(self, parent_hyperparam=None, rescale=False):
        super(KFACRule, self).__init__(
            parent_hyperparam or _default_hyperparam)
        self.rescale = rescale

    def init_state(self, param: chainer.Parameter) -> None:
        with chainer.using_device(param.device):
            self.state['w_prev'] = param.array.copy()

    def update_core(self, param: chainer.Parameter) -> None:
        grad = param.grad
        if grad is None:
            return
        hp = self.hyperparam
        w = param.array
        w_prev = self.state['w_prev']
        step = hp.momentum * (w - w_prev) - hp.lr * grad
        w_prev[...] = w
        w += step
        if self.rescale and hp.weight_rescaling:
            xp = backend.get_array_module(w)
            norm = xp.sqrt(xp.sum(w * w))
            w *= math.sqrt(2.0 * w.shape[0]) / (norm + 1e-9)


class KFAC(optimizer.GradientMethod):
    """K-FAC with the schemes of the paper (Sec. 3-4, Algorithm 1 on P = 1).

    Linear and Convolution2D links are preconditioned by their damped
    Kronecker factors, BatchNormalization links by their (diagonal or full)
    Fisher; every other parameter takes the raw gradient.  All parameters are
    updated by eq. 17 (and eq. 18 when ``weight_rescaling``).  Which links
    are covered, and why the others are not, is logged once every parameter
    is initialized (:attr:`coverage`, :mod:`chainerkfac.coverage`).

    The forward/backward pass is run by :meth:`update` (``update(lossfun,
    *args)``), or by the caller inside :meth:`capture` followed by
    ``update()`` without arguments (custom updaters, BPTT).  A covered link
    that gets no gradient in an update keeps its factors and is updated as
    MomentumSGD would (a zero gradient: momentum only).

    Args:
        lr (float): η.
        momentum (float): m.
        damping (float): γ (Tikhonov damping, split between A and G by π).
        bn_damping_ratio (float): ρ_BN; BN layers use γ_BN = ρ_BN·γ.
        a_interval (int): A factors are rebuilt at update t when
            ``t % a_interval == 0``.
        g_interval (int): G factors and the BN Fisher likewise.
        weight_rescaling (bool): eq. 18 after each update.
        bn_fisher (str): ``'diagonal'`` (the paper's choice) or ``'full'``.
        factor_dtype (str): ``'float32'`` or ``'float16'`` (factors built
            from and stored in half precision; inversion stays float32).
        loss_reduction (str): ``'mean'`` (the loss is the mean of per-sample
            losses) or ``'sum'``.
        accumulation_steps (int): k calls of :meth:`update` add gradients and
            factors; the k-th one updates the parameters.
        inverse_method (str): how the damped inverses are applied:
            ``'solve'`` (Cholesky factor + triangular solves), ``'explicit'``
            (inverse formed at each refresh, applied by GEMM) or ``'auto'``
            (``'solve'`` on CPU, ``'explicit'`` on GPU); see
            :mod:`chainerkfac.inverse`.
        skip_layers: links kept on the raw gradient: link types (e.g.
            ``chainer.links.Linear``) or strings, each a link's name
            (``'/fc8'`` or ``'fc8'``) or a link class name (``'Linear'``).
        log_coverage (bool): log the coverage report (logger
            ``chainerkfac``).
    """

    def __init__(self, lr: float = _default_hyperparam.lr,
                 momentum: float = _default_hyperparam.momentum,
                 damping: float = _default_hyperparam.damping,
                 bn_damping_ratio: float =
                 _default_hyperparam.bn_damping_ratio,
                 a_interval: int = _default_hyperparam.a_interval,
                 g_interval: int = _default_hyperparam.g_interval,
                 weight_rescaling: bool =
                 _default_hyperparam.weight_rescaling,
                 bn_fisher: str = 'diagonal', factor_dtype: str = 'float32',
                 loss_reduction: str = 'mean', accumulation_steps: int = 1,
                 inverse_method: str = 'auto',
                 skip_layers: typing.Iterable = (),
                 log_coverage: bool = True):
        super(KFAC, self).__init__()
        errors.check_choice('bn_fisher', bn_fisher, BN_FISHER)
        errors.check_choice('factor_dtype', factor_dtype, FACTOR_DTYPES)
        errors.check_choice('loss_reduction', loss_reduction, LOSS_REDUCTIONS)
        errors.check_choice('inverse_method', inverse_method,
                            inverse_module.METHODS)
        if int(accumulation_steps) != accumulation_steps or \
                accumulation_steps < 1:
            raise ValueError('accumulation_steps must be a positive integer, '
                             'got {!r}'.format(accumulation_steps))
        self.hyperparam.lr = lr
        self.hyperparam.momentum = momentum
        self.hyperparam.damping = damping
        self.hyperparam.bn_damping_ratio = bn_damping_ratio
        self.hyperparam.a_interval = a_interval
        self.hyperparam.g_interval = g_interval
        self.hyperparam.weight_rescaling = weight_rescaling
        self.bn_fisher = bn_fisher
        self.factor_dtype = factor_dtype
        self.loss_reduction = loss_reduction
        self.accumulation_steps = int(accumulation_steps)
        self.inverse_method = inverse_method
        if isinstance(skip_layers, (str, type)):
            skip_layers = (skip_layers,)
        self.skip_layers = tuple(skip_layers)
        self.log_coverage = log_coverage
        self.kfac_layers = []
        #: :class:`chainerkfac.coverage.Coverage` of the model (at setup).
        self.coverage = None
        self._loss_check = finite.LossCheck()
        self._accumulated = 0
        self._captured = 0
        self._pending = {}
        self._refreshed = set()
        self._active = set()
        #: Wall seconds per stage, added up over updates (reset at will):
        #: forward_backward, factors, inverse, precondition, update.
        self.stage_seconds = collections.defaultdict(float)
        #: On a GPU, synchronize the device at the end of every stage (and
        #: around the factor builds) so that ``stage_seconds`` are device
        #: times; off by default: each synchronization stalls the device's
        #: queue (the benchmarks turn it on).
        self.synchronize_stages = False

    lr = optimizer.HyperparameterProxy('lr')
    momentum = optimizer.HyperparameterProxy('momentum')
    damping = optimizer.HyperparameterProxy('damping')
    bn_damping_ratio = optimizer.HyperparameterProxy('bn_damping_ratio')
    a_interval = optimizer.HyperparameterProxy('a_interval')
    g_interval = optimizer.HyperparameterProxy('g_interval')
    weight_rescaling = optimizer.HyperparameterProxy('weight_rescaling')

    # -- setup ---------------------------------------------------------------
    def setup(self, link: chainer.Link) -> 'KFAC':
        self.coverage = coverage_module.plan_coverage(link, self.skip_layers)
        self.kfac_layers = self._make_layers(self.coverage)
        super(KFAC, self).setup(link)
        for layer in self.kfac_layers:
            if getattr(layer, 'rescales_weight', False):
                layer.link.W.update_rule.rescale = True
        self._report_coverage()
        return self

    def _make_layers(self, coverage):
        out = []
        for entry in coverage.covered():
            kwargs = {}
            if entry.layer_type is layers_module.BatchNormalizationLayer:
                kwargs['diagonal'] = self.bn_fisher == 'diagonal'
            entry.layer = entry.layer_type(
                entry.name, entry.link, self._factor_dtype_for(entry.link),
                **kwargs)
            out.append(entry.layer)
        return out

    def _report_coverage(self):
        """Logs the coverage report once the parameters are initialized."""
        if self.coverage is not None and not self.coverage.reported and \
                self.coverage.initialized():
            self.coverage.report(log=self.log_coverage and self._reports())

    def _reports(self):
        """Whether this process logs reports (every process of one)."""
        return True

    def _factor_dtype_for(self, link):
        """float16, or None: the layer follows its parameters' dtype once
        they are initialized (a float64 link keeps float64 factors)."""
        return numpy.float16 if self.factor_dtype == 'float16' else None

    def create_update_rule(self) -> KFACRule:
        return KFACRule(self.hyperparam)

    # -- one iteration (Algorithm 1 with P = 1) ------------------------------
    def update(self, lossfun: typing.Optional[typing.Callable] = None,
               *args, **kwds) -> None:
        """Forward, backward with factor hooks, and (every k-th call) a step.

        Algorithm 1: the due factors, stages 1-2 (forward/backward building
        them), then every k-th call :meth:`_step` (stages 3-6, the update).

        Args:
            lossfun: callable returning the scalar loss; called as
                ``lossfun(*args, **kwds)``.  Without it, the update steps on
                the passes captured by :meth:`capture` since the last step.
        """
        if lossfun is None:
            if not self._captured:
                raise TypeError(
                    'K-FAC: update() without lossfun steps on the passes '
                    'captured by optimizer.capture(), and none was captured: '
                    'call update(lossfun, *args), or run the forward and '
                    'backward inside "with optimizer.capture():" first')
            passes, self._captured = self._captured, 0
            # t and the built factors are those of the captured passes
            self._step(passes, self.due_factors())
            return
        if self._captured:
            raise RuntimeError(
                'K-FAC: update(lossfun) after a capture() that was not '
                'stepped on: call update() without arguments first')
        if self._accumulated == 0:
            self.target.cleargrads()
        self._before_pass()
        due = self.due_factors()
        with self._pass(due):
            loss = lossfun(*args, **kwds)
            self._loss_check.record(loss.array, self.t)
            loss.backward(loss_scale=self._loss_scale)
            del loss
        self._accumulated += 1
        if self._accumulated < self.accumulation_steps:
            return
        self._accumulated = 0
        self._step(self.accumulation_steps, due)

    @contextlib.contextmanager
    def capture(self) -> typing.ContextManager:
        """The forward/backward run inside is one K-FAC pass: its factors
        are built in its backward, and ``update()`` without arguments then
        steps on the gradients it left, as ``update(lossfun, ...)`` would on
        the same batch::

            model.cleargrads()
            with optimizer.capture():
                loss = model(x, t)
                loss.backward()
            optimizer.update()

        Several captured passes before one ``update()`` are accumulated as
        ``accumulation_steps`` would accumulate them: the factors are
        averaged over the passes and the gradients (which the passes add up)
        divided by their number for a mean-reduced loss.  The caller clears
        the gradients (Chainer's convention for ``update()`` without a loss
        function); with ``loss_scaling``, call ``backward(loss_scale=
        optimizer._loss_scale)`` as ``update(lossfun)`` does.  Captured
        passes and ``accumulation_steps > 1`` do not mix.
        """
        if self.accumulation_steps > 1:
            raise RuntimeError(
                'K-FAC: capture() accumulates the passes it captures itself; '
                'use accumulation_steps=1 with it')
        self._before_pass()
        with self._pass(self.due_factors()):
            yield
        self._captured += 1

    @contextlib.contextmanager
    def _pass(self, due):
        """Stages 1-2: one forward/backward pass with the factor hooks of
        the ``due`` factors."""
        if self._loss_scaling_is_dynamic:
            raise ValueError(
                'K-FAC supports a static loss scale only '
                '(loss_scaling(scale=S)): a dynamic scale skips updates on '
                'overflow, which K-FAC\'s factors cannot follow')
        hook = hooks.FactorHook(due, self.loss_reduction, self._loss_scale,
                                synchronize=self._synchronize)
        with self._stage('forward_backward'):
            with hook if due else contextlib.nullcontext():
                yield
        self.stage_seconds['forward_backward'] -= hook.build_seconds
        self.stage_seconds['factors'] += hook.build_seconds
        self._collect(due, hook.collected)
        self._report_coverage()

    def _before_pass(self):
        """Called before each pass (the distributed optimizer broadcasts
        the parameters before the first)."""

    def _step(self, passes, due):
        """The step after ``passes`` accumulated passes that built the
        ``due`` factors: stages 3-6 of Algorithm 1 and the update rule."""
        self._finish_accumulation(passes)
        self._settle_active()
        due = {layer: names for layer, names in due.items()
               if layer in self._active}
        self._make_plan()
        self.reallocate_cleared_grads()
        self.call_hooks('pre')
        self.reduce_scatter(due)
        self.invert()
        self.precondition()
        self.all_gather()
        self._loss_check.check()
        with self._stage('update'):
            self.t += 1
            for param in self.target.params():
                param.update()
        self.reallocate_cleared_grads()
        self.call_hooks('post')

    def _settle_active(self):
        """:attr:`_active`: the covered links that got a gradient in this
        update (the others keep their factors and step on a zero
        gradient, as MomentumSGD would)."""
        self._active = set(layer for layer in self.kfac_layers
                           if layer.has_grad())

    @contextlib.contextmanager
    def _stage(self, name):
        """Times a stage (see :attr:`synchronize_stages`)."""
        start = time.perf_counter()
        yield
        self._synchronize()
        self.stage_seconds[name] += time.perf_counter() - start

    def _synchronize(self):
        device = self.target.device
        if self.synchronize_stages and isinstance(device, cuda.GpuDevice):
            device.device.synchronize()

    def due_factors(self) -> dict:
        """``{layer: names}`` of the factors built in this update (number t).

        A factor is due when ``t`` is a multiple of its interval, or when it
        has never been built (:meth:`_has_built`).
        """
        due = {}
        for layer in self.kfac_layers:
            names = set(
                name for name in layer.factor_names
                if not self._has_built(layer, name)
                or self.t % int(getattr(self.hyperparam,
                                        layer.intervals[name])) == 0)
            if names:
                due[layer] = names
        return due

    def _has_built(self, layer, name):
        """Whether factor ``name`` of ``layer`` has been built (on one
        process: whether the layer holds it)."""
        return layer.state.get(name) is not None

    def _collect(self, due, collected):
        """Adds the factors built in one pass to the pending ones."""
        for layer, names in due.items():
            uses = collected.get(layer)
            if uses is None:
                if layer.has_grad() and not self._built_earlier(layer):
                    raise RuntimeError(
                        'K-FAC: link {} has gradients but no backward of its '
                        '{} was seen: its parameters were used outside its '
                        'own forward (a direct F-call, a link hook); keep it '
                        'on the raw gradient with skip_layers=[{!r}]'.format(
                            layer.name, layer.function_type.__name__,
                            layer.name))
                continue
            for name in uses[0]:
                if len(uses) == 1:
                    pair = uses[0][name]
                else:  # a link called several times in the pass
                    pair = factors.quantize(layer.combine_uses(
                        name, [factors.dense(*u[name]) for u in uses]),
                        layer.factor_dtype)
                key = (layer, name)
                pending = self._pending.get(key)
                if pending is None:
                    self._pending[key] = [pair, None, 1]
                else:
                    if pending[1] is None:
                        pending[1] = factors.dense(*pending[0])
                    pending[1] = pending[1] + factors.dense(*pair)
                    pending[2] += 1

    def _built_earlier(self, layer):
        """Whether an earlier pass of this update (accumulation, several
        captured passes) built factors of the layer: its gradient may come
        from there."""
        return any(key[0] is layer for key in self._pending)

    def _finish_accumulation(self, k):
        """Sets the factors of the ``k`` passes (their mean) and divides
        the gradients by ``k`` (mean-reduced loss) and the loss scale."""
        for (layer, name), (pair, total, count) in self._pending.items():
            if total is None:
                layer.set_factor(name, *pair)
            else:
                layer.set_factor(name, *factors.quantize(
                    total / count, layer.factor_dtype))
            self._refreshed.add(layer)
        self._pending = {}
        divisor = (k if self.loss_reduction == 'mean' else 1) * (
            self._loss_scale or 1)
        for param in self.target.params():
            # unscaled here, once: the update rule must not divide again
            framework.drop_loss_scale(param)
            if param.grad is not None and divisor != 1:
                param.grad /= divisor

    def _make_plan(self):
        """The plan of stages 3-6: on one process there is none (it owns
        every layer)."""

    def reduce_scatter(self, due: dict) -> None:
        """Stage 3: nothing to exchange on one process."""

    def all_gather(self) -> None:
        """Stage 6: nothing to exchange on one process."""

    def owned_layers(self) -> list:
        """The layers this process inverts and preconditions: all of them."""
        return self.kfac_layers

    def primary_layers(self) -> list:
        """The layers whose reduced factors this process reports (each layer
        on exactly one process): all of them."""
        return self.kfac_layers

    def _active_owned(self):
        """The layers this process owns that got a gradient in this update."""
        return [layer for layer in self.owned_layers()
                if layer in self._active]

    def invert(self) -> None:
        """Stage 4: the damped inverses (Cholesky factors, reciprocals) of
        the owned layers whose factors were refreshed in this update."""
        hp = self.hyperparam
        with self._stage('inverse'):
            layers_module.compute_inverses(
                [layer for layer in self._active_owned()
                 if layer in self._refreshed or not layer.has_inverses()],
                hp.damping, hp.bn_damping_ratio)
        self._refreshed = set()

    def precondition(self) -> None:
        """Stage 5: 𝒢_l = G_l⁻¹ ∇L_l A_{l-1}⁻¹ (Sec. 3) for the owned
        layers, (F + γ_BN·I)⁻¹ ∇ for BatchNormalization (Sec. 5.4)."""
        method = inverse_module.resolve_method(self.inverse_method,
                                               self.target.xp)
        with self._stage('precondition'):
            for layer in self._active_owned():
                layer.precondition(method)

    # -- snapshots -----------------------------------------------------------
    #: The section of :meth:`serialize` holding each layer's K-FAC state
    #: under the layer's name: a snapshot keeps each layer's from the
    #: process that holds it (:mod:`chainerkfac.training.snapshot.partition`).
    layer_state_section = STATE_SECTION

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        """Saves or loads t, w(t−1), the factors and their inverses."""
        super(KFAC, self).serialize(serializer)
        kfac = serializer[STATE_SECTION]
        for layer in self.kfac_layers:
            layer.serialize(kfac[layer.name])

    def factor_nbytes(self, packed: bool = False,
                      by_layer: bool = False) -> typing.Union[int, dict]:
        """Bytes held by the Fisher blocks (factors, not inverses): the
        memory of Figure 4.  Factors not built yet count 0.

        Args:
            packed (bool): count a square factor as its upper triangle,
                N(N+1)/2 values, as stages 3 and 6 send it (a vector, e.g.
                a diagonal BN Fisher, stays as is).
            by_layer (bool): return ``{layer name: {factor name: bytes}}``
                instead of the total.
        """
        sizes = collections.OrderedDict(
            (layer.name, layer.factor_nbytes(packed))
            for layer in self.kfac_layers)
        if by_layer:
            return sizes
        return sum(sum(part.values()) for part in sizes.values())
