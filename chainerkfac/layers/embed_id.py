"""K-FAC block of ``chainer.links.EmbedID``.

An embedding is a Linear on one-hot inputs: with tokens t of sample i
(``ignore_label`` tokens left out), a = e_id and ∇W = Σ_t e_{id_t} g_tᵀ, so

    A = Σ_i Σ_t e e ᵀ / n = diag(token counts) / n   (diagonal: vocab values)
    G = Σ_i Σ_t g gᵀ / (n·T)                         (dim × dim, T tokens
                                                       per sample)

A costs nothing to invert (a reciprocal) and G is small: 𝒢 = Ā⁻¹ ∇W Ḡ⁻¹
(W's rows are the vocabulary: the input side).  A token absent from the
batch has a zero gradient row, which stays zero.
"""

import typing

import chainer
from chainer import backend
import chainer.functions.connection.embed_id as embed_function
import chainer.links as L
from chainer.types import NdArray

from chainerkfac import factors
from chainerkfac.layers import base


class EmbedIDLayer(base.Layer):
    """A = diag(counts) / n (kept as its diagonal), G = Σ g gᵀ / (n·T)."""

    link_type = L.EmbedID
    function_type = embed_function.EmbedIDFunction
    factor_names = ('A', 'G')
    intervals = {'A': 'a_interval', 'G': 'g_interval'}
    summed_over_uses = 'A'

    @property
    def params(self) -> list:
        return [self.link.W]

    def factor_shapes(self) -> dict:
        vocab, dim = self.link.W.shape
        return {'A': (vocab,), 'G': (dim, dim)}

    def _tokens(self, function, ids):
        ids = ids.reshape(-1)
        if function.ignore_label is None:
            return ids, None
        keep = ids != function.ignore_label
        return ids[keep], keep

    def build(self, function: chainer.FunctionNode, in_data: tuple,
              gy: NdArray, multiplier: float, names: typing.Iterable) -> dict:
        ids = in_data[0]
        n = ids.shape[0]
        xp = backend.get_array_module(ids)
        tokens, keep = self._tokens(function, ids)
        out = {}
        cdtype = factors.compute_dtype(gy.dtype)
        if 'A' in names:
            counts = xp.bincount(tokens, minlength=self.link.W.shape[0])
            out['A'] = factors.quantize(counts.astype(cdtype) / n,
                                        self.factor_dtype)
        if 'G' in names:
            g = gy.reshape(-1, gy.shape[-1])
            if keep is not None:
                g = g[keep]
            per_sample = ids.size // n
            data, scale = factors.second_moment(g.T, n * per_sample,
                                                self.factor_dtype)
            out['G'] = data, factors.times(scale, multiplier * multiplier)
        return out

    def damped_blocks(self, damping: float,
                      bn_damping_ratio: float) -> dict:
        a, g = self.damped_pair(damping)  # a diagonal A
        return {'A': a, 'G': g}

    def precondition(self, method: str = 'solve') -> None:
        """𝒢 = Ā⁻¹ ∇W Ḡ⁻¹ (Ā diagonal)."""
        w = self.link.W
        a_inv = self.state['A_inv']
        x = self.apply_inverse('G', w.grad.T, method)
        w.grad[...] = a_inv[:, None].astype(x.dtype, copy=False) * x.T
