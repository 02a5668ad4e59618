"""ChainerMN's MNIST example with the optimizer swapped by one line.

``chainermn/examples/mnist/train_mnist.py`` (an MLP, ``scatter_dataset``,
``StandardUpdater``, ``create_multi_node_evaluator``, ``extensions.snapshot``
on rank 0) plus ChainerMN's per-rank ``create_multi_node_checkpointer``, with
``chainerkfac.DistributedKFAC(comm, ...)`` where the example has
``chainermn.create_multi_node_optimizer(MomentumSGD(), comm)``, on
scikit-learn's digits, on 2 processes: tests/mpi/mnist_example_worker.py.

* it trains (the evaluator's accuracy after 2 epochs, the same on both
  ranks; the parameters identical on both ranks);
* per-rank checkpoints resume exactly (bitwise) at a stale step, also into
  a fresh model of lazily sized links;
* every rank resuming from rank 0's snapshot: at a stale step, one WARNING
  (logger ``chainerkfac``, rank 0, at the first update) naming the factors
  rebuilt early and how to resume exactly, and training goes on; at a
  refresh of every factor, exact and silent.

Each process has its own string hash seed, as independent Python processes
do; they are fixed here (two that order a Chain's children differently) so
that every run is the same.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

import tests
from tests.mpi import mpi_env
from tests.mpi import mpiexec

WORKER = os.path.join(tests.TESTS, 'mpi', 'mnist_example_worker.py')
#: PYTHONHASHSEED of rank 0 and rank 1: {'l1', 'l2', 'l3'} iterates from
#: 'l2' on rank 0 and from 'l1' on rank 1
HASH_SEEDS = (1, 0)
TIMEOUT = 240
#: invocation: (runs, links)
GROUPS = {
    'train': (['train'], 'lazy'),
    'resume': (['full', 'interrupted', 'checkpointer', 'rank0_stale',
                'rank0_refresh'], 'sized'),
    'lazy_resume': (['full', 'interrupted', 'checkpointer'], 'lazy'),
}

# three mpiexec runs of 2-8 s each (most of it starting the processes)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mpiexec() is None, reason='no mpiexec'),
]


def launch(out, runs, links):
    """The worker on 2 processes: its results, or a failure message."""
    worker = [sys.executable, WORKER, '--out', str(out), '--links', links,
              '--runs'] + runs
    command = [mpiexec(), '--oversubscribe']
    for rank, seed in enumerate(HASH_SEEDS):
        if rank:
            command.append(':')
        command += ['-n', '1', 'env', 'PYTHONHASHSEED={}'.format(seed)] + \
            worker
    env = mpi_env()
    # a rank that crashes ends the job with its Python stack (Open MPI's
    # own signal handler can hang in a corrupted heap)
    env['OMPI_MCA_opal_signal'] = ''
    env['PYTHONFAULTHANDLER'] = '1'
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return 'timed out after {} s:\n{}'.format(TIMEOUT, output[-6000:])
    path = os.path.join(str(out), 'results.json')
    if proc.returncode != 0 or not os.path.exists(path):
        return 'mpiexec exited with {}:\n{}'.format(proc.returncode,
                                                     output[-6000:])
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """``results(group)``: the worker's results for that group of runs,
    launched once."""
    cache = {}

    def get(group):
        if group not in cache:
            runs, links = GROUPS[group]
            cache[group] = launch(tmp_path_factory.mktemp(group), runs, links)
        return cache[group]
    return get


def check(results, group, name):
    got = results(group)
    if isinstance(got, str):
        pytest.fail(got)
    assert name in got, sorted(got)
    numbers = json.dumps(got['numbers'], indent=1, sort_keys=True)
    print(numbers)
    assert got[name] == 'ok', '{}\n{}'.format(got[name], numbers)


@pytest.mark.parametrize('name', [
    'accuracy', 'accuracy_same_on_every_rank',
    'parameters_same_on_every_rank'])
def test_it_trains(results, name):
    """Validation accuracy (multi-node evaluator) after 2 epochs > 0.85,
    the same on both ranks; the parameters bitwise the same on both."""
    check(results, 'train', name)


@pytest.mark.parametrize('name', [
    'checkpointer_resume_is_exact', 'checkpointer_resume_warns_nothing'])
def test_per_rank_checkpoints_resume_exactly(results, name):
    """Interrupted at a stale step (8 of 20, intervals 3), resumed by
    ``maybe_load`` into a new trainer, model and optimizer: the losses of
    iterations 9-20 and the final parameters bitwise those of the
    uninterrupted run, and no warning."""
    check(results, 'resume', name)


def test_per_rank_checkpoints_resume_into_lazy_links(results):
    """The same with the example's lazily sized links, which the load
    initializes (in the order a Chain serializes its children: per process,
    the order of a set of names)."""
    check(results, 'lazy_resume', 'checkpointer_resume_is_exact')


def test_rank0_snapshot_at_stale_step_warns_once(results):
    """Every rank loads rank 0's snapshot of iteration 8 (stale): one
    WARNING on logger chainerkfac, on rank 0 only, at the first update (not
    at the load), naming the number of factors rank 0's file lacks and
    create_multi_node_checkpointer."""
    check(results, 'resume', 'rank0_snapshot_stale_warns_once')


def test_rank0_snapshot_at_stale_step_trains_on(results):
    """After it: finite losses to iteration 20, the same parameters on both
    ranks, the loss near the uninterrupted run's."""
    check(results, 'resume', 'rank0_snapshot_stale_trains_on')


def test_rank0_snapshot_at_refresh_is_exact(results):
    """Rank 0's snapshot of iteration 6 (every factor due): no factor is
    rebuilt early, the run continues bitwise as the uninterrupted one, and
    nothing is logged."""
    check(results, 'resume', 'rank0_snapshot_at_refresh_is_exact')
