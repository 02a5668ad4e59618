"""The α–β scaling model of an iteration (chainerkfac.scaling, Figure 2)."""

import pytest

from chainerkfac.distributed import assignment
from chainerkfac import scaling

UNIT = scaling.Network(latency=1.0, bandwidth=1.0, algorithm='ring')
HALVING = scaling.Network(latency=1.0, bandwidth=1.0, algorithm='halving')
GROUPED = scaling.Network(latency=1.0, bandwidth=1.0, algorithm='grouped')
LAYERS = (
    scaling.LayerInfo('conv', 10, ((3, 3), (2, 2))),  # packed 6 + 3
    scaling.LayerInfo('bn', 4, ((4,),)),
    scaling.LayerInfo('fc', 6, ((3, 3), (2, 2))),
)


def test_ring_hand_computed():
    # 3 steps, each as long as the largest segment: 3·(1 + 4)
    assert scaling.collective_time([1, 2, 3, 4], UNIT) == 15
    assert scaling.collective_time([7], UNIT) == 0
    # equal segments: (P − 1)·α + (P − 1)/P·n·β
    net = scaling.Network(latency=2e-6, bandwidth=1e9)
    n = 8e6
    assert scaling.collective_time([n / 8] * 8, net) == pytest.approx(
        7 * 2e-6 + 7 / 8 * n / 1e9)


def test_recursive_halving_hand_computed():
    # step 1: halves {0,1} / {2,3} exchange 3 and 7 bytes -> 1 + 7;
    # step 2: pairs exchange 2,1 and 4,3 bytes -> 1 + 4
    assert scaling.collective_time([1, 2, 3, 4], HALVING) == 13
    # P = 3: rank 2 hands its 6-byte vector to rank 0 (1 + 6), ranks 0, 1
    # halve segments [1 + 3, 2] (1 + 4), rank 2 gets its 3 bytes (1 + 3)
    assert scaling.collective_time([1, 2, 3], HALVING) == 16
    net = scaling.Network(latency=3e-6, bandwidth=2e9, algorithm='halving')
    n = 64e6
    assert scaling.collective_time([n / 16] * 16, net) == pytest.approx(
        4 * 3e-6 + 15 / 16 * n / 2e9)


def test_grouped_hand_computed():
    # P − 1 latencies; the link leaving rank 0 carries every segment but
    # rank 0's own (the smallest): 2 + 3 + 4
    assert scaling.collective_time([1, 2, 3, 4], GROUPED) == 3 + 9
    # empty segments (idle ranks) cost latency only
    assert scaling.collective_time([0, 5, 0, 0], GROUPED) == 3 + 5
    # equal segments: the ring's (P − 1)·α + (P − 1)/P·n·β
    net = scaling.Network(latency=2e-6, bandwidth=1e9, algorithm='grouped')
    assert scaling.collective_time([1e6] * 8, net) == pytest.approx(
        7 * 2e-6 + 7e6 / 1e9)
    assert scaling.Network(1e-6, 1e9).algorithm == 'grouped'


def test_padded_bytes():
    assert scaling.padded_bytes([1, 2, 3, 4]) == 16
    assert scaling.padded_bytes([0, 5, 0]) == 15
    assert scaling.padded_bytes([]) == 0


def test_allreduce_is_reduce_scatter_plus_all_gather():
    net = scaling.Network(latency=5e-6, bandwidth=10e9)
    assert scaling.allreduce_time(1e8, 4, net) == pytest.approx(
        2 * (3 * 5e-6 + 3 / 4 * 1e8 / 10e9))
    assert scaling.allreduce_time(1e8, 1, net) == 0


def test_network_rejects_bad_values():
    with pytest.raises(ValueError, match='algorithm'):
        scaling.Network(1e-6, 1e9, 'tree')
    with pytest.raises(ValueError, match='bandwidth'):
        scaling.Network(1e-6, 0)


def plan_of(owners, primary):
    costs = [layer.cost for layer in LAYERS]
    return assignment.Assignment(costs, 2, owners, primary)


def test_stage_counts_follow_the_plan():
    plan = plan_of(((0,), (1,), (0, 1)), (0, 1, 1))
    fp32 = scaling.stage3_counts(plan, LAYERS, scaling.DENSE_FP32, True)
    assert fp32 == [(10 + 13) * 4 + (6 + 13) * 4,
                    (4 + 4) * 4 + (6 + 13) * 4]
    fp16 = scaling.stage3_counts(plan, LAYERS, scaling.PACKED_FP16, True)
    assert fp16 == [10 * 4 + 9 * 2 + 6 * 4 + 9 * 2,
                    4 * 4 + 4 * 2 + 6 * 4 + 9 * 2]
    stale = scaling.stage3_counts(plan, LAYERS, scaling.PACKED_FP16, False)
    assert stale == [(10 + 6) * 4, (4 + 6) * 4]
    assert scaling.stage6_counts(plan, LAYERS) == [10 * 4, (4 + 6) * 4]


def test_iteration_stages_use_the_slowest_rank():
    costs = scaling.StageCosts(forward_backward=1.0, factors=0.5,
                               update=0.1, inverse_rate=10.0,
                               precondition_rate=20.0)
    plan = plan_of(((0,), (1,), (0, 1)), (0, 1, 1))
    stages = scaling.iteration_stages(2, LAYERS, costs, UNIT,
                                      scaling.DENSE_FP32, True, plan)
    kron = 27 / 3 + 8 / 3                       # potrf d³/3 of A and G
    inv = [2 * kron, 4 + kron]                  # BN: 4 divisions
    pre = [2 * 6 * 5 * 2, 2 * 6 * 5]           # 2·d_A·d_G·(d_A + d_G)
    assert stages['inverse'] == pytest.approx(max(inv) / 10.0)
    assert stages['precondition'] == pytest.approx(max(pre) / 20.0)
    assert stages['reduce_scatter'] == 1 + max(
        scaling.stage3_counts(plan, LAYERS, scaling.DENSE_FP32, True))
    assert stages['total'] == pytest.approx(sum(
        v for k, v in stages.items() if k != 'total'))
    stale = scaling.iteration_stages(2, LAYERS, costs, UNIT,
                                     scaling.DENSE_FP32, False, plan)
    assert stale['inverse'] == stale['factors'] == 0
    mixed = scaling.kfac_time(2, LAYERS, costs, UNIT, scaling.DENSE_FP32,
                              refresh_fraction=0.25)
    fresh = scaling.kfac_time(2, LAYERS, costs, UNIT, scaling.DENSE_FP32)
    assert fresh > mixed > stale['total']
    # one process: no communication, every FLOP on it
    alone = scaling.iteration_stages(1, LAYERS, costs, UNIT,
                                     scaling.DENSE_FP32)
    assert alone['reduce_scatter'] == alone['all_gather'] == 0
    assert alone['inverse'] == pytest.approx((2 * kron + 4) / 10.0)


def test_stage3_bytes_flat_past_the_layer_count():
    """ResNet-50: with one owner per layer, the bytes of stages 3 and 6 at
    any P > 107 are those of P = 107; the paper's replicated layout sends a
    copy per replica."""
    from chainerkfac.examples.scaling_model import resnet50_layers
    layers = resnet50_layers()
    assert len(layers) == 107

    def stage3(p, redundant=False):
        plan = scaling.plan_of(layers, p, redundant)
        return scaling.stage3_counts(plan, layers, scaling.PACKED_FP16, True)

    payload = sum(layer.grad_elements * 4 + layer.factor_elements(True) * 2
                  for layer in layers)
    base = stage3(107)
    assert sum(base) == payload
    for p in (108, 256, 1024):
        counts = stage3(p)
        assert sum(counts) == payload
        assert sorted(counts)[-107:] == sorted(base)
        assert sorted(scaling.stage6_counts(scaling.plan_of(layers, p),
                                            layers))[-107:] == \
            sorted(scaling.stage6_counts(scaling.plan_of(layers, 107),
                                         layers))
    replicated = [sum(stage3(p, True)) for p in (107, 256, 1024)]
    assert replicated[0] == payload < replicated[1] < replicated[2]
