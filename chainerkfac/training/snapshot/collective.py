"""Snapshots of a training run on one or many processes: atomic, complete
for every rank, resumed exactly.

A snapshot is a folder ``snapshot_iter_<n>`` in the trainer's output
folder, which every rank must see (a shared file system): one npz file per
rank and a manifest (:mod:`~chainerkfac.training.snapshot.store`); rank 0's
file holds its whole trainer, every other rank's what is its own
(:mod:`~chainerkfac.training.snapshot.partition`).

Writing (:func:`save_snapshot`, :class:`AtomicSnapshot`; collective: every
rank calls it at the same iteration): rank 0 makes a hidden folder
``.snapshot_iter_<n>.tmp-<token>``; every rank writes its file there (a
temporary file, synced, renamed); the ranks exchange success flags; if all
succeeded, rank 0 writes the manifest the same way and renames the folder to
``snapshot_iter_<n>`` (one atomic rename), then removes the snapshots beyond
the newest ``keep`` and leftovers of interrupted writes.  If a rank failed,
nothing is renamed, the hidden folder is removed and every rank raises
:class:`SnapshotError`.  A process killed at any point leaves at most a
hidden folder, which is ignored: the previous snapshots stay whole.  A
folder of the same name (written by a run that was resumed from an earlier
snapshot) is renamed away before the new one takes its name; anything
else under that name (e.g. a single-file snapshot of an earlier version) is
left alone and the write fails.

Resuming (:func:`load_snapshot`, collective):

* the snapshot's identity must equal the run's (one differing key is a
  :class:`SnapshotError` naming it and both values);
* same layout (number of processes and per-process batch): rank r loads
  rank 0's file with its own keys taken from ``rank_<r>.npz`` and the K-FAC
  state of the layers it owns from their holders' files: the run continues
  exactly, with the loaded factors and inverses (nothing rebuilt);
* another layout (the global batch is the same; the processes or the
  per-process batch differ): the optimizer plans the layer assignment for
  the new number of processes and every process loads the K-FAC state of
  the layers it now owns from their old holders' files (all factors and
  inverses kept, nothing rebuilt).  The iteration becomes t × (the new
  accumulation steps); triggers re-derive their state from the updater
  (``LogReport``'s log is kept); the model's persistent values are rank
  0's.  Each process's iterator is put where it is after as many updates
  in a run on the new layout from the start (:func:`seek_iterator`): the
  same epoch, at the same fraction of it (up to the padding of the split),
  in the new per-process split's order for that epoch; the examples of
  that epoch seen before the interruption were those of the old split, so
  in that epoch some examples may come twice and others not at all, and
  from the next epoch on every example comes once per epoch again.  The
  updater's ``restart_process_state`` (if any) restarts the rest of its
  own state (:class:`KFACUpdater`: running mixup starts over, the random
  states are re-seeded from (seed, rank, iteration)).

A snapshot holds whole updates only: one taken inside an accumulation cycle
(the end of training can fall inside one) does not hold the gradients
accumulated so far, and a run resumed from it starts a new cycle there.

Only the ``'main'`` iterator and optimizer of the updater are considered.
Single-file snapshots of earlier versions cannot be resumed.
"""

import logging
import os
import shutil
import typing

import chainer
from chainer.training import extension

from chainerkfac.distributed import agreement
from chainerkfac.training import updater as updater_module
from chainerkfac.training.snapshot import partition as partition_module
from chainerkfac.training.snapshot import store
from chainerkfac.training.snapshot.store import SnapshotError

logger = logging.getLogger('chainerkfac')


def resolve_snapshot(spec: typing.Optional[str], out_dir: str,
                     identity: typing.Optional[dict] = None
                     ) -> typing.Optional[str]:
    """``spec``: a snapshot folder, or ``'auto'``: the newest complete one in
    ``out_dir`` (None when there is none).  Returns the path, checked
    complete and of ``identity`` (:func:`~store.read_manifest`)."""
    if spec == 'auto':
        skipped = []
        path = store.find_latest_snapshot(out_dir, skipped)
        for newer, why in skipped:
            logger.warning('--resume auto: skipping %s: %s', newer, why)
    else:
        path = spec
    if path is not None:
        store.read_manifest(path, identity)
    return path


def _on_root(comm, function):
    """``function()`` on rank 0; its result, or its error as a
    :class:`SnapshotError`, on every rank."""
    return agreement.agree(comm, function, root=0, error=SnapshotError)


# -- writing ------------------------------------------------------------------

def save_snapshot(trainer: chainer.training.Trainer, comm: typing.Any = None,
                  identity: typing.Optional[dict] = None,
                  keep: typing.Optional[int] = None) -> str:
    """Writes ``snapshot_iter_<iteration>`` of ``trainer`` in its output
    folder (collective; see the module's docstring) and returns its path.

    Args:
        trainer: the trainer (same iteration on every rank).
        comm: a ChainerMN or mpi4py communicator, or None (one process).
        identity (dict): the run's identity, recorded in the manifest.
        keep (int): keep the newest ``keep`` snapshots (None: all).
    """
    mpi = agreement.as_mpi(comm)
    out = trainer.out
    name = 'snapshot_iter_{}'.format(trainer.updater.iteration)
    tmp = _on_root(mpi, lambda: store.make_folder(out, name))
    partition = partition_module.Partition(trainer)

    def write():
        held = partition.held()
        arrays = partition.own_arrays(trainer, mpi.rank, held)
        path = os.path.join(tmp, store.rank_file(mpi.rank))
        return store.write_npz(arrays, path), held
    try:
        reports = agreement.agree(mpi, write, error=SnapshotError,
                               what='{}: not written'.format(name),
                               name_rank=True)
    except SnapshotError:
        if mpi.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _on_root(mpi, lambda: store.publish(
        tmp, out, name, _manifest(trainer, mpi.size, identity, reports),
        keep))


def _manifest(trainer, size, identity, reports):
    updater = trainer.updater
    optimizer = updater.get_optimizer('main')
    holders = {}
    for rank, (_, held) in enumerate(reports):
        for layer in held:
            holders.setdefault(layer, rank)
    return {
        'format': store.FORMAT,
        'iteration': int(updater.iteration),
        't': int(optimizer.t),
        'epoch_detail': float(updater.epoch_detail),
        'processes': size,
        'batch_per_process': int(updater.get_iterator('main').batch_size),
        'accumulation_steps': int(getattr(optimizer, 'accumulation_steps',
                                          1)),
        'config': identity if identity is not None else {},
        'layers': holders,
        'files': {store.rank_file(r): nbytes
                  for r, (nbytes, _) in enumerate(reports)},
    }


class AtomicSnapshot(extension.Extension):
    """Writes ``snapshot_iter_<iteration>`` of the trainer
    (:func:`save_snapshot`) and keeps the newest ``keep``.  Register it on
    every rank with the same trigger: writing is collective.

    It runs after every other extension of its iteration (the priority of
    Chainer's own snapshot extension), so that it holds their state of that
    iteration, e.g. the log entry ``LogReport`` has just written.

    It is an extension rather than a Chainer snapshot ``Writer``: a writer
    receives one flat serialization and a file name, while a snapshot here
    needs the trainer (which rank holds which layer, the per-process keys,
    the manifest's t and layout) and is a folder.

    Args:
        comm: a ChainerMN or mpi4py communicator, or None (one process).
        keep (int): how many snapshots to keep.
        identity (dict): the run's identity, recorded in the manifest.
    """

    priority = -100

    def __init__(self, comm: typing.Any = None, keep: typing.Optional[int] = 3,
                 identity: typing.Optional[dict] = None):
        self.comm = comm
        self.keep = keep
        self.identity = identity

    def __call__(self, trainer: chainer.training.Trainer) -> None:
        save_snapshot(trainer, self.comm, self.identity, self.keep)


# -- loading ------------------------------------------------------------------

def load_snapshot(path: str, trainer: chainer.training.Trainer,
                  comm: typing.Any = None,
                  identity: typing.Optional[dict] = None) -> str:
    """Loads the snapshot folder ``path`` into ``trainer`` on every rank
    (collective; see the module's docstring) and returns one line saying
    what was resumed.  Errors (incomplete snapshot, another identity, a
    failed load on any rank) raise :class:`SnapshotError` on every rank.

    Args:
        path: a complete snapshot folder.
        trainer: a trainer set up like the one that wrote it, before
            ``run()``; the model's parameters must be initialized.
        comm: a ChainerMN or mpi4py communicator, or None (one process).
        identity (dict): the run's identity; it must equal the snapshot's.
    """
    mpi = agreement.as_mpi(comm)
    saved = _on_root(mpi, lambda: store.read_manifest(path, identity))
    updater = trainer.updater
    partition = partition_module.Partition(trainer)
    same = (saved['processes'] == mpi.size and saved['batch_per_process']
            == updater.get_iterator('main').batch_size)
    k = int(getattr(partition.optimizer, 'accumulation_steps', 1))

    def load():
        source = partition_module.Source(
            path, saved, partition, mpi.rank, same, partition.owned(),
            saved['t'] * k)
        try:
            trainer.serialize(chainer.serializers.NpzDeserializer(
                source, ignore_names=None if same else
                lambda key: key.startswith(partition.process_prefixes)))
        finally:
            source.close()
        if not same:
            updater_module.seek_iterator(updater.get_iterator('main'),
                                         updater.iteration)
            restart = getattr(updater, 'restart_process_state', None)
            if restart is not None:
                restart()
    agreement.agree(mpi, load, error=SnapshotError,
                 what='{}: not loaded'.format(path), name_rank=True)
    return describe(path, saved, trainer, mpi.size, same)


def describe(path: str, saved: dict, trainer: chainer.training.Trainer,
             size: int, same: bool) -> str:
    """The line that says what was resumed (and how, on another layout)."""
    updater = trainer.updater
    line = 'resumed from {} at iteration {}'.format(path, updater.iteration)
    if same:
        return line
    iterator = updater.get_iterator('main')
    k = getattr(updater.get_optimizer('main'), 'accumulation_steps', 1)
    return (
        '{}: saved as {} per process x {} processes x {} accumulation steps, '
        'now {} x {} x {}: {}all factors kept; data: at epoch {:.3f} in this '
        'layout\'s order of that epoch, per-process state restarted'.format(
            line, saved['batch_per_process'], saved['processes'],
            saved['accumulation_steps'], iterator.batch_size, size, k,
            'layer assignment re-planned, '
            if saved['processes'] != size else '', iterator.epoch_detail))
