"""The forward/backward passes of the update in progress (stages 1-2).

After ``optimizer.setup(model)`` every training backward pass through a
covered link builds the link's due factors, whoever runs it: the optimizer
(``update(lossfun, ...)``) or the caller (``loss.backward(); update()``).
:class:`Passes` holds what those passes leave until the update that consumes
them: the due factors, the factors built so far, which links were seen, how
many ``update()`` calls were accumulated.  The optimizer makes a new one for
every update; nothing of it outlives the update.

A *pass* is one backward pass; the uses of a link between two backward
passes (an RNN unrolled over time, a link applied to several inputs) are one
pass's uses, combined by the layer (:meth:`~chainerkfac.layers.Layer.
combine_uses`).  The factors of several passes are averaged (the curvature
of a mean loss over more samples), as ``accumulation_steps`` does.

Output-gradient factors (G, the BN Fisher) are built from gradients scaled
by the loss scale of their backward pass; when the pass is closed they are
divided by the square of that scale (the one Chainer records on the
parameters), so the factors never depend on the loss scale.
"""

import contextlib
import typing

from chainerkfac import factors as factors_module
from chainerkfac import framework


class PendingFactor(object):
    """A factor of one or more passes: the first pass's ``(data, scale)``
    as built, then (from the second pass on) the running dense sum."""

    def __init__(self, pair):
        self.pair = pair
        self.total = None
        self.count = 1

    def add(self, pair: tuple) -> None:
        if self.total is None:
            self.total = factors_module.dense(*self.pair)
        self.total = self.total + factors_module.dense(*pair)
        self.count += 1

    def mean(self, dtype: typing.Any) -> tuple:
        """``(data, scale)`` of the mean over the passes."""
        if self.total is None:
            return self.pair
        return factors_module.quantize(self.total / self.count, dtype)


class ForwardTag(object):
    """What a covered link's training forward is tagged with: the
    :class:`Passes` it belongs to and its pass number there."""

    __slots__ = ('passes', 'number')

    def __init__(self, passes, number):
        self.passes = passes
        self.number = number


class Passes(object):
    """The passes of one update.

    Args:
        t: the number of the update they belong to (the optimizer's ``t``).
        due: ``{layer: set of factor names}`` built in this update.

    Attributes:
        calls: ``update()`` calls accumulated so far (``accumulation_steps``).
        captured: passes run inside ``optimizer.capture()``.
        seen: the layers whose backward was recorded.
        build_seconds: wall seconds spent building factors.
        active: the covered links with a gradient (set at the step).
        refreshed: the layers whose factors were set at the step.
        inner_product: Σ 𝒢·∇L of the layers this process preconditions
            (``kl_clip``), or None.
        sampling: whether the backward pass being run is the one at
            sampled labels (``fisher='sampled'``).
        sampled: the passes at sampled labels run so far.
        sampled_seen: the layers a pass at sampled labels went through.
    """

    def __init__(self, t: int, due: dict):
        self.t = t
        self.due = due
        self.calls = 0
        self.captured = 0
        self.seen = set()
        self.build_seconds = 0.0
        self.active = set()
        self.refreshed = set()
        self.inner_product = None
        self.sampling = False
        self.sampled = 0
        self.sampled_seen = set()
        self._sampling_scale = None
        self._forwards = 0         # the pass number of the next forward
        self._recording = 0        # the pass number being recorded
        self._backward_seen = False  # a backward since the last forward
        # {layer: [({name: pair}, loss scale or None)]} of this pass
        self._uses = {}
        self._pending = {}         # {(layer, name): PendingFactor}

    # -- forward -------------------------------------------------------------
    def tag_forward(self) -> ForwardTag:
        """The tag of a training forward of a covered link: a forward that
        follows a backward starts the next pass."""
        if self._backward_seen:
            self._forwards += 1
            self._backward_seen = False
        return ForwardTag(self, self._forwards)

    # -- backward ------------------------------------------------------------
    @contextlib.contextmanager
    def sampling_pass(self, loss_scale: typing.Optional[float]
                      ) -> typing.Iterator[None]:
        """The backward pass at sampled labels, run inside with
        ``loss_scale``: one of the passes of the forward before it, whose
        factors it completes (unscaled by its own loss scale, whatever the
        other backward of that forward uses)."""
        self.sampling = True
        self._sampling_scale = 1.0 if loss_scale is None else loss_scale
        try:
            yield
        finally:
            self.sampling = False
            self.sampled += 1

    def belongs(self, tag: ForwardTag) -> bool:
        """Whether a backward through a node tagged ``tag`` is one of this
        update's passes (its forward ran in this update)."""
        return tag.passes is self

    def record(self, layer: typing.Any, tag: ForwardTag,
               built: typing.Optional[dict], cleared: bool = False) -> None:
        """A backward through one use of ``layer`` (its factors ``built``,
        ``{name: (data, scale)}``, or None when none is due).

        ``cleared``: the layer's gradients were cleared since its last
        backward (``cleargrads()``): the factors of its earlier passes go
        with them, as the factors follow the gradients."""
        self._backward_seen = True
        if tag.number != self._recording:  # the next pass
            self.close_pass()
            self._recording = tag.number
        if cleared:
            for key in [key for key in self._pending if key[0] is layer]:
                del self._pending[key]
        self.seen.add(layer)
        if self.sampling:
            self.sampled_seen.add(layer)
        if built:
            self._uses.setdefault(layer, []).append(
                (built, self._sampling_scale if self.sampling else None))

    def close_pass(self) -> None:
        """Adds the factors of the pass being recorded to the pending ones,
        unscaled by the loss scale of its backward pass."""
        for layer, all_uses in self._uses.items():
            recorded = framework.loss_scale_of(layer.param)
            # a backward builds some factors of each use (with
            # fisher='sampled', two backward passes complete them)
            for name in dict.fromkeys(n for u, _ in all_uses for n in u):
                uses = []
                for built, loss_scale in all_uses:
                    if name not in built:
                        continue
                    pair = built[name]
                    if loss_scale is None:
                        loss_scale = recorded
                    if loss_scale is not None and loss_scale != 1 and \
                            layer.scales_with_loss(name):
                        pair = factors_module.unscaled(pair, loss_scale)
                    uses.append(pair)
                if len(uses) == 1:
                    pair = uses[0]
                else:  # a link used several times in the pass
                    pair = factors_module.quantize(layer.combine_uses(
                        name, [factors_module.dense(*u) for u in uses]),
                        layer.factor_dtype)
                pending = self._pending.get((layer, name))
                if pending is None:
                    self._pending[(layer, name)] = PendingFactor(pair)
                else:
                    pending.add(pair)
        self._uses = {}

    def discard(self) -> None:
        """Forgets the passes recorded so far (``update(lossfun)`` clears
        the gradients of earlier backward passes, and their factors)."""
        self._uses = {}
        self._pending = {}
        self.seen = set()

    # -- the step ------------------------------------------------------------
    def built(self) -> typing.Iterator[tuple]:
        """``(layer, name, data, scale)`` of every factor built in this
        update: the mean over its passes."""
        self.close_pass()
        for (layer, name), pending in self._pending.items():
            data, scale = pending.mean(layer.factor_dtype)
            yield layer, name, data, scale

    def add_inner_product(self, value: typing.Any) -> None:
        self.inner_product = value if self.inner_product is None else \
            self.inner_product + value

    def has_built(self, layer: typing.Any) -> bool:
        """Whether a pass of this update built factors of ``layer``."""
        return layer in self._uses or any(
            key[0] is layer for key in self._pending)
