"""Assignment of K-FAC layers to processes (Sec. 3.3, stages 3-6).

Each process *owns* some layers: after the ReduceScatterV of stage 3 it holds
their summed factors, inverts them and preconditions their gradients
(stages 4-5); the AllGatherV of stage 6 takes each layer's preconditioned
gradient from one of its owners, its *primary*.

The work of a layer is modelled by :func:`layer_cost` (the FLOPs of its
Cholesky factorizations and triangular solves).  :func:`assign` balances
these costs over ``size`` processes:

* ``size <= #layers``: greedy longest-processing-time (LPT: layers by cost
  descending, ties by index; each to the least-loaded process, ties by
  lowest rank), followed by a local improvement pass (move or swap layers
  off a most-loaded process while that strictly lowers the pair's maximum).
  Every process owns at least one layer.
* ``size > #layers``: one owner per layer, each layer on its own process,
  the owners spread evenly over the ranks (layer k of n on rank
  ⌊k·size/n⌋); the other processes own nothing.  Stages 4-5 then take as
  long as the largest layer, the lower bound (ratio 1), and the bytes of
  stages 3 and 6 are those of P = #layers, whatever the number of
  processes.
* ``size > #layers`` with ``redundant=True``: the paper's "layers <
  processes" layout, for comparison: layers are computed redundantly so
  that no process is idle.  Every process owns exactly one layer; the
  ``size`` owner slots are shared out over the layers by the
  highest-averages (D'Hondt) rule on the costs (the costliest layers get
  the most replicas, every layer at least one), owners of a layer are
  consecutive ranks.  Replicas bring no speed (stages 4-5 are bounded by
  the largest layer either way) but every replica receives its own copy of
  the layer's gradient and factors in stage 3, so the bytes of stage 3
  grow with the number of processes (see :mod:`chainerkfac.scaling`).

Everything is pure Python on the costs list, deterministic and identical on
every rank.
"""

import heapq
import typing


def layer_cost(shapes: typing.Any) -> float:
    """FLOPs of inverting and preconditioning one layer on its owner.

    What stages 4-5 compute: :func:`inversion_flops` plus
    :func:`precondition_flops`.  The solves matter: for ResNet-50's FC layer
    they cost 4× the factorizations, and for its 3×3 convolutions about as
    much.

    Args:
        shapes: ``{factor name: shape}`` as ``Layer.factor_shapes()`` gives
            (or any iterable of shapes).

    Returns:
        float: the cost.
    """
    return inversion_flops(shapes) + precondition_flops(shapes)


def inversion_flops(shapes: typing.Any) -> float:
    """Stage 4: a Cholesky factorization (potrf, d³/3) per square factor
    (A, G, the full 2C × 2C BN Fisher); a vector factor (the diagonal BN
    Fisher, Sec. 5.4) is d reciprocals of its damped values."""
    vectors, square = _split_shapes(shapes)
    return float(sum(vectors)) + sum(float(d) ** 3 for d in square) / 3.0


def precondition_flops(shapes: typing.Any) -> float:
    """Stage 5: two pairs of triangular solves, 2·Πd·Σd (2·d_A·d_G·(d_A +
    d_G) for a Kronecker layer, 2·(2C)² for a full BN Fisher); nothing
    counted for a vector factor (the diagonal BN Fisher: its elementwise
    division counts once, as the d reciprocals of stage 4)."""
    _, square = _split_shapes(shapes)
    if not square:
        return 0.0
    product = 1.0
    for d in square:
        product *= d
    return 2.0 * product * sum(square)


def _split_shapes(shapes):
    """``(vector lengths, square sizes)`` of factor shapes."""
    values = shapes.values() if hasattr(shapes, 'values') else shapes
    vectors, square = [], []
    for shape in values:
        shape = tuple(int(s) for s in shape)
        if len(shape) == 1:
            vectors.append(shape[0])
        elif len(shape) == 2 and shape[0] == shape[1]:
            square.append(shape[0])
        else:
            raise ValueError(
                'factor shape {} is neither square nor a vector'.format(shape))
    return vectors, square


class Assignment(object):
    """Which processes own which layers.

    Attributes:
        size (int): number of processes.
        costs (tuple): the layer costs, in layer order.
        owners (tuple): ``owners[i]``: sorted tuple of the ranks owning
            layer ``i`` (at least one).
        primary (tuple): ``primary[i]``: the owner the gather takes layer
            ``i`` from (one of ``owners[i]``).
    """

    def __init__(self, costs, size, owners, primary=None):
        self.size = int(size)
        self.costs = tuple(costs)
        self.owners = tuple(tuple(sorted(set(int(r) for r in o)))
                            for o in owners)
        if len(self.owners) != len(self.costs):
            raise ValueError('{} owner sets for {} layers'.format(
                len(self.owners), len(self.costs)))
        for i, o in enumerate(self.owners):
            if not o:
                raise ValueError('layer {} has no owner'.format(i))
            if o[0] < 0 or o[-1] >= self.size:
                raise ValueError('layer {} owned by ranks {} outside 0..{}'
                                 .format(i, o, self.size - 1))
        if primary is None:
            primary = choose_primaries(self.owners, self.costs)
        self.primary = tuple(int(p) for p in primary)
        for i, p in enumerate(self.primary):
            if p not in self.owners[i]:
                raise ValueError('primary {} of layer {} is not an owner {}'
                                 .format(p, i, self.owners[i]))
        layers = [[] for _ in range(self.size)]
        for i, o in enumerate(self.owners):
            for r in o:
                layers[r].append(i)
        self._layers = tuple(tuple(x) for x in layers)
        self._loads = tuple(sum(self.costs[i] for i in x) for x in layers)

    @property
    def num_layers(self) -> int:
        return len(self.costs)

    @property
    def redundant(self) -> bool:
        """True when some layer has several owners."""
        return any(len(o) > 1 for o in self.owners)

    def layers_of(self, rank: int) -> tuple:
        """Indices (ascending) of the layers ``rank`` owns."""
        return self._layers[rank]

    def primary_layers_of(self, rank: int) -> tuple:
        """Indices of the layers the gather takes from ``rank``."""
        return tuple(i for i, p in enumerate(self.primary) if p == rank)

    def is_owner(self, rank: int, layer: int) -> bool:
        return rank in self.owners[layer]

    def load(self, rank: int) -> float:
        """Sum of the costs of the layers ``rank`` owns."""
        return self._loads[rank]

    def max_load(self) -> float:
        return max(self._loads) if self._loads else 0

    def lower_bound(self) -> float:
        """max(total cost / size, largest layer cost)."""
        if not self.costs:
            return 0
        return max(float(sum(self.costs)) / self.size, max(self.costs))

    def ratio(self) -> float:
        """max_load / lower_bound (1.0 when there is nothing to do)."""
        bound = self.lower_bound()
        if bound <= 0:
            return 1.0
        return self.max_load() / float(bound)

    def __eq__(self, other):
        return (isinstance(other, Assignment) and self.size == other.size
                and self.costs == other.costs
                and self.owners == other.owners
                and self.primary == other.primary)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((self.size, self.costs, self.owners, self.primary))

    def __repr__(self):
        return '<Assignment {} layers on {} processes, ratio {:.3f}>'.format(
            self.num_layers, self.size, self.ratio())


def choose_primaries(owners: typing.Sequence[typing.Sequence[int]],
                     costs: typing.Sequence[float]) -> list:
    """One owner per layer for the gather, spreading the sending work.

    Layers with a single owner take it.  Layers with several owners are
    visited by cost descending (ties by index) and take the owner that
    sends the least cost so far (ties by lowest rank).
    """
    sent = {}
    primary = [None] * len(owners)
    for i, o in enumerate(owners):
        if len(o) == 1:
            primary[i] = o[0]
            sent[o[0]] = sent.get(o[0], 0) + costs[i]
    for i in _by_cost(costs):
        o = owners[i]
        if len(o) > 1:
            r = min(o, key=lambda q: (sent.get(q, 0), q))
            primary[i] = r
            sent[r] = sent.get(r, 0) + costs[i]
    return primary


def assign(costs: typing.Iterable[float], size: int,
           redundant: bool = False, improve: bool = True) -> Assignment:
    """Assigns layers of the given costs to ``size`` processes.

    Args:
        costs: layer costs (e.g. :func:`layer_cost`), in layer order.
        size (int): number of processes.
        redundant (bool): when ``size > len(costs)``, replicate layers so
            that every process owns one (the paper's layout); by default
            every layer has one owner and the extra processes own nothing.
        improve (bool): run the local improvement pass after LPT.

    Returns:
        Assignment
    """
    costs = [_check_cost(c) for c in costs]
    size = int(size)
    if size < 1:
        raise ValueError('size must be positive, got {}'.format(size))
    n = len(costs)
    if size > n and n > 0:
        if redundant:
            return Assignment(costs, size, _replicate(costs, size))
        return Assignment(costs, size, [(r,) for r in spread(n, size)])
    owner = _lpt(costs, size)
    if improve:
        owner = _improve(costs, size, owner)
    return Assignment(costs, size, [(r,) for r in owner])


def _check_cost(c):
    if not c >= 0:
        raise ValueError('layer costs must be non-negative, got {!r}'.format(
            c))
    return c


def _by_cost(costs):
    """Layer indices by cost descending, ties by index."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


def _lpt(costs, size):
    """owner[i] by greedy LPT.

    The first ``min(size, n)`` layers (in LPT order) go to ranks 0, 1, ...
    (what LPT does anyway with positive costs; it keeps zero-cost layers
    from piling up on rank 0 so that no rank is left empty).
    """
    order = _by_cost(costs)
    owner = [None] * len(costs)
    heap = []
    for k, i in enumerate(order):
        if k < size:
            owner[i] = k
            heap.append((costs[i], k))
            if k == size - 1 or k == len(order) - 1:
                heapq.heapify(heap)
            continue
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner


def _improve(costs, size, owner, max_rounds=100000):
    """Local search on the max-loaded ranks.

    Repeatedly takes the most-loaded rank M (ties by lowest rank) and applies
    the move (a layer of M to another rank) or swap (a layer of M with a
    cheaper layer of another rank) that minimizes the larger of the two new
    loads, provided it is strictly below M's load.  Each step strictly
    lowers Σ load², so this terminates; a move never empties a rank.
    Stops when no most-loaded rank can be improved.
    """
    owner = list(owner)
    layers = [[] for _ in range(size)]
    for i, r in enumerate(owner):
        layers[r].append(i)
    loads = [sum(costs[i] for i in x) for x in layers]
    for _ in range(max_rounds):
        peak = max(loads)
        improved = False
        for m in [r for r in range(size) if loads[r] == peak]:
            best = None  # (new max, kind, a, b, r)
            lm = loads[m]
            for a in layers[m]:
                ca = costs[a]
                if ca <= 0:
                    continue
                for r in range(size):
                    if r == m:
                        continue
                    lr = loads[r]
                    if len(layers[m]) > 1 and lr + ca < lm:
                        key = (max(lm - ca, lr + ca), 0, a, -1, r)
                        if best is None or key < best:
                            best = key
                    for b in layers[r]:
                        d = ca - costs[b]
                        if d > 0 and lr + d < lm:
                            key = (max(lm - d, lr + d), 1, a, b, r)
                            if best is None or key < best:
                                best = key
            if best is None:
                continue
            _, kind, a, b, r = best
            layers[m].remove(a)
            layers[r].append(a)
            owner[a] = r
            loads[m] -= costs[a]
            loads[r] += costs[a]
            if kind == 1:
                layers[r].remove(b)
                layers[m].append(b)
                owner[b] = m
                loads[r] -= costs[b]
                loads[m] += costs[b]
            improved = True
            break
        if not improved:
            break
    return owner


def spread(n: int, size: int) -> list:
    """Ranks of ``n`` single-owner layers on ``size >= n`` processes:
    layer k on ``⌊k·size/n⌋`` (evenly spaced, rank 0 first)."""
    return [k * size // n for k in range(n)]


def replica_counts(costs: typing.Sequence[float], size: int) -> list:
    """Owner counts per layer summing to ``size`` (>= 1 each), by D'Hondt.

    Each of the ``size - n`` extra owners goes to the layer with the largest
    cost / current count (ties by lowest index).
    """
    n = len(costs)
    if size < n:
        raise ValueError('{} processes cannot give {} layers one owner each'
                         .format(size, n))
    counts = [1] * n
    heap = [(-costs[i], i) for i in range(n)]
    heapq.heapify(heap)
    for _ in range(size - n):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-costs[i] / float(counts[i]), i))
    return counts


def _replicate(costs, size):
    counts = replica_counts(costs, size)
    owners = []
    start = 0
    for c in counts:
        owners.append(tuple(range(start, start + c)))
        start += c
    return owners


# -- the plan as text -------------------------------------------------------

def _ranks_text(ranks):
    """'3' or '0-2,5' (ranges of consecutive ranks)."""
    parts = []
    ranks = sorted(ranks)
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else
                     '{}-{}'.format(start, prev))
        if r is not None:
            start = prev = r
    return ','.join(parts)


def format_plan(assignment: Assignment, names: typing.Iterable[str],
                costs: typing.Optional[typing.Iterable[float]] = None
                ) -> list:
    """The lines of a human-readable plan.

    One line per layer (name, owners, primary, cost share of the total),
    one line per rank (its load, share of the total, load / lower bound,
    number of layers), then the summary, ending with the line
    ``max/lower-bound: X.XXX``.
    """
    if costs is None:
        costs = assignment.costs
    costs = list(costs)
    names = list(names)
    if len(names) != assignment.num_layers or \
            len(costs) != assignment.num_layers:
        raise ValueError('{} names and {} costs for {} layers'.format(
            len(names), len(costs), assignment.num_layers))
    total = float(sum(costs)) or 1.0
    bound = assignment.lower_bound() or 1.0
    width = max([len(n) for n in names] + [5])
    lines = ['# {} layers on {} processes{}'.format(
        assignment.num_layers, assignment.size,
        ' (redundant)' if assignment.redundant else '')]
    lines.append('{:<{w}}  {:>9}  {:>7}  {}'.format(
        'layer', 'cost', 'share', 'owners (primary)', w=width))
    for i, name in enumerate(names):
        owners = assignment.owners[i]
        lines.append('{:<{w}}  {:>9.3e}  {:>6.2f}%  {} ({})'.format(
            name, costs[i], 100.0 * costs[i] / total, _ranks_text(owners),
            assignment.primary[i], w=width))
    lines.append('{:>6}  {:>9}  {:>7}  {:>6}  {}'.format(
        'rank', 'load', 'share', '/bound', 'layers'))
    for r in range(assignment.size):
        load = sum(costs[i] for i in assignment.layers_of(r))
        lines.append('{:>6}  {:>9.3e}  {:>6.2f}%  {:>6.3f}  {}'.format(
            r, load, 100.0 * load / total, load / float(bound),
            len(assignment.layers_of(r))))
    lines.append('total cost: {:.3e}'.format(sum(costs)))
    lines.append('max load: {:.3e}'.format(assignment.max_load()))
    lines.append('lower bound: {:.3e}'.format(assignment.lower_bound()))
    lines.append('max/lower-bound: {:.3f}'.format(assignment.ratio()))
    return lines
