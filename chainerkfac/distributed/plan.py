"""The plan of distributed K-FAC: blocks, their costs and their owners.

Stages 3-6 of Algorithm 1 (Osawa et al. 2019, Sec. 3.3) move *blocks*: a
K-FAC layer (its gradient and its factors A, G or the BN Fisher), or the
pseudo-block ``'(other)'`` of the parameters outside every K-FAC layer
(gradient only, preconditioned by the identity).  The plan gives every block
a cost (:func:`chainerkfac.distributed.assignment.layer_cost`, the FLOPs of
stages 4-5 on its owner) and owners
(:func:`chainerkfac.distributed.assignment.assign`).

The plan is a function of the layers and the number of processes only, so
:class:`~chainerkfac.optimizers.DistributedKFAC` and the scripts that print
or model it (``scripts/plan_assignment.py``, ``scripts/bench_distributed.py``)
make the same one with :func:`make_plan`.
"""

import typing
from typing import List, Sequence

from chainerkfac.distributed import assignment as assignment_module

#: Name of the pseudo-block of the parameters outside K-FAC layers.
OTHER_BLOCK_NAME = '(other)'


class Block(object):
    """A unit of the plan: a K-FAC layer, or the parameters of no layer.

    Attributes:
        index (int): its position in the plan (the assignment's layer index).
        name (str): the layer name, or ``'(other)'``.
        layer: the :class:`~chainerkfac.layers.Layer`, or None for the
            pseudo-block (identity preconditioning).
        params (list): the parameters whose gradients it carries.
    """

    def __init__(self, index: int, name: str, layer, params) -> None:
        self.index = index
        self.name = name
        self.layer = layer
        self.params = list(params)

    def cost(self) -> float:
        """FLOPs of stages 4-5 for a layer; for the pseudo-block, the number
        of values it carries (it is copied, not inverted)."""
        if self.layer is not None:
            return assignment_module.layer_cost(self.layer.factor_shapes())
        return float(sum(p.size for p in self.params))

    def __repr__(self) -> str:
        return '<Block {}>'.format(self.name)


class Plan(object):
    """The blocks of a model and the processes that own them.

    Attributes:
        blocks (list): the :class:`Block` s, K-FAC layers in layer order,
            then ``'(other)'`` when some parameters are outside them.
        costs (list): ``blocks[i].cost()``.
        assignment: the :class:`~chainerkfac.distributed.assignment.
            Assignment` of the blocks.
    """

    def __init__(self, blocks: Sequence[Block], costs: Sequence[float],
                 assignment: assignment_module.Assignment) -> None:
        self.blocks = list(blocks)
        self.costs = list(costs)
        self.assignment = assignment
        self._block_of = {id(b.layer): b for b in self.blocks
                          if b.layer is not None}

    @property
    def names(self) -> List[str]:
        return [b.name for b in self.blocks]

    @property
    def size(self) -> int:
        return self.assignment.size

    def block_of(self, layer: typing.Any) -> Block:
        """The block of a K-FAC layer."""
        return self._block_of[id(layer)]

    def owned_blocks(self, rank: int) -> List[Block]:
        """The blocks ``rank`` owns (stage 3 lands them there)."""
        return [self.blocks[i] for i in self.assignment.layers_of(rank)]

    def primary_blocks(self, rank: int) -> List[Block]:
        """The blocks stage 6 takes from ``rank``."""
        return [self.blocks[i]
                for i in self.assignment.primary_layers_of(rank)]

    def layers_of(self, rank: int) -> list:
        """The K-FAC layers ``rank`` inverts and preconditions."""
        return [b.layer for b in self.owned_blocks(rank)
                if b.layer is not None]

    def primary_layers_of(self, rank: int) -> list:
        """The K-FAC layers ``rank`` is the primary owner of."""
        return [b.layer for b in self.primary_blocks(rank)
                if b.layer is not None]

    def signature(self) -> tuple:
        """What every rank must agree on."""
        return (tuple(self.names), self.assignment.owners,
                self.assignment.primary)

    def lines(self) -> List[str]:
        """The plan as text
        (:func:`~chainerkfac.distributed.assignment.format_plan`)."""
        return assignment_module.format_plan(self.assignment, self.names,
                                             self.costs)


def make_blocks(layers: Sequence, link: typing.Any) -> List[Block]:
    """The blocks of ``link``: one per K-FAC layer (in their order), then
    ``'(other)'`` with the initialized parameters of no layer, if any."""
    covered = set(id(p) for layer in layers for p in layer.params)
    blocks = [Block(i, layer.name, layer, layer.params)
              for i, layer in enumerate(layers)]
    other = [p for _, p in link.namedparams(include_uninit=False)
             if id(p) not in covered]
    if other:
        blocks.append(Block(len(blocks), OTHER_BLOCK_NAME, None, other))
    return blocks


def assign_blocks(blocks: Sequence[Block], size: int, redundant: bool = False,
                  improve: bool = True) -> Plan:
    """The plan of ``blocks`` on ``size`` processes (the options of
    :func:`~chainerkfac.distributed.assignment.assign`)."""
    costs = [b.cost() for b in blocks]
    assignment = assignment_module.assign(costs, size, redundant=redundant,
                                          improve=improve)
    return Plan(blocks, costs, assignment)


def make_plan(layers: Sequence, link: typing.Any, size: int,
              redundant: bool = False, improve: bool = True) -> Plan:
    """The plan of the K-FAC ``layers`` of ``link`` (e.g. an optimizer's
    ``kfac_layers`` and ``target``) on ``size`` processes."""
    return assign_blocks(make_blocks(layers, link), size,
                         redundant=redundant, improve=improve)
