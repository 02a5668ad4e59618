"""The Fisher at labels sampled from the model (``fisher='sampled'``).

Eq. 3 of Osawa et al. (2019) builds the Fisher from the gradients at the
data's labels: the *empirical* Fisher.  The Fisher itself is the expectation
over labels drawn from the model's predictive distribution,

    F = E_x E_{ỹ ~ p(y|x; θ)} [∇ log p(ỹ|x; θ) ∇ log p(ỹ|x; θ)ᵀ],

which K-FAC estimates with one sampled label per example (Martens & Grosse,
2015; SP-NGD, Osawa et al. 2020).  With ``fisher='sampled'`` the factors
built from output gradients (G, the BN Fisher) come from one extra backward
pass of the loss at sampled labels ỹ_i ~ softmax(z_i), through the forward
pass already run; the input factors (A) and the gradient still come from the
loss at the data's labels.  The extra backward runs only in updates where a
G factor or BN Fisher is due.

Labels are drawn by inverse transform sampling from uniforms of a NumPy
generator seeded with ``(seed, t, pass)``; process r of P takes the values
``r·n .. (r+1)·n − 1`` of that stream, so P processes with n examples each
draw the labels one process draws for the joint batch of P·n.

The model's distribution is the softmax of the scores z that the loss's
graph feeds to ``chainer.functions.softmax_cross_entropy`` (without class
weights) or to ``chainer.functions.log_softmax`` (a soft-target loss, e.g.
mixup's): exactly one such z, of shape (n, classes).
"""

import typing

import numpy

import chainer
import chainer.functions as F
from chainer.functions.activation import log_softmax as log_softmax_module
from chainer.functions.loss import softmax_cross_entropy as sce_module


class SampledFisherError(ValueError):
    """The loss defines no model distribution to sample labels from."""


class Scores(typing.NamedTuple):
    """The model's softmax in a loss's graph: its scores z (the input of a
    softmax cross-entropy) or its log-probabilities log softmax(z) (the
    output of ``F.log_softmax``).

    Attributes:
        node: that (n, classes) variable node.
        log_probs: whether ``node`` holds log softmax(z) (else z).
        labels: the data's labels of a softmax cross-entropy, or None.
        ignore_label: rows with this label stay out (``labels`` given).
    """

    node: typing.Any
    log_probs: bool
    labels: typing.Any
    ignore_label: int


def _softmax_inputs(loss):
    """``{id(scores node): Scores}`` of the softmax cross-entropy and
    log-softmax nodes of ``loss``'s graph."""
    found, seen = {}, set()
    stack = [loss.creator_node]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, sce_module.SoftmaxCrossEntropy):
            if node.class_weight is not None:
                raise SampledFisherError(
                    "K-FAC: fisher='sampled' takes the model's distribution "
                    'from an unweighted softmax cross-entropy; this one has '
                    'class_weight')
            found.setdefault(id(node.inputs[0]), Scores(
                node.inputs[0], False, node.inputs[1].data,
                node.ignore_label))
            continue
        if isinstance(node, log_softmax_module.LogSoftmax):
            # its output is retained (its input need not be)
            found.setdefault(id(node.inputs[0]),
                             Scores(node.outputs[0](), True, None, -1))
            continue
        stack.extend(x.creator_node for x in node.inputs)
    return found


def model_scores(loss: chainer.Variable) -> Scores:
    """The scores of the one softmax in ``loss``'s graph: the input of its
    ``F.softmax_cross_entropy`` (or of the ``F.log_softmax`` of a
    soft-target loss, e.g. mixup's); raises :class:`SampledFisherError`
    (one line) for none, several, or one not covered."""
    found = list(_softmax_inputs(loss).values())
    if len(found) != 1:
        raise SampledFisherError(
            "K-FAC: fisher='sampled' needs a loss through exactly one "
            'softmax of the model (F.softmax_cross_entropy, or F.log_softmax '
            'in a soft-target loss), which defines the distribution to '
            'sample labels from; this loss has {}: use '
            "fisher='empirical'".format(len(found)))
    scores = found[0]
    if len(scores.node.shape) != 2:
        raise SampledFisherError(
            "K-FAC: fisher='sampled' samples one label per row of (n, "
            'classes) scores; this loss\'s softmax has scores of shape '
            '{}'.format(scores.node.shape))
    return scores


def uniforms(n: int, seed: int, t: int, number: int,
             rank: int) -> numpy.ndarray:
    """The n uniforms in [0, 1) of process ``rank`` for pass ``number`` of
    update ``t`` (see the module's docstring)."""
    stream = numpy.random.default_rng([int(seed), int(t), int(number)])
    return stream.random((rank + 1) * n)[rank * n:]


def sample_labels(scores: typing.Any, u: typing.Any) -> typing.Any:
    """ỹ_i ~ softmax(scores_i) by inverse transform of ``u_i`` (int32, on
    the scores' device)."""
    xp = chainer.backend.get_array_module(scores)
    scores = scores.astype(numpy.float64)
    p = xp.exp(scores - scores.max(axis=1, keepdims=True))
    cdf = xp.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    labels = (cdf < xp.asarray(u)[:, None]).sum(axis=1)
    return xp.minimum(labels, scores.shape[1] - 1).astype(numpy.int32)


def sampled_loss(scores: Scores, u: typing.Any,
                 mean: bool) -> chainer.Variable:
    """The loss at labels sampled from the softmax of ``scores``, through
    their graph: the sum over the examples of −log p(ỹ_i|x_i), divided by n
    for a mean-reduced loss (rows with the ignored label stay out)."""
    z = scores.node.get_variable()
    xp = chainer.backend.get_array_module(z.array)
    labels = sample_labels(z.array, u)  # softmax(log softmax(z)) = p too
    if scores.labels is not None:
        labels = xp.where(scores.labels == scores.ignore_label,
                          scores.labels, labels)
    labels = labels.astype(numpy.int32)
    if scores.log_probs:
        each = -F.select_item(z, labels)
    else:
        each = F.softmax_cross_entropy(z, labels, reduce='no',
                                       ignore_label=scores.ignore_label)
    total = F.sum(each)
    return total / z.shape[0] if mean else total
