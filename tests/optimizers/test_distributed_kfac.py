"""DistributedKFAC under ``mpiexec -n 1/2/3/4 --oversubscribe``.

Each process count is one MPI launch of ``tests/mpi/worker.py`` running every
check (equivalence with single-process KFAC on the concatenated batch, BN
against a NumPy reference of Algorithm 1, fp16 and byte counts, packing,
accumulation, reporting); the results come back as JSON and each check is
its own test here.  The fault test makes rank 1 raise mid-training and
requires the whole job to exit non-zero within 30 s.
"""

import json
import os
import subprocess
import sys
import time

import pytest

import tests
from tests.mpi import mpi_env
from tests.mpi import assert_check
from tests.mpi import mpiexec
from tests.mpi import worker_results

ROOT = tests.ROOT
WORKER = os.path.join(tests.TESTS, 'mpi', 'worker.py')
CHECKS = ('accumulation', 'adaptive_refresh', 'bn_diagonal', 'bn_full',
          'bn_unit', 'equivalence_fp32',
          'equivalence_fp64', 'equivalence_grouped_fp64',
          'equivalence_grouped_mlp_fp32', 'equivalence_mlp_fp32',
          'equivalence_mlp_fp64', 'equivalence_sum_fp64', 'fp16_and_bytes',
          'packing', 'reporter', 'sampled_fisher_conv',
          'sampled_fisher_mlp')
SIZES = (1, 2, 3, 4)


def launch(size, *args, timeout=600):
    command = [mpiexec(), '-n', str(size), '--oversubscribe',
               sys.executable, WORKER] + list(args)
    start = time.time()
    proc = subprocess.run(command, env=mpi_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, universal_newlines=True)
    return proc, time.time() - start


_results = {}


def results_for(size, tmp_path_factory):
    if size not in _results:
        _results[size] = worker_results(
            WORKER, size, tmp_path_factory.mktemp('mpi{}'.format(size)) /
            'results.json', timeout=600)
    return _results[size]


pytestmark = pytest.mark.skipif(mpiexec() is None, reason='no mpiexec')


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('check', CHECKS)
@pytest.mark.slow
def test_distributed(size, check, tmp_path_factory):
    results = results_for(size, tmp_path_factory)
    assert_check(results, check)
    assert set(results) == set(CHECKS)


def test_exception_on_one_rank_stops_all_ranks():
    proc, seconds = launch(2, '--fault', '1', timeout=60)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert 'injected failure on rank 1' in proc.stdout, proc.stdout[-3000:]
    assert 'no failure happened' not in proc.stdout
    assert seconds < 30, seconds


@pytest.mark.slow
def test_stage3_bytes_do_not_grow_past_the_layer_count(tmp_path):
    """3 K-FAC layers on 4 and 8 processes: one owner per layer, the rest
    idle; what each process sends and receives in stages 3 and 6 is the
    same at P = 8 as at P = 4 (and equals the scaling model's counts, which
    the worker checks against the optimizer's own counters)."""
    data = {}
    for size in (4, 8):
        out = str(tmp_path / 'plan{}.json'.format(size))
        proc, _ = launch(size, '--checks', 'plan_bytes', '--out', out)
        assert proc.returncode == 0, proc.stdout[-4000:]
        with open(out) as f:
            results = json.load(f)
        assert results['plan_bytes'] == 'ok', results['plan_bytes']
        data[size] = results['data']['plan_bytes']
    for size, d in data.items():
        assert sorted(len(o) for o in d['owners']) == [1, 1, 1], d
        owning = sorted(o[0] for o in d['owners'])
        assert len(set(owning)) == 3
        # the idle processes receive nothing and send no stage-6 segment
        for r in range(size):
            if r not in owning:
                assert d['stage3_received'][r] == 0
                assert d['stage6_sent'][r] == 0
    four, eight = data[4], data[8]
    assert max(eight['stage3_sent']) == max(four['stage3_sent'])
    assert min(eight['stage3_sent']) == max(eight['stage3_sent'])
    assert sorted(eight['stage3_received'])[-3:] == \
        sorted(four['stage3_received'])[-3:]
    assert sum(eight['stage6_sent']) == sum(four['stage6_sent'])
    assert sum(eight['model_stage3']) == sum(four['model_stage3']) > 0
