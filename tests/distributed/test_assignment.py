"""Assignment of K-FAC layers to processes
(chainerkfac.distributed.assignment)."""

import itertools
import os
import random
import re
import subprocess
import sys
import time

import numpy
import pytest

import tests

import chainerkfac
from chainerkfac.distributed import assignment
from chainerkfac.distributed.assignment import assign
from chainerkfac.distributed.assignment import format_plan
from chainerkfac.distributed.assignment import layer_cost
from chainerkfac.layers import compute_inverses
from chainerkfac.links import DigitsCNN
from chainerkfac.links import ResNet50
from chainerkfac.optimizers import KFAC


ROOT = tests.ROOT
SCRIPT = os.path.join(ROOT, 'scripts', 'plan_assignment.py')
LAST_LINE = re.compile(r'^max/lower-bound: (\d+\.\d{3})$')


def _layers(model, bn_fisher):
    opt = KFAC(bn_fisher=bn_fisher)
    opt.setup(model)
    return opt.kfac_layers


@pytest.fixture(scope='module')
def resnet_costs():
    """{bn_fisher: (names, costs)} of ResNet-50's 107 K-FAC layers."""
    out = {}
    for mode in ('diagonal', 'full'):
        layers = _layers(ResNet50(n_class=1000), mode)
        out[mode] = ([l.name for l in layers],
                     [layer_cost(l.factor_shapes()) for l in layers])
    return out


def _check_consistent(a, costs, size):
    """Owners, primaries, layers_of and loads agree with each other."""
    assert a.size == size
    assert len(a.owners) == len(costs) == len(a.primary)
    expected_loads = [0] * size
    expected_layers = [[] for _ in range(size)]
    for i, owners in enumerate(a.owners):
        assert len(owners) >= 1
        assert list(owners) == sorted(set(owners))
        assert all(0 <= r < size for r in owners)
        assert a.primary[i] in owners
        for r in owners:
            expected_loads[r] += costs[i]
            expected_layers[r].append(i)
    for r in range(size):
        # rel 1e-12: Python 3.12's sum() of floats is compensated, += is not
        assert a.load(r) == pytest.approx(expected_loads[r], rel=1e-12)
        assert list(a.layers_of(r)) == expected_layers[r]
        assert all(a.is_owner(r, i) for i in a.layers_of(r))
    assert a.max_load() == pytest.approx(max(expected_loads), rel=1e-12)
    bound = max(float(sum(costs)) / size, max(costs))
    assert a.lower_bound() == pytest.approx(bound)
    assert a.ratio() == pytest.approx(
        max(expected_loads) / bound if bound else 1.0)
    assert a.ratio() >= 1 - 1e-12
    # every layer is gathered from exactly one rank
    gathered = sorted(i for r in range(size) for i in a.primary_layers_of(r))
    assert gathered == list(range(len(costs)))


# -- layer_cost -------------------------------------------------------------

def kronecker_flops(d_a, d_g):
    """potrf of A and G, then G⁻¹ (∇ A⁻¹) as two pairs of triangular solves:
    the solves with A's factors on the d_G rows of ∇ (d_A² each), those with
    G's on its d_A columns (d_G² each), one multiply-add = 2 flops."""
    potrf = (d_a ** 3 + d_g ** 3) / 3.0
    solves = 2 * (d_g * d_a * d_a) + 2 * (d_a * d_g * d_g)
    return potrf + solves


def test_layer_cost_formulas():
    assert layer_cost({'A': (3, 3), 'G': (5, 5)}) == pytest.approx(
        kronecker_flops(3, 5))
    assert layer_cost({'A': (3, 3), 'G': (5, 5)}) == pytest.approx(
        (27 + 125) / 3.0 + 2 * 15 * 8)
    assert layer_cost({'F': (8,)}) == 8
    assert layer_cost({'F': (8, 8)}) == pytest.approx(512 / 3.0 + 2 * 64)
    assert layer_cost([(2, 2), (4,)]) == pytest.approx(8 / 3.0 + 8 + 4)
    with pytest.raises(ValueError):
        layer_cost({'A': (2, 3)})


@pytest.mark.parametrize('mode', ['diagonal', 'full'])
def test_layer_cost_of_real_layers(mode):
    for layer in _layers(DigitsCNN(), mode):
        shapes = layer.factor_shapes()
        if isinstance(layer, chainerkfac.layers.KroneckerLayer):
            d_a, d_g = shapes['A'][0], shapes['G'][0]
            assert layer_cost(shapes) == pytest.approx(
                kronecker_flops(d_a, d_g))
        else:
            assert isinstance(layer,
                              chainerkfac.layers.BatchNormalizationLayer)
            c2 = 2 * layer.link.gamma.size
            assert layer_cost(shapes) == pytest.approx(
                c2 if mode == 'diagonal' else c2 ** 3 / 3.0 + 2 * c2 ** 2)
        # independent of the dict's order
        assert layer_cost(dict(reversed(list(shapes.items())))) == \
            layer_cost(shapes)


def _bn_stage_flops(layer, damping=1e-3):
    """Stages 4-5 of a BN layer: for the diagonal Fisher, counted on the
    layer (the reciprocals stage 4 writes into ``F_inv``; the division is
    counted there once); for the full 2C × 2C one, potrf (d³/3) and two
    triangular solves of one vector (d² each)."""
    d = 2 * layer.link.gamma.size
    if not layer.diagonal:
        return d ** 3 / 3.0, 2 * d * d
    layer.set_factor('F', numpy.ones(d, numpy.float32),
                     numpy.ones((), numpy.float32))
    compute_inverses([layer], damping, 1.0)  # F_inv: the reciprocals
    return layer.state['F_inv'].size, 0


@pytest.mark.parametrize('mode', ['diagonal', 'full'])
def test_stage_flops_of_the_bn_fisher(mode):
    """One FLOP model for both stages of a BN layer, the plan's and
    scripts/bench_kfac.py's: the diagonal Fisher's 2C values cost 2C
    reciprocals in stage 4 (bench_kfac.py counted them in stage 5)."""
    from chainerkfac.distributed.assignment import inversion_flops
    from chainerkfac.distributed.assignment import precondition_flops
    bn = [layer for layer in _layers(DigitsCNN(), mode)
          if isinstance(layer, chainerkfac.layers.BatchNormalizationLayer)]
    assert bn
    for layer in bn:
        invert, precondition = _bn_stage_flops(layer)
        shapes = layer.factor_shapes()
        assert inversion_flops(shapes) == pytest.approx(invert)
        assert precondition_flops(shapes) == pytest.approx(precondition)


# -- LPT --------------------------------------------------------------------

def test_lpt_follows_the_rule():
    # order by cost: 5(0) 4(2) 3(4) 2(3) 1(1); loads tie at 7, 7 -> rank 0
    a = assign([5, 1, 4, 2, 3], 2, improve=False)
    assert a.owners == ((0,), (0,), (1,), (0,), (1,))
    assert [a.load(0), a.load(1)] == [8, 7]
    # ties between equal costs go by index
    a = assign([1, 1, 1], 3)
    assert a.owners == ((0,), (1,), (2,))


@pytest.mark.parametrize('costs,size,lpt,optimum', [
    ([3, 3, 2, 2, 2], 2, 7, 6),
    # Graham's LPT worst case for m machines: 2m-1, 2m-1, ..., m+1, m+1,
    # m, m, m; LPT gives 4m-1, the optimum is 3m
    ([5, 5, 4, 4, 3, 3, 3], 3, 11, 9),
    ([7, 7, 6, 6, 5, 5, 4, 4, 4], 4, 15, 12),
])
def test_lpt_and_improvement_on_known_optimum(costs, size, lpt, optimum):
    plain = assign(costs, size, improve=False)
    assert plain.max_load() == lpt
    best = assign(costs, size)
    assert best.max_load() == optimum
    _check_consistent(best, costs, size)


def _optimum(costs, size):
    best = None
    for owner in itertools.product(range(size), repeat=len(costs)):
        loads = [0] * size
        for c, r in zip(costs, owner):
            loads[r] += c
        if best is None or max(loads) < best:
            best = max(loads)
    return best


def test_improvement_never_hurts_and_stays_near_optimum():
    rng = random.Random(0)
    for _ in range(60):
        size = rng.randint(2, 3)
        costs = [rng.randint(1, 30) for _ in range(rng.randint(size, 7))]
        plain = assign(costs, size, improve=False)
        better = assign(costs, size)
        _check_consistent(better, costs, size)
        opt = _optimum(costs, size)
        assert opt <= better.max_load() <= plain.max_load()
        assert better.max_load() <= (4.0 / 3 - 1.0 / (3 * size)) * opt


def test_every_rank_owns_a_layer_when_layers_suffice():
    # zero costs must not pile up on rank 0
    for costs, size in [([0, 0, 0, 0], 3), ([5, 0, 0], 3), ([1] * 10, 10)]:
        a = assign(costs, size)
        _check_consistent(a, costs, size)
        assert all(a.layers_of(r) for r in range(size))
        assert not a.redundant


def test_loads_match_independent_sums():
    rng = random.Random(1)
    for size in (1, 2, 3, 7, 16, 40, 64):
        costs = [rng.choice([rng.randint(1, 10), rng.randint(1, 10) ** 3,
                             rng.randint(0, 3)]) for _ in range(30)]
        a = assign(costs, size)
        _check_consistent(a, costs, size)
        for r in range(size):
            assert a.load(r) == sum(c for i, c in enumerate(costs)
                                    if r in a.owners[i])


# -- redundancy (more processes than layers) --------------------------------

def test_redundancy_five_layers_on_eight_ranks():
    costs = [10, 1, 5, 2, 8]
    a = assign(costs, 8, redundant=True)
    _check_consistent(a, costs, 8)
    assert a.redundant
    counts = [len(o) for o in a.owners]
    assert sum(counts) == 8
    assert min(counts) >= 1
    # every rank owns exactly one layer: none idle, max load = largest cost
    assert all(len(a.layers_of(r)) == 1 for r in range(8))
    assert a.max_load() == 10 and a.ratio() == 1.0
    # the costliest layers get the most replicas
    assert counts[0] == max(counts)
    for i, j in itertools.combinations(range(5), 2):
        if costs[i] > costs[j]:
            assert counts[i] >= counts[j]
    assert counts == [3, 1, 1, 1, 2]
    # owners are consecutive ranks, layers in order
    assert a.owners == ((0, 1, 2), (3,), (4,), (5,), (6, 7))
    assert a.primary == (0, 3, 4, 5, 6)


def test_redundancy_follows_costs():
    costs = [100, 50, 25, 1]
    a = assign(costs, 4 + 171, redundant=True)
    counts = [len(o) for o in a.owners]
    assert sum(counts) == 175
    # the count of the 1-cost layer is its floor of one; the rest share
    # the other 171 owners in proportion 4:2:1
    assert counts == [99, 50, 25, 1]
    assert assignment.replica_counts(costs, 8) == [4, 2, 1, 1]
    _check_consistent(a, costs, 175)
    assert assignment.replica_counts(costs, 4) == [1, 1, 1, 1]


def test_past_the_layer_count_one_owner_each_spread_out():
    a = assign([3, 2, 1], 5)
    assert a == assign([3, 2, 1], 5, redundant=False)
    assert not a.redundant
    # layer k of 3 on rank floor(5k/3)
    assert a.owners == ((0,), (1,), (3,))
    assert a.primary == (0, 1, 3)
    assert a.layers_of(2) == () and a.layers_of(4) == ()
    assert a.max_load() == 3 and a.ratio() == 1.0
    b = assign([1] * 4, 1024)
    assert b.owners == ((0,), (256,), (512,), (768,))


def test_primaries_balanced_for_given_owners():
    owners = [(0, 1), (0, 1), (0, 1), (2,)]
    a = assignment.Assignment([4, 3, 2, 1], 3, owners)
    assert a.primary == (0, 1, 1, 2)


def test_errors():
    with pytest.raises(ValueError):
        assign([1, 2], 0)
    with pytest.raises(ValueError):
        assign([1, -2], 2)
    with pytest.raises(ValueError):
        assignment.Assignment([1, 2], 2, [(0,), ()])
    with pytest.raises(ValueError):
        assignment.Assignment([1, 2], 2, [(0,), (2,)])
    with pytest.raises(ValueError):
        assignment.Assignment([1, 2], 2, [(0,), (1,)], primary=[1, 1])


def test_no_layers():
    a = assign([], 4)
    assert a.owners == () and a.max_load() == 0 and a.ratio() == 1.0


# -- determinism --------------------------------------------------------------

def test_deterministic(resnet_costs):
    _, costs = resnet_costs['full']
    for size in (3, 6, 50, 107, 200):
        assert assign(costs, size) == assign(list(costs), size)
        assert assign(costs, size).owners == assign(tuple(costs), size).owners


_DUMP = ('from chainerkfac.distributed.assignment import assign;'
         'import random; r = random.Random(3);'
         'c = [r.randint(0, 9) ** 3 for _ in range(40)] + [8] * 5;'
         'print([(assign(c, p).owners, assign(c, p).primary)'
         ' for p in (2, 5, 13, 45, 60, 97)])')


def test_independent_of_hash_seed():
    outputs = set()
    for seed in ('0', '12345'):
        env = dict(os.environ, PYTHONHASHSEED=seed,
                   PYTHONPATH=ROOT + os.pathsep +
                   os.environ.get('PYTHONPATH', ''))
        outputs.add(subprocess.check_output(
            [sys.executable, '-c', _DUMP], env=env, cwd=ROOT))
    assert len(outputs) == 1


# -- ResNet-50 ---------------------------------------------------------------

@pytest.mark.parametrize('mode', ['diagonal', 'full'])
def test_resnet50_within_five_percent_for_all_sizes(resnet_costs, mode):
    names, costs = resnet_costs[mode]
    assert len(costs) == 107
    start = time.time()
    worst = (0, None)
    for size in range(2, 1025):
        a = assign(costs, size)
        worst = max(worst, (a.ratio(), size))
        if size > len(costs):
            owners = [o[0] for o in a.owners]
            assert all(len(o) == 1 for o in a.owners)
            assert len(set(owners)) == len(costs)
            assert sum(1 for r in range(size) if a.layers_of(r)) == \
                len(costs)
    assert worst[0] <= 1.05, worst
    assert time.time() - start < 20


def test_resnet50_consistent(resnet_costs):
    _, costs = resnet_costs['diagonal']
    for size in (2, 4, 5, 17, 64, 106, 107, 108, 256, 1024):
        _check_consistent(assign(costs, size), costs, size)


# -- plan text and script -----------------------------------------------------

def test_format_plan(resnet_costs):
    names, costs = resnet_costs['diagonal']
    for size in (4, 300):
        a = assign(costs, size)
        lines = format_plan(a, names, costs)
        match = LAST_LINE.match(lines[-1])
        assert match
        assert float(match.group(1)) == round(a.ratio(), 3)
        text = '\n'.join(lines)
        for name in names:
            assert name in text
        assert len(lines) >= len(names) + size + 1
    with pytest.raises(ValueError):
        format_plan(a, names[:-1], costs)


def _run_script(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
               os.environ.get('PYTHONPATH', ''))
    return subprocess.run(
        [sys.executable, SCRIPT] + list(args), env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, check=True).stdout


def test_script_plan():
    out = _run_script('--model', 'resnet50', '--size', '32')
    lines = out.strip().splitlines()
    assert LAST_LINE.match(lines[-1])
    assert float(LAST_LINE.match(lines[-1]).group(1)) <= 1.05
    assert '/res5/2/conv2' in out


def test_script_sweep():
    out = _run_script('--model', 'digits', '--bn-fisher', 'full',
                      '--sweep', '2', '12')
    lines = out.strip().splitlines()
    per_size = [l for l in lines if l.startswith('P=')]
    assert len(per_size) == 11
    assert re.match(r'^worst max/lower-bound: \d+\.\d{3} at P=\d+$',
                    lines[-1])
