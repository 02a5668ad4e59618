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

Only a softmax cross-entropy loss defines the model's distribution here
(``chainer.functions.softmax_cross_entropy`` over (n, classes) scores,
without class weights): the loss's graph must hold exactly one.
"""

import typing

import numpy

import chainer
import chainer.functions as F
from chainer.functions.loss import softmax_cross_entropy as sce_module


class SampledFisherError(ValueError):
    """The loss defines no model distribution to sample labels from."""


def softmax_cross_entropy_node(loss: chainer.Variable
                               ) -> sce_module.SoftmaxCrossEntropy:
    """The one ``softmax_cross_entropy`` node of ``loss``'s graph (raises
    :class:`SampledFisherError`, one line, for none, several, or one not
    covered)."""
    found, seen = [], set()
    stack = [loss.creator_node]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, sce_module.SoftmaxCrossEntropy):
            found.append(node)
            continue
        stack.extend(x.creator_node for x in node.inputs)
    if len(found) != 1:
        raise SampledFisherError(
            "K-FAC: fisher='sampled' needs a loss with exactly one "
            'softmax cross-entropy (F.softmax_cross_entropy), which defines '
            'the model\'s distribution to sample labels from; this loss has '
            '{}: use fisher=\'empirical\''.format(len(found)))
    node = found[0]
    scores = node.inputs[0]
    if len(scores.shape) != 2:
        raise SampledFisherError(
            "K-FAC: fisher='sampled' samples one label per row of (n, "
            'classes) scores; this softmax cross-entropy has scores of shape '
            '{}'.format(scores.shape))
    if node.class_weight is not None:
        raise SampledFisherError(
            "K-FAC: fisher='sampled' takes the model's distribution from an "
            'unweighted softmax cross-entropy; this one has class_weight')
    return node


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


def sampled_loss(node: sce_module.SoftmaxCrossEntropy, u: typing.Any,
                 mean: bool) -> chainer.Variable:
    """The loss at labels sampled from ``node``'s softmax, through its
    scores' graph: the sum over the examples of −log p(ỹ_i|x_i), divided by
    n for a mean-reduced loss (rows with the ignored label stay out)."""
    scores = node.inputs[0].get_variable()
    t = node.inputs[1].data
    xp = chainer.backend.get_array_module(scores.array)
    labels = sample_labels(scores.array, u)
    labels = xp.where(t == node.ignore_label, t, labels).astype(t.dtype)
    each = F.softmax_cross_entropy(scores, labels, reduce='no',
                                   ignore_label=node.ignore_label)
    total = F.sum(each)
    return total / scores.shape[0] if mean else total
