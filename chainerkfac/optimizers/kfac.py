"""The K-FAC optimizer of Osawa et al., CVPR 2019, on one process."""

import collections
import contextlib
import logging
import math
import numbers
import time
import typing

import numpy

import chainer
from chainer import backend
from chainer.backends import cuda
from chainer import optimizer

from chainerkfac import coverage as coverage_module
from chainerkfac.distributed import exchange as exchange_module
from chainerkfac.distributed import layout
from chainerkfac.distributed import plan as plan_module
from chainerkfac import errors
from chainerkfac import finite
from chainerkfac import framework
from chainerkfac import hooks
from chainerkfac import inverse as inverse_module
from chainerkfac import kl_clip as kl_clip_module
from chainerkfac import layers as layers_module
from chainerkfac import options
from chainerkfac import passes as passes_module
from chainerkfac import refresh as refresh_module
from chainerkfac import sampled_fisher

logger = logging.getLogger('chainerkfac')
#: the layer assignment, when it is made (rank 0, with ``print_plan``)
plan_logger = logging.getLogger('chainerkfac.plan')


_default_hyperparam = optimizer.Hyperparameter()
_default_hyperparam.lr = 0.01
_default_hyperparam.momentum = 0.9
_default_hyperparam.damping = 1e-3
_default_hyperparam.bn_damping_ratio = 1.0
_default_hyperparam.a_interval = 1
_default_hyperparam.g_interval = 1
_default_hyperparam.weight_rescaling = False
_default_hyperparam.kl_clip = None
_default_hyperparam.momentum_schedule = 'eq16'
_default_hyperparam.weight_rescaling_variant = 'paper'
_default_hyperparam.lr_prev = None

# the option choices, re-exported: their home is chainerkfac.options
BN_FISHER = options.BN_FISHER
FACTOR_DTYPES = options.FACTOR_DTYPES
LOSS_REDUCTIONS = options.LOSS_REDUCTIONS
#: The section of an optimizer's serialization that holds the layers' K-FAC
#: state (``<section>/<layer name>/<factor>``, ``_scale``, ``_inv``).
STATE_SECTION = 'kfac'


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) \
        and math.isfinite(value)


def _interval(value):
    return _number(value) and int(value) == value and value >= 1


#: ``(name, test, what the value must be)`` of every hyperparameter range.
HYPERPARAMETER_RANGES = (
    ('lr', lambda v: _number(v) and v >= 0, 'a number >= 0'),
    ('momentum', lambda v: _number(v) and 0 <= v < 1, 'a number in [0, 1)'),
    ('damping', lambda v: _number(v) and v > 0, 'a number > 0'),
    ('bn_damping_ratio', lambda v: _number(v) and v > 0, 'a number > 0'),
    ('a_interval', _interval, 'an integer >= 1'),
    ('g_interval', _interval, 'an integer >= 1'),
    ('kl_clip', lambda v: v is None or (_number(v) and v > 0),
     'None or a number > 0'),
)


def check_hyperparameters(hp: optimizer.Hyperparameter) -> None:
    """Raises ValueError (one line) for the first hyperparameter out of
    its range (:data:`HYPERPARAMETER_RANGES`); called at construction and
    before every update, so that a value changed between updates is
    checked before it is used."""
    for name, test, must in HYPERPARAMETER_RANGES:
        value = getattr(hp, name)
        if not test(value):
            raise ValueError('K-FAC: {} must be {}, got {!r}'.format(
                name, must, value))


class KFACRule(optimizer.UpdateRule):
    """Eq. 17 for one parameter, then eq. 18 for a Linear/Conv weight.

    ``w(t+1) = w(t) − η·𝒢(t) + m·(w(t) − w(t−1))``, where the direction 𝒢 is
    what ``param.grad`` holds at update time (preconditioned by the optimizer
    for covered links, the raw gradient otherwise), and ``w(−1) = w(0)``.

    With ``momentum_schedule='lr_ratio'`` (the authors' published code) m
    is multiplied by η(t)/η(t−1) when the learning rate decreased.  With
    ``weight_rescaling_variant='published'`` eq. 18 only shrinks (the scale
    is min(1, sqrt(2·d_out)/‖w‖)) and the momentum excludes it: the next
    update's w(t) − w(t−1) is this update's step.

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
        momentum = hp.momentum
        if hp.momentum_schedule == 'lr_ratio' and hp.lr_prev and \
                hp.lr < hp.lr_prev:
            momentum = momentum * hp.lr / hp.lr_prev
        step = momentum * (w - w_prev) - hp.lr * grad
        w_prev[...] = w
        w += step
        if self.rescale and hp.weight_rescaling:
            xp = backend.get_array_module(w)
            norm = xp.sqrt(xp.sum(w * w))
            scale = math.sqrt(2.0 * w.shape[0]) / (norm + 1e-9)
            if hp.weight_rescaling_variant == 'published':
                w *= xp.minimum(scale, 1)  # shrink only
                w_prev[...] = w - step     # the momentum excludes it
            else:
                w *= scale


class KFAC(optimizer.GradientMethod):
    """K-FAC with the schemes of the paper (Sec. 3-4, Algorithm 1 on P = 1).

    Linear and Convolution2D links are preconditioned by their damped
    Kronecker factors, BatchNormalization links by their (diagonal or full)
    Fisher; every other parameter takes the raw gradient.  All parameters are
    updated by eq. 17 (and eq. 18 when ``weight_rescaling``).  Which links
    are covered, and why the others are not, is logged once every parameter
    is initialized (:attr:`coverage`, :mod:`chainerkfac.coverage`).

    A drop-in for Chainer's optimizers: after ``setup(model)`` every
    training backward pass through the model builds the factors that are
    due (:mod:`chainerkfac.hooks`), so ``update(lossfun, *args)`` and
    ``loss.backward(); update()`` are the same update.  Several backward
    passes before one ``update()`` average their factors; the gradients are
    used as the passes left them (Chainer adds them up).  Each gradient is
    divided by the loss scale its backward pass used (static or dynamic
    ``loss_scaling()``, as Chainer does).  Optimizer hooks see the
    preconditioned gradient 𝒢, the direction eq. 17 consumes.  A covered
    link that gets no gradient in an update keeps its factors and is
    updated as MomentumSGD would (a zero gradient: momentum only).

    Args:
        lr (float): η (≥ 0).
        momentum (float): m (in [0, 1)).
        damping (float): γ (> 0; Tikhonov damping, split between A and G
            by π).
        bn_damping_ratio (float): ρ_BN (> 0); BN layers use γ_BN = ρ_BN·γ.
        a_interval (int): A factors are rebuilt at update t when
            ``t % a_interval == 0`` (``refresh='fixed'``).
        g_interval (int): G factors and the BN Fisher likewise.
        refresh (str): ``'fixed'`` (eq. 20/21: ``a_interval`` /
            ``g_interval``) or ``'adaptive'`` (an interval per factor, set
            from its relative change; :mod:`chainerkfac.refresh`).
        refresh_tolerance (float): ``refresh='adaptive'``: the relative
            change at or below which a factor's interval doubles.
        max_interval (int): ``refresh='adaptive'``: the largest interval.
        min_interval (int): ``refresh='adaptive'``: the smallest interval
            (a new factor's, and one that changed more than the tolerance).
        fisher (str): ``'empirical'`` (eq. 3: G and the BN Fisher from the
            gradients at the data's labels) or ``'sampled'`` (from one more
            backward pass at labels sampled from the model's softmax, in
            updates where they are due; losses through one softmax of the
            model only; :mod:`chainerkfac.sampled_fisher`).
        fisher_seed (int): ``fisher='sampled'``: the seed of the labels
            (with the update number: a resumed run draws the same ones).
        weight_rescaling (bool): eq. 18 after each update.
        kl_clip (float or None): the step bound of Ba et al. (2017),
            :mod:`chainerkfac.kl_clip` (> 0); None (the paper's choice): off.
        momentum_schedule (str): ``'eq16'`` (the paper's text: m as set,
            by eq. 16 in the trainer) or ``'lr_ratio'`` (the authors'
            published code, :class:`KFACRule`).
        weight_rescaling_variant (str): ``'paper'`` or ``'published'``
            (:class:`KFACRule`).
        bn_fisher (str): ``'diagonal'`` (the paper's choice), ``'full'`` or
            ``'unit'`` (a 2 × 2 block over (γ_c, β_c) per channel, damped
            with ρ_BN·γ as the others; SP-NGD, Osawa et al. 2020).
        factor_dtype (str): ``'float32'`` or ``'float16'`` (factors built
            from and stored in half precision; inversion stays float32).
        loss_reduction (str): ``'mean'`` (the loss is the mean of per-sample
            losses) or ``'sum'``.
        accumulation_steps (int): k calls of :meth:`update` add gradients and
            factors; the k-th one updates the parameters (the gradients of
            a mean loss divided by k).
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
        exchange: what the processes exchange in an update
            (:mod:`chainerkfac.distributed.exchange`); None: one process.
            :class:`~chainerkfac.optimizers.DistributedKFAC` gives the
            MPI/NCCL one.

    Attributes:
        assignment, blocks, plan_lines: the plan of stages 3-6 (which
            process owns which block), made at the first update or by
            :meth:`plan` (None before).
        comm_counters: what this process sent
            (:class:`~chainerkfac.distributed.counters.CommCounters`).
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
                 log_coverage: bool = True,
                 kl_clip: typing.Optional[float] =
                 _default_hyperparam.kl_clip,
                 momentum_schedule: str = 'eq16',
                 weight_rescaling_variant: str = 'paper',
                 refresh: str = 'fixed', refresh_tolerance: float = 0.1,
                 max_interval: int = 20, min_interval: int = 1,
                 fisher: str = 'empirical', fisher_seed: int = 0,
                 exchange: typing.Optional[exchange_module.Exchange] = None):
        super(KFAC, self).__init__()
        errors.check_choice('bn_fisher', bn_fisher, BN_FISHER)
        errors.check_choice('factor_dtype', factor_dtype, FACTOR_DTYPES)
        errors.check_choice('loss_reduction', loss_reduction, LOSS_REDUCTIONS)
        errors.check_choice('inverse_method', inverse_method,
                            inverse_module.METHODS)
        errors.check_choice('momentum_schedule', momentum_schedule,
                            options.MOMENTUM_SCHEDULES)
        errors.check_choice('weight_rescaling_variant',
                            weight_rescaling_variant,
                            options.WEIGHT_RESCALING_VARIANTS)
        errors.check_choice('refresh', refresh, options.REFRESH)
        errors.check_choice('fisher', fisher, options.FISHER)
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
        self.hyperparam.kl_clip = kl_clip
        self.hyperparam.momentum_schedule = momentum_schedule
        self.hyperparam.weight_rescaling_variant = weight_rescaling_variant
        #: η of the last update (``momentum_schedule='lr_ratio'``)
        self.hyperparam.lr_prev = None
        check_hyperparameters(self.hyperparam)
        #: ``'fixed'`` or ``'adaptive'``
        self.refresh = refresh
        #: when each factor is rebuilt (:mod:`chainerkfac.refresh`)
        self.refresh_rule = refresh_module.make_refresh(
            refresh, self.hyperparam, refresh_tolerance, max_interval,
            min_interval)
        #: the factors (each A, G or BN Fisher of a layer counts 1) built
        #: in the updates so far: the same on every process
        self.factor_builds = 0
        #: ``'empirical'`` or ``'sampled'``
        self.fisher = fisher
        self.fisher_seed = int(fisher_seed)
        self.bn_fisher = bn_fisher
        self.factor_dtype = factor_dtype
        self.loss_reduction = loss_reduction
        self.accumulation_steps = int(accumulation_steps)
        self.inverse_method = inverse_method
        if isinstance(skip_layers, (str, type)):
            skip_layers = (skip_layers,)
        self.skip_layers = tuple(skip_layers)
        self.log_coverage = log_coverage
        self.exchange = exchange or exchange_module.Exchange()
        #: log the plan (logger ``chainerkfac.plan``, rank 0) when it is made
        self.print_plan = False
        self.kfac_layers = []
        #: :class:`chainerkfac.coverage.Coverage` of the model (at setup).
        self.coverage = None
        self._loss_check = finite.LossCheck()
        #: the :class:`chainerkfac.passes.Passes` of the update in progress
        self._passes = None
        self._plan = None
        #: ``(layer name, factor name)`` of the factors built so far (the
        #: same on every process; a process holds those it owns)
        self._built = set()
        self._loaded = False
        self._said = set()
        #: ν of the last update with ``kl_clip`` (:mod:`chainerkfac.kl_clip`)
        self.kl_clip_nu = None
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
    kl_clip = optimizer.HyperparameterProxy('kl_clip')

    # -- setup ---------------------------------------------------------------
    def setup(self, link: chainer.Link) -> 'KFAC':
        """As Chainer's ``setup``, and registers the hooks that build the
        factors in every training backward pass through ``link``."""
        if not isinstance(link, chainer.Link):
            raise TypeError('optimization target must be a link')
        self.coverage = coverage_module.plan_coverage(link, self.skip_layers)
        self.kfac_layers = self._make_layers(self.coverage)
        super(KFAC, self).setup(link)
        for layer in self.kfac_layers:
            if getattr(layer, 'rescales_weight', False):
                layer.link.W.update_rule.rescale = True
        self._passes = None
        hooks.register(self.kfac_layers, self)
        self.exchange.sync_parameters(link)
        self._report_coverage()
        return self

    def _make_layers(self, coverage):
        out = []
        for entry in coverage.covered():
            kwargs = {}
            if entry.layer_type is layers_module.BatchNormalizationLayer:
                kwargs['mode'] = self.bn_fisher
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
        """Whether this process logs reports (rank 0)."""
        return self.exchange.reports()

    @property
    def comm_counters(self) -> typing.Any:
        return self.exchange.counters

    @property
    def blocks(self) -> typing.Optional[list]:
        """The blocks of the plan (None before it is made)."""
        return None if self._plan is None else self._plan.blocks

    @property
    def assignment(self) -> typing.Any:
        """The assignment of the plan (None before it is made)."""
        return None if self._plan is None else self._plan.assignment

    @property
    def plan_lines(self) -> typing.Optional[typing.List[str]]:
        """The plan as text (None before it is made)."""
        return None if self._plan is None else self._plan.lines()

    def _say_once(self, key, message):
        """Logs ``message`` (INFO, logger ``chainerkfac``) the first time
        ``key`` comes up."""
        if key not in self._said and self._reports():
            logger.info(message)
        self._said.add(key)

    def _factor_dtype_for(self, link):
        """float16, or None: the layer follows its parameters' dtype once
        they are initialized (a float64 link keeps float64 factors)."""
        return numpy.float16 if self.factor_dtype == 'float16' else None

    def create_update_rule(self) -> KFACRule:
        return KFACRule(self.hyperparam)

    # -- stages 1-2: the passes ----------------------------------------------
    def _current_passes(self):
        """The :class:`~chainerkfac.passes.Passes` of update ``t``, begun
        at its first training forward (or at ``update()``)."""
        passes = self._passes
        if passes is None or passes.t != self.t:
            self._before_update()
            passes = self._passes = passes_module.Passes(
                self.t, self.due_factors())
        return passes

    def _before_update(self):
        """When an update's first pass begins: the exchange's turn, and
        after a load, the loaded factors settled."""
        self.exchange.begin_update()
        if self._loaded:
            self._settle_loaded()

    def tag_forward(self) -> passes_module.ForwardTag:
        """The tag of a training forward of a covered link (called by its
        :class:`~chainerkfac.hooks.ForwardHook`)."""
        return self._current_passes().tag_forward()

    def record_backward(self, layer: layers_module.Layer,
                        function: chainer.FunctionNode, in_data: tuple,
                        gy: typing.Any,
                        tag: passes_module.ForwardTag) -> None:
        """Stage 2 for one use of a covered link, in any backward pass: the
        due factors of ``layer`` from its retained inputs and output
        gradient (called by its :class:`~chainerkfac.hooks.BackwardHook`)."""
        passes = self._passes
        if passes is None or not passes.belongs(tag):
            self._say_once('stale', (
                'K-FAC: a backward pass went through link {} from a forward '
                'that ran before update {} (e.g. another model\'s loss '
                'through this model): it builds no factors').format(
                    layer.name, self.t))
            return
        if chainer.config.enable_backprop:
            self._say_once('double', (
                'K-FAC: a backward pass with enable_double_backprop=True '
                'went through link {}: it builds no factors (they come from '
                'the backward of the loss itself)').format(layer.name))
            return
        names = self._names_of_pass(layer, passes)
        built = None
        if names:
            multiplier = gy.shape[0] if self.loss_reduction == 'mean' else 1
            self._synchronize()
            start = time.perf_counter()
            built = layer.build(function, in_data, gy, multiplier, names)
            self._synchronize()
            passes.build_seconds += time.perf_counter() - start
        passes.record(layer, tag, built, cleared=not layer.has_grad())

    def _say_ignored(self):
        """One INFO line per option set but unused by the chosen mode."""
        hp = self.hyperparam
        if self.refresh == 'adaptive' and (hp.a_interval != 1
                                           or hp.g_interval != 1):
            self._say_once('intervals', (
                "K-FAC: refresh='adaptive' sets every factor's interval "
                'itself: a_interval={} and g_interval={} (e.g. from '
                "KFACSchedule's stale rule) are not used").format(
                    hp.a_interval, hp.g_interval))

    def _names_of_pass(self, layer, passes):
        """The due factors of ``layer`` a backward pass builds: all of them,
        but with ``fisher='sampled'`` those from output gradients in the
        pass at sampled labels only, and the others in the other passes."""
        names = passes.due.get(layer)
        if not names or self.fisher == 'empirical':
            return names
        return set(name for name in names
                   if layer.scales_with_loss(name) == passes.sampling)

    def sampled_backward(self, loss: chainer.Variable) -> None:
        """With ``fisher='sampled'``: the backward pass at labels sampled
        from the softmax of ``loss`` that builds the due G factors and BN
        Fishers (:mod:`chainerkfac.sampled_fisher`); the parameters'
        gradients are not touched.  ``update(lossfun, ...)`` calls it; code
        that runs its own backward calls it before ``loss.backward()``, in
        updates where :meth:`due_factors` has such a factor (it does
        nothing in the others)."""
        if self.fisher != 'sampled':
            raise RuntimeError(
                "K-FAC: sampled_backward() is for fisher='sampled' (this "
                'optimizer has fisher={!r})'.format(self.fisher))
        passes = self._current_passes()
        wanted = [p for layer, names in passes.due.items()
                  if any(layer.scales_with_loss(n) for n in names)
                  for p in layer.params if p.array is not None]
        if not wanted:
            return
        scores = sampled_fisher.model_scores(loss)
        u = sampled_fisher.uniforms(scores.node.shape[0], self.fisher_seed,
                                    self.t, passes.sampled,
                                    self.exchange.rank)
        sampled = sampled_fisher.sampled_loss(
            scores, u, self.loss_reduction == 'mean')
        loss_scale = framework.optimizer_loss_scale(self)
        with passes.sampling_pass(loss_scale):
            chainer.grad([sampled], wanted, loss_scale=loss_scale)

    # -- one iteration (Algorithm 1 with P = 1) ------------------------------
    def update(self, lossfun: typing.Optional[typing.Callable] = None,
               *args, **kwds) -> None:
        """Forward and backward (when ``lossfun`` is given), then on every
        k-th call (``accumulation_steps``) the step, :meth:`_step`.

        Algorithm 1: the due factors, stages 1-2 (forward/backward building
        them), then stages 3-6 and the update.

        Args:
            lossfun: callable returning the scalar loss; called as
                ``lossfun(*args, **kwds)``; the gradients are cleared first
                (at the first call of an accumulation).  Without it, the
                update steps on the gradients the caller's backward passes
                left, and on the factors they built, as Chainer's
                optimizers do.
        """
        self._check_set_up()
        check_hyperparameters(self.hyperparam)
        self._say_ignored()
        passes = self._current_passes()
        if lossfun is not None:
            built_before = passes.build_seconds
            with self._stage('forward_backward'):
                loss = lossfun(*args, **kwds)
                self._loss_check.record(loss.array, self.t)
                if passes.calls == 0:
                    self.target.cleargrads()
                    passes.discard()
                if self.fisher == 'sampled':
                    self.sampled_backward(loss)
                loss.backward(
                    loss_scale=framework.optimizer_loss_scale(self))
                del loss
            self.stage_seconds['forward_backward'] -= \
                passes.build_seconds - built_before
            self._report_coverage()
        passes.calls += 1
        if passes.calls < self.accumulation_steps:
            return
        self._step(passes)

    @contextlib.contextmanager
    def capture(self) -> typing.ContextManager:
        """Not needed any more: every training backward pass builds the
        factors (``loss.backward(); optimizer.update()``).  Kept for code
        written for it: the passes run inside are counted, and ``update()``
        divides the gradients of a mean loss by their number (the mean over
        the captured passes, as ``accumulation_steps`` would)::

            model.cleargrads()
            with optimizer.capture():
                loss = model(x, t)
                loss.backward()
            optimizer.update()

        Captured passes and ``accumulation_steps > 1`` do not mix.
        """
        if self.accumulation_steps > 1:
            raise RuntimeError(
                'K-FAC: capture() accumulates the passes it captures itself; '
                'use accumulation_steps=1 with it')
        self._check_set_up()
        passes = self._current_passes()
        yield
        passes.captured += 1

    def _step(self, passes):
        """The step after the passes of this update: the factors they
        built, the gradients unscaled, stages 3-6 of Algorithm 1, the
        optimizer hooks (on 𝒢) and the update rule."""
        self.stage_seconds['factors'] += passes.build_seconds
        built = list(passes.built())
        self._unscale_gradients(passes)
        if self._overflow(built):
            self._skip(passes)
            return
        self._settle_active(passes)
        due = {layer: names for layer, names in passes.due.items()
               if layer in passes.active}
        self._make_plan()
        rebuilt = [(layer, name) for layer, names in due.items()
                   for name in sorted(names)]
        primary = set(self.primary_layers())
        decided = [key for key in rebuilt if key[0] in primary]
        self.refresh_rule.keep_previous(decided)
        self._set_factors(passes, built)
        self.reallocate_cleared_grads()
        self.reduce_scatter(due)
        self.refresh_rule.decide(decided)
        self.refresh_rule.built(rebuilt, self.t)
        self.factor_builds += len(rebuilt)
        self.invert()
        self.precondition()
        self.all_gather()
        self._clip()
        self._loss_check.check()
        self.call_hooks('pre')
        with self._stage('update'):
            self.t += 1
            for param in self.target.params():
                param.update()
        self.hyperparam.lr_prev = self.hyperparam.lr
        self.reallocate_cleared_grads()
        self.call_hooks('post')
        self.update_loss_scale()
        passes.discard()  # a graph kept alive must not keep its factors
        self._passes = None
        self._report_coverage()

    def _unscale_gradients(self, passes):
        """Divides each gradient by the loss scale of its backward pass (as
        Chainer's update rules do) and, for a mean loss, by the number of
        accumulated calls or captured passes."""
        k = passes.calls * max(passes.captured, 1) \
            if self.loss_reduction == 'mean' else 1
        for param in self.target.params():
            divisor = k * (framework.loss_scale_of(param) or 1)
            # unscaled here, once: the update rule must not divide again
            framework.drop_loss_scale(param)
            if param.grad is not None and divisor != 1:
                param.grad /= divisor

    def _overflow(self, built):
        """Dynamic loss scaling: whether a gradient, or a factor built from
        output gradients (e.g. in the backward at sampled labels), is not
        finite (on any process), so that this update is skipped."""
        if not framework.dynamic_loss_scaling(self):
            return False
        arrays = [p.grad for p in self.target.params()] + [
            data for layer, name, data, _ in built
            if layer.scales_with_loss(name)]
        overflow = self.exchange.any(not finite.all_finite(arrays))
        framework.record_overflow(self, overflow)
        return overflow

    def _skip(self, passes):
        """Chainer's rule for a non-finite gradient under dynamic loss
        scaling: no parameter changes, t advances, the scale halves; the
        factors of the update are dropped."""
        if self._reports():
            logger.warning(
                'K-FAC: non-finite gradient in update %d with loss scale %g: '
                'update skipped, loss scale halved', self.t,
                framework.optimizer_loss_scale(self))
        self.t += 1
        self.update_loss_scale()
        self._passes = None

    def _settle_active(self, passes):
        """``passes.active``: the covered links that got a gradient in this
        update (the others keep their factors and step on a zero
        gradient, as MomentumSGD would)."""
        passes.active = self.exchange.agree_active(
            self.kfac_layers, set(layer for layer in self.kfac_layers
                                  if layer.has_grad()), self.t)

    def _set_factors(self, passes, built):
        """Stores the factors the passes built; an active link with a due
        factor that no pass built is an error."""
        for layer, name, data, scale in built:
            layer.set_factor(name, data, scale)
            passes.refreshed.add(layer)
            self._built.add((layer.name, name))
        if self.fisher == 'sampled':
            self._check_sampled(passes, built)
        for layer in passes.active:
            if layer in passes.due and not passes.has_built(layer):
                raise RuntimeError(
                    'K-FAC: link {} has a gradient in update {} but no '
                    'training backward pass through its forward was seen '
                    '(a forward under train=False or no_backprop_mode, one '
                    'from before the last update, only a double backward, or '
                    'its parameters used outside its forward): its factors '
                    'cannot be built; keep it on the raw gradient with '
                    'skip_layers=[{!r}]'.format(layer.name, self.t,
                                                layer.name))

    def _check_sampled(self, passes, built):
        """``fisher='sampled'``: an active link seen in a backward pass
        whose output-gradient factors are due but were not built by a pass
        at sampled labels is one error line saying why."""
        made = set((layer, name) for layer, name, _, _ in built)
        for layer in self.kfac_layers:
            missing = [name for name in sorted(passes.due.get(layer, ()))
                       if layer.scales_with_loss(name)
                       and (layer, name) not in made]
            if not missing or layer not in passes.active or \
                    layer not in passes.seen:
                continue
            if not passes.sampled:
                raise RuntimeError(
                    "K-FAC: fisher='sampled': factor {} of link {} is due in "
                    'update {} but no backward pass at sampled labels ran: '
                    'call optimizer.sampled_backward(loss) before '
                    'loss.backward(), or optimizer.update(lossfun, ...)'
                    .format(', '.join(missing), layer.name, self.t))
            raise RuntimeError(
                "K-FAC: fisher='sampled': the backward pass at sampled labels "
                'did not reach link {} (it does not feed the softmax of the '
                "loss): keep it on the raw gradient with skip_layers=[{!r}] "
                "or use fisher='empirical'".format(layer.name, layer.name))

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
                or self._interval_due(layer, name))
            if names:
                due[layer] = names
        return due

    def _interval_due(self, layer, name):
        """Whether factor ``name`` of ``layer`` is due at update ``t`` by
        its refresh rule (eq. 20/21's stale factors, or adaptive)."""
        return self.refresh_rule.due(layer, name, self.t)

    def _has_built(self, layer, name):
        """Whether factor ``name`` of ``layer`` has been built: the same on
        every process (a process holds the factors it owns only)."""
        return (layer.name, name) in self._built

    # -- the plan and stages 3, 6 --------------------------------------------
    def plan(self) -> typing.Any:
        """The layer assignment (:attr:`assignment`), made now if it is not
        yet.  Call it on every process; the model's parameters must be
        initialized (the first update makes it otherwise)."""
        if self._plan is None:
            if any(p.array is None
                   for p in self.target.params(include_uninit=True)):
                raise RuntimeError(
                    'K-FAC: the layer assignment needs initialized '
                    'parameters (run one forward pass first)')
            self._make_plan()
        return self.assignment

    def _make_plan(self):
        """The plan of the blocks, once (at :meth:`plan`, or in the first
        update after its passes, before stage 3), agreed by every
        process."""
        if self._plan is not None:
            return
        plan = plan_module.make_plan(self.kfac_layers, self.target,
                                     self.exchange.size)
        self.exchange.agree_plan(plan)
        self._plan = plan
        if self.print_plan and self._reports():
            plan_logger.info('\n'.join(plan.lines()))

    def owned_layers(self) -> list:
        """The K-FAC layers this process inverts and preconditions."""
        if self._plan is None:
            return []
        return self._plan.layers_of(self.exchange.rank)

    def primary_layers(self) -> list:
        """The K-FAC layers whose factors this process reports: those it is
        the primary owner of (one process per layer)."""
        if self._plan is None:
            return []
        return self._plan.primary_layers_of(self.exchange.rank)

    def reduce_scatter(self, due: dict) -> None:
        """Stage 3: the averaged gradients and ``due`` factors (``{layer:
        names}``) onto their owners; the others forget them."""
        with self._stage('reduce_scatter'):
            pieces = self._factor_pieces(due)
            self.exchange.reduce_scatter(
                self._plan, pieces, self.loss_reduction == 'mean',
                self.target.xp)
            owned = set(self.owned_layers())
            for layer in due:
                if layer not in owned:
                    layer.drop_factors()

    def _factor_pieces(self, due):
        """The :class:`~chainerkfac.distributed.layout.FactorPiece` s of the
        due factors, in plan order, checked present."""
        out = []
        for layer, names in due.items():
            block = self._plan.block_of(layer)
            for name in sorted(names):
                if layer.state.get(name) is None:
                    raise RuntimeError(
                        'K-FAC: factor {} of link {} is due but was not built '
                        'on rank {}: every K-FAC link must be called in the '
                        'forward pass on every rank'.format(
                            name, layer.name, self.exchange.rank))
                out.append(layout.FactorPiece(block, name))
        return tuple(sorted(out, key=lambda p: (p.block.index, p.name)))

    def all_gather(self) -> None:
        """Stage 6: every process gets every block's preconditioned gradient
        from its primary owner."""
        with self._stage('all_gather'):
            self.exchange.all_gather(self._plan, self.target.xp,
                                     self.refresh_rule.pieces)
        self.exchange.report(self.target)

    def _active_owned(self):
        """The layers this process owns that got a gradient in this update."""
        return [layer for layer in self.owned_layers()
                if layer in self._passes.active]

    def invert(self) -> None:
        """Stage 4: the damped inverses (Cholesky factors, reciprocals) of
        the owned layers whose factors were refreshed in this update."""
        hp = self.hyperparam
        refreshed = self._passes.refreshed
        with self._stage('inverse'):
            layers_module.compute_inverses(
                [layer for layer in self._active_owned()
                 if layer in refreshed or not layer.has_inverses()],
                hp.damping, hp.bn_damping_ratio)

    def precondition(self) -> None:
        """Stage 5: 𝒢_l = G_l⁻¹ ∇L_l A_{l-1}⁻¹ (Sec. 3) for the owned
        layers, (F + γ_BN·I)⁻¹ ∇ for BatchNormalization (Sec. 5.4); with
        ``kl_clip``, Σ 𝒢·∇L over the layers this process reports."""
        method = inverse_module.resolve_method(self.inverse_method,
                                               self.target.xp)
        measure = self.hyperparam.kl_clip is not None
        primary = set(self.primary_layers()) if measure else set()
        passes = self._passes
        with self._stage('precondition'):
            for layer in self._active_owned():
                raw = [p.grad.copy() for p in layer.params] \
                    if layer in primary else None
                layer.precondition(method)
                if raw is not None:
                    for p, g in zip(layer.params, raw):
                        passes.add_inner_product(
                            kl_clip_module.inner_product(p.grad, g))

    def _clip(self):
        """With ``kl_clip``: 𝒢 of every K-FAC layer scaled by ν
        (:func:`chainerkfac.kl_clip.nu`)."""
        hp = self.hyperparam
        if hp.kl_clip is None:
            return
        passes = self._passes
        vg = passes.inner_product
        if vg is None:
            vg = self.target.xp.zeros((), numpy.float32)
        nu = kl_clip_module.nu(self.exchange.sum(vg), hp.lr, hp.kl_clip)
        self.kl_clip_nu = nu
        for layer in self.kfac_layers:
            if layer in passes.active:
                for p in layer.params:
                    p.grad *= nu.astype(p.grad.dtype)

    # -- snapshots -----------------------------------------------------------
    #: The section of :meth:`serialize` holding each layer's K-FAC state
    #: under the layer's name: a snapshot keeps each layer's from the
    #: process that holds it (:mod:`chainerkfac.training.snapshot.partition`).
    layer_state_section = STATE_SECTION

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        """Saves or loads t, w(t−1), the factors and their inverses, and
        which factors have been built.

        A process holds the factors (with their scales and damped inverses)
        of the layers it owns only, so its serialization holds those:
        :mod:`chainerkfac.training.snapshot` writes every owner's and gives
        each process those of the layers it owns when loading, also on
        another number of processes.  The first update after a load keeps
        every loaded factor and inverse (a factor is rebuilt when its
        interval says so, as in a run that never stopped), except a built
        factor that one of its owners lacks (e.g. every process loaded the
        same process's file): that one is rebuilt in that update, on every
        process (one WARNING says so when that is early).
        """
        super(KFAC, self).serialize(serializer)
        loading = isinstance(serializer, chainer.serializer.Deserializer)
        if loading:
            self._passes = None  # the passes of an update that never was
        kfac = serializer[STATE_SECTION]
        for layer in self.kfac_layers:
            layer.serialize(kfac[layer.name])
        if self.refresh == 'adaptive':
            self.refresh_rule.serialize(serializer['refresh'])
        if not loading:
            serializer('factor_builds', self.factor_builds)
            serializer('built_factors', numpy.array(
                sorted('{}:{}'.format(*key) for key in self._built),
                dtype=numpy.str_))
            if self.hyperparam.momentum_schedule == 'lr_ratio':
                serializer('lr_prev', numpy.array(
                    numpy.nan if self.hyperparam.lr_prev is None
                    else self.hyperparam.lr_prev))
            return
        try:
            self.factor_builds = int(serializer('factor_builds', None))
        except (KeyError, TypeError):  # not recorded
            pass
        if self.hyperparam.momentum_schedule == 'lr_ratio':
            try:
                lr_prev = float(serializer('lr_prev', None))
            except (KeyError, TypeError):  # not recorded
                lr_prev = float('nan')
            self.hyperparam.lr_prev = None if math.isnan(lr_prev) \
                else lr_prev
        try:
            built = serializer('built_factors', None)
        except KeyError:  # not recorded: the factors the state holds
            built = None
        if built is None:
            self._built = set(
                (layer.name, name) for layer in self.kfac_layers
                for name in layer.factor_names
                if layer.state.get(name) is not None)
        else:
            self._built = set(tuple(str(key).rsplit(':', 1))
                              for key in numpy.asarray(built).ravel())
        self._loaded = True

    def _settle_loaded(self):
        """First update after a load: drop the factors of layers this
        process does not own, and mark as not built (due now, on every
        process) the built factors some owner lacks."""
        self.plan()
        owned = set(self.owned_layers())
        missing = []
        for layer in self.kfac_layers:
            if layer not in owned:
                layer.drop_factors()
                continue
            missing.extend(
                (layer.name, name) for name in layer.factor_names
                if (layer.name, name) in self._built
                and layer.state.get(name) is None)
        missing = set(self.exchange.union(missing))
        self._warn_rebuilt_early(missing)
        self._built.difference_update(missing)
        self._loaded = False

    def _warn_rebuilt_early(self, missing):
        """One WARNING (rank 0) when factors missing from the loaded state
        are rebuilt before their interval says: the run then does not
        continue exactly as one that never stopped."""
        early = [(layer.name, name) for layer in self.kfac_layers
                 for name in layer.factor_names
                 if (layer.name, name) in missing
                 and not self._interval_due(layer, name)]
        if early and self._reports():
            logger.warning(
                'K-FAC: %d of the %d factors built so far are in no loaded '
                'state of a process that owns them (every process loaded '
                'one process\'s file?): they are rebuilt in update %d, '
                'before their interval says, so the run does not continue '
                'exactly; to resume exactly, save and load every process\'s '
                'state (chainermn.create_multi_node_checkpointer, or '
                'chainerkfac-train\'s snapshots)', len(early),
                len(self._built), self.t)

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
