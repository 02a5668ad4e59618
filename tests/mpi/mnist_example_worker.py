"""MPI worker of tests/optimizers/test_mnist_example.py: ChainerMN's MNIST
example (``chainermn/examples/mnist/train_mnist.py``) with the optimizer
swapped for :class:`chainerkfac.DistributedKFAC` by one line, on
scikit-learn's digits.

``mpiexec -n 2 python mnist_example_worker.py --out DIR [--runs RUN ...]
[--links lazy|sized]``

The example's pieces are kept as it writes them: an MLP in
``L.Classifier`` (``--links lazy``: ``L.Linear(None, n)`` as Chainer's copy
of the example; ``sized``: ``L.Linear(64, n)`` as ChainerMN's original), the
dataset loaded on rank 0 and ``chainermn.scatter_dataset``-ed,
``StandardUpdater``, ``create_multi_node_evaluator(extensions.Evaluator(...),
comm)``, ``extensions.snapshot()`` and ``LogReport`` on rank 0 only; plus
``chainermn.create_multi_node_checkpointer`` (each rank its own file),
extended and ``maybe_load``-ed as ChainerMN's checkpointing example does.

Runs (the factors are stale between refreshes: ``a_interval = g_interval =
3``, refreshed at t = 0, 3, 6, 9, ...):

* ``train``: two epochs, every process seeded by its rank (different
  weights, as unseeded processes have): the evaluator's accuracy, and every
  rank's parameters at the end;
* ``full``: M = 20 iterations uninterrupted (every process seeded alike:
  the same shuffles on every rank, so rank 0's iterator state is also rank
  1's);
* ``interrupted``: the same to N = 8 (a stale step), the checkpointer every
  4 iterations, rank 0's snapshot every 2;
* ``checkpointer``: a new trainer, model and optimizer; ``maybe_load``
  (each rank its own file of iteration 8), then on to M;
* ``rank0_stale``: every rank loads rank 0's ``snapshot_iter_8`` with
  ``chainer.serializers.load_npz(path, trainer)``, then on to M;
* ``rank0_refresh``: the same from ``snapshot_iter_6`` (t = 6 refreshes
  every factor: nothing is rebuilt early).

Rank 0 writes ``DIR/results.json``: ``{check: "ok" | message}`` for the
checks whose runs ran, and ``"numbers"`` (accuracies, losses, differences,
seconds).
"""

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
import traceback

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import chainerkfac  # noqa: E402 (first: makes Chainer importable)
import chainer  # NOQA: E402
import chainer.functions as F  # NOQA: E402
import chainer.links as L  # NOQA: E402
from chainer import training  # NOQA: E402
from chainer.training import extensions  # NOQA: E402
import chainermn  # NOQA: E402
import numpy  # NOQA: E402

from chainerkfac.datasets import digits  # NOQA: E402

UNITS = 100
BATCHSIZE = 32  # per process: 719 examples each, 22.5 iterations an epoch
EPOCHS = 2
HP = dict(lr=0.005, damping=0.01, a_interval=3, g_interval=3)
FULL = 20  # M: within the first epoch (a new epoch reshuffles from the
# global NumPy state, which no snapshot holds)
STOP = 8  # N: stale (8 % 3 != 0)
REFRESH = 6  # a snapshot at a refresh of every factor
SNAPSHOT_EVERY = 2  # rank 0's extensions.snapshot()
CHECKPOINT_EVERY = 4  # the per-rank checkpointer
NAME = 'digits-example'
#: the input size the links are given (None: lazily sized), by --links
N_IN = [None]
#: the least validation accuracy after EPOCHS (measured: 0.926 in ``train``;
#: 0.926-0.968 over five pairs of per-rank seeds)
ACCURACY_BOUND = 0.85


class MLP(chainer.Chain):
    """The example's network: lazily sized links (``n_in=None``, as
    Chainer's copy of the example), or sized ones (ChainerMN's original)."""

    def __init__(self, n_units, n_out, n_in=None):
        super(MLP, self).__init__()
        sized = n_in is not None
        with self.init_scope():
            self.l1 = L.Linear(n_in, n_units)
            self.l2 = L.Linear(n_units if sized else None, n_units)
            self.l3 = L.Linear(n_units if sized else None, n_out)

    def forward(self, x):
        h1 = F.relu(self.l1(x))
        h2 = F.relu(self.l2(h1))
        return self.l3(h2)


class Record(chainer.training.Extension):
    """Every iteration's loss (and the evaluator's accuracy when it ran),
    read after the evaluator."""

    trigger = 1, 'iteration'
    priority = chainer.training.PRIORITY_READER

    def __init__(self):
        self.loss = {}
        self.accuracy = {}
        self.caught = None  # a Warnings handler: its count every iteration
        self.warnings = {}

    def __call__(self, trainer):
        observation = trainer.observation
        iteration = trainer.updater.iteration
        if self.caught is not None:
            self.warnings[iteration] = len(self.caught.records)
        self.loss[iteration] = float(_value(observation['main/loss']))
        if 'validation/main/accuracy' in observation:
            self.accuracy[iteration] = float(
                _value(observation['validation/main/accuracy']))


def _value(v):
    return getattr(v, 'array', v)


class Warnings(logging.Handler):
    """The WARNING records of logger ``chainerkfac``, while installed."""

    def __init__(self):
        super(Warnings, self).__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        logging.getLogger('chainerkfac').addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger('chainerkfac').removeHandler(self)


def load_data(comm):
    if comm.rank == 0:
        train, test = digits.get_digits()
    else:
        train, test = None, None
    train = chainermn.scatter_dataset(train, comm, shuffle=True, seed=0)
    test = chainermn.scatter_dataset(test, comm, shuffle=True, seed=0)
    return train, test


def make_trainer(comm, data, out, stop, seed):
    """The example's trainer (``stop``: its stop trigger), every process's
    NumPy seeded by ``seed``."""
    numpy.random.seed(seed)
    train, test = data
    model = L.Classifier(MLP(UNITS, 10, N_IN[0]))
    # ChainerMN's example:
    #   optimizer = chainermn.create_multi_node_optimizer(
    #       chainer.optimizers.MomentumSGD(), comm)
    optimizer = chainerkfac.DistributedKFAC(comm, **HP)
    optimizer.setup(model)

    train_iter = chainer.iterators.SerialIterator(train, BATCHSIZE)
    test_iter = chainer.iterators.SerialIterator(test, BATCHSIZE,
                                                 repeat=False, shuffle=False)
    updater = training.StandardUpdater(train_iter, optimizer, device=-1)
    trainer = training.Trainer(updater, stop, out=out)

    evaluator = extensions.Evaluator(test_iter, model, device=-1)
    evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)
    trainer.extend(evaluator)

    if comm.rank == 0:
        trainer.extend(extensions.snapshot(),
                       trigger=(SNAPSHOT_EVERY, 'iteration'))
        trainer.extend(extensions.LogReport())

    checkpointer = chainermn.create_multi_node_checkpointer(NAME, comm)
    trainer.extend(checkpointer, trigger=(CHECKPOINT_EVERY, 'iteration'))
    record = Record()
    trainer.extend(record)
    return trainer, model, optimizer, checkpointer, record


def parameters(model):
    return {name: p.array.copy() for name, p in model.namedparams()}


class Run(object):
    """What one run left on this rank."""

    def __init__(self, model, record, warnings=(), warnings_at_load=0,
                 warnings_after_first=None, expected_early=None):
        self.params = parameters(model)
        self.loss = record.loss
        self.accuracy = record.accuracy
        self.warnings = [r.getMessage() for r in warnings]
        self.warnings_at_load = warnings_at_load
        self.warnings_after_first = warnings_after_first
        self.expected_early = expected_early


def run_train(comm, data, out):
    trainer, model, _, _, record = make_trainer(
        comm, data, out, (EPOCHS, 'epoch'), seed=comm.rank)
    trainer.run()
    return Run(model, record)


def run_full(comm, data, out):
    trainer, model, _, _, record = make_trainer(
        comm, data, out, (FULL, 'iteration'), seed=0)
    trainer.run()
    return Run(model, record)


def run_interrupted(comm, data, out):
    trainer, model, _, checkpointer, record = make_trainer(
        comm, data, out, (STOP, 'iteration'), seed=0)
    # A job killed after iteration N never reaches the checkpointer's
    # finalize(), which removes its files at the normal end of a run:
    # stopping without it is that interruption.
    checkpointer.finalize = lambda: None
    trainer.run()
    return Run(model, record)


def run_checkpointer(comm, data, out):
    trainer, model, optimizer, checkpointer, record = make_trainer(
        comm, data, out, (FULL, 'iteration'), seed=0)
    with Warnings() as caught:
        checkpointer.maybe_load(trainer, optimizer)
        loaded = trainer.updater.iteration
        at_load = len(caught.records)
        trainer.run()
    if loaded != STOP:
        raise RuntimeError('maybe_load resumed at iteration {}, not {}'.format(
            loaded, STOP))
    return Run(model, record, caught.records, at_load)


def early_factors(optimizer):
    """The factors of the layers rank 0 does not own: not in rank 0's file,
    rebuilt at the first update after every rank loaded it."""
    owners = optimizer.assignment.owners
    return sum(len(block.layer.factor_names) for block in optimizer.blocks
               if block.layer is not None and 0 not in owners[block.index])


def run_rank0(comm, data, out, iteration):
    """Every rank loads rank 0's snapshot of ``iteration``, as the example's
    ``--resume``."""
    trainer, model, optimizer, _, record = make_trainer(
        comm, data, out, (FULL, 'iteration'), seed=0)
    path = os.path.join(os.path.dirname(out), 'interrupted',
                        'snapshot_iter_{}'.format(iteration))
    with Warnings() as caught:
        record.caught = caught
        chainer.serializers.load_npz(path, trainer)
        at_load = len(caught.records)
        trainer.run()
    return Run(model, record, caught.records, at_load,
               record.warnings.get(iteration + 1), early_factors(optimizer))


def max_difference(a, b):
    return max(float(numpy.abs(a[k].astype(numpy.float64)
                               - b[k].astype(numpy.float64)).max())
               for k in a)


def same_params(a, b):
    return a.keys() == b.keys() and all(
        numpy.array_equal(a[k], b[k]) for k in a)



def differences(resumed, full, worst):
    """Per rank, how a resumed run's losses and final parameters differ
    from the uninterrupted run's (``worst``: the largest difference)."""
    problems = []
    for rank, (r, f) in enumerate(zip(resumed, full)):
        if any(r.loss[i] != f.loss[i] for i in r.loss):
            problems.append('rank {}: losses {} resumed, {} uninterrupted'
                            .format(rank, [r.loss[i] for i in sorted(r.loss)],
                                    [f.loss[i] for i in sorted(r.loss)]))
        if not same_params(r.params, f.params):
            problems.append('rank {}: parameters differ from the '
                            'uninterrupted run at iteration {} (max {})'
                            .format(rank, FULL, worst))
    return problems

def mean_loss(runs, iteration):
    return sum(run.loss[iteration] for run in runs) / len(runs)


# -- the checks (rank 0, on every rank's runs) -------------------------------

def check_accuracy(train, numbers):
    last = max(train[0].accuracy)
    accuracy = [run.accuracy[last] for run in train]
    numbers['accuracy_by_epoch'] = [train[0].accuracy[i]
                                    for i in sorted(train[0].accuracy)]
    numbers['train_iterations'] = last
    if not len(train[0].accuracy) == EPOCHS:
        return 'the evaluator ran at iterations {}, not once an epoch'.format(
            sorted(train[0].accuracy))
    if accuracy[0] > ACCURACY_BOUND:
        return 'ok'
    return 'validation accuracy {} after {} epochs, not above {}'.format(
        accuracy[0], EPOCHS, ACCURACY_BOUND)


def check_accuracy_same(train, numbers):
    per_rank = [run.accuracy for run in train]
    return 'ok' if all(a == per_rank[0] for a in per_rank) else \
        'validation accuracy differs between ranks: {}'.format(per_rank)


def check_params_same(train, numbers):
    worst = max(max_difference(run.params, train[0].params) for run in train)
    numbers['train_rank_difference'] = worst
    ok = all(same_params(run.params, train[0].params) for run in train)
    return 'ok' if ok else \
        'parameters differ between ranks after training (max {})'.format(
            worst)


def check_checkpointer_exact(full, resumed, numbers):
    worst = max(max_difference(r.params, f.params)
                for r, f in zip(resumed, full))
    numbers['loss_full'] = mean_loss(full, FULL)
    numbers['loss_checkpointer'] = mean_loss(resumed, FULL)
    numbers['checkpointer_max_difference'] = worst
    problems = ['rank {} ran iterations {}'.format(rank, sorted(r.loss))
                for rank, r in enumerate(resumed)
                if sorted(r.loss) != list(range(STOP + 1, FULL + 1))]
    problems += differences(resumed, full, worst)
    return 'ok' if not problems else '; '.join(problems)


def check_checkpointer_silent(resumed, numbers):
    said = [run.warnings for run in resumed]
    return 'ok' if not any(said) else \
        'warnings after a per-rank resume: {}'.format(said)


def check_rank0_warns(stale, numbers):
    numbers['rank0_stale_warning'] = stale[0].warnings
    expected = stale[0].expected_early
    numbers['rank0_stale_early_factors'] = expected
    problems = []
    if any(run.warnings for run in stale[1:]):
        problems.append('warnings on other ranks: {}'.format(
            [run.warnings for run in stale[1:]]))
    said = stale[0].warnings
    if len(said) != 1:
        return 'rank 0 logged {} warnings, not one: {}'.format(len(said),
                                                                said)
    message = said[0]
    if stale[0].warnings_at_load:
        problems.append('the warning came at the load, not at the first '
                        'update')
    if stale[0].warnings_after_first != 1:
        problems.append('{} warnings after the first update'.format(
            stale[0].warnings_after_first))
    if not expected:
        problems.append('rank 0 owns every layer: nothing to rebuild')
    elif str(expected) not in re.findall(r'\d+', message):
        problems.append('the warning does not say {} factors: {!r}'.format(
            expected, message))
    if 'create_multi_node_checkpointer' not in message:
        problems.append('the warning does not say how to resume exactly '
                        '(per-rank files): {!r}'.format(message))
    return 'ok' if not problems else '; '.join(problems)


def check_rank0_trains_on(full, stale, numbers):
    numbers['loss_rank0_stale'] = mean_loss(stale, FULL)
    numbers['loss_rank0_stale_by_iteration'] = [
        mean_loss(stale, i) for i in range(STOP + 1, FULL + 1)]
    numbers['loss_full_by_iteration'] = [
        mean_loss(full, i) for i in range(STOP + 1, FULL + 1)]
    numbers['rank0_stale_max_difference'] = max(
        max_difference(r.params, f.params) for r, f in zip(stale, full))
    numbers['rank0_stale_exact'] = all(
        same_params(r.params, f.params) for r, f in zip(stale, full))
    problems = []
    losses = [run.loss[i] for run in stale for i in run.loss]
    if sorted(stale[0].loss) != list(range(STOP + 1, FULL + 1)):
        problems.append('ran iterations {}'.format(sorted(stale[0].loss)))
    if not all(math.isfinite(v) for v in losses):
        problems.append('non-finite losses {}'.format(losses))
    if not all(numpy.isfinite(v).all() for v in stale[0].params.values()):
        problems.append('non-finite parameters')
    if not all(same_params(run.params, stale[0].params) for run in stale):
        problems.append('parameters differ between ranks')
    if not mean_loss(stale, FULL) < 1.5 * mean_loss(full, FULL) + 0.1:
        problems.append('loss {} at iteration {}, uninterrupted {}'.format(
            mean_loss(stale, FULL), FULL, mean_loss(full, FULL)))
    return 'ok' if not problems else '; '.join(problems)


def check_rank0_refresh_exact(full, refresh, numbers):
    numbers['loss_rank0_refresh'] = mean_loss(refresh, FULL)
    worst = max(max_difference(r.params, f.params)
                for r, f in zip(refresh, full))
    numbers['rank0_refresh_max_difference'] = worst
    said = [run.warnings for run in refresh]
    problems = ['warnings: {}'.format(said)] if any(said) else []
    problems += differences(refresh, full, worst)
    return 'ok' if not problems else '; '.join(problems)


CHECKS = (
    ('accuracy', ('train',), check_accuracy),
    ('accuracy_same_on_every_rank', ('train',), check_accuracy_same),
    ('parameters_same_on_every_rank', ('train',), check_params_same),
    ('checkpointer_resume_is_exact', ('full', 'interrupted', 'checkpointer'),
     check_checkpointer_exact),
    ('checkpointer_resume_warns_nothing', ('interrupted', 'checkpointer'),
     check_checkpointer_silent),
    ('rank0_snapshot_stale_warns_once', ('interrupted', 'rank0_stale'),
     check_rank0_warns),
    ('rank0_snapshot_stale_trains_on', ('full', 'interrupted', 'rank0_stale'),
     check_rank0_trains_on),
    ('rank0_snapshot_at_refresh_is_exact',
     ('full', 'interrupted', 'rank0_refresh'), check_rank0_refresh_exact),
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    parser.add_argument('--runs', nargs='*', help='only these runs (and '
                        'their checks)')
    parser.add_argument('--links', choices=('lazy', 'sized'), default='lazy')
    args = parser.parse_args()
    N_IN[0] = None if args.links == 'lazy' else 64
    comm = chainermn.create_communicator('naive')
    data = load_data(comm)
    runs = {
        'train': lambda out: run_train(comm, data, out),
        'full': lambda out: run_full(comm, data, out),
        'interrupted': lambda out: run_interrupted(comm, data, out),
        'checkpointer': lambda out: run_checkpointer(comm, data, out),
        'rank0_stale': lambda out: run_rank0(comm, data, out, STOP),
        'rank0_refresh': lambda out: run_rank0(comm, data, out, REFRESH),
    }
    done, failed, seconds = {}, {}, {}
    for name, run in runs.items():
        if args.runs and name not in args.runs:
            continue
        out = os.path.join(args.out, name)
        if name == 'checkpointer' and comm.rank == 0 and \
                'interrupted' in done:
            # maybe_load reads the interrupted run's files; this run's own
            # (and its finalize()) then stay out of that folder
            shutil.copytree(os.path.join(args.out, 'interrupted'), out)
        comm.mpi_comm.Barrier()
        start = time.perf_counter()
        try:
            done[name] = comm.gather_obj(run(out))
        except Exception:
            failed[name] = traceback.format_exc()
        seconds[name] = round(time.perf_counter() - start, 2)
    if comm.rank != 0:
        return
    numbers = {'seconds': seconds}
    results = {}
    for check, needs, function in CHECKS:
        missing = [n for n in needs if n not in done]
        if args.runs and any(n not in args.runs for n in needs):
            continue
        if missing:
            results[check] = 'run {} failed:\n{}'.format(
                missing[0], failed.get(missing[0], '(on another rank)'))
            continue
        try:
            results[check] = function(*[done[n] for n in needs
                                        if n != 'interrupted'], numbers)
        except Exception:
            results[check] = traceback.format_exc()
    results['numbers'] = numbers
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1, sort_keys=True)


if __name__ == '__main__':
    main()
