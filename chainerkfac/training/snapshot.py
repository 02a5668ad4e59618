"""Snapshots of a training run on one or many processes: atomic, complete
for every rank, resumed exactly.

A snapshot is a folder ``snapshot_iter_<n>`` (n: the updater's iteration)
in the trainer's output folder, which every rank must see (a shared file
system), holding npz files without pickled objects and a manifest:

* ``rank_0.npz``: rank 0's whole trainer serialization: model, optimizer
  (t, w(t−1), which K-FAC factors have been built), updater, extensions and
  their triggers, and rank 0's own state as below;
* ``rank_<r>.npz`` for every other rank r: what is r's own: the keys under
  :data:`PROCESS_PREFIXES` (its data iterator, running mixup, random-erasing
  state), the model's persistent values (BatchNormalization's running
  statistics follow each process's batches) and the K-FAC state (factors,
  their scales, damped inverses) of the layers r is the primary owner of;
* ``manifest.json``, written last: the iteration, the optimizer's t, the
  number of processes, the per-process batch and accumulation steps, the
  identity of the run (:meth:`chainerkfac.config.Config.identity`), for
  every K-FAC layer the rank whose file holds its state, and every rank
  file with its size.

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

Complete (:func:`read_manifest`, :func:`find_latest_snapshot`): the
manifest is readable and every rank file it lists is there with its size
and a readable zip directory.  ``find_latest_snapshot`` returns the newest
complete snapshot.

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

import binascii
import json
import logging
import os
import re
import shutil
import zipfile

import numpy

import chainer
from chainer.training import extension

from chainerkfac.distributed import communicator as communicator_module
from chainerkfac.optimizers import kfac as kfac_module
from chainerkfac.training import updater as updater_module

logger = logging.getLogger('chainerkfac')

PATTERN = re.compile(r'^snapshot_iter_(\d+)$')
LEFTOVER = re.compile(r'^\.snapshot_iter_\d+\.(tmp|old)-[0-9a-f]+$')
MANIFEST = 'manifest.json'
FORMAT = 1
#: Keys of a trainer's serialization that are one process's own (besides
#: the model's persistent values and the K-FAC state of its layers).
PROCESS_PREFIXES = ('updater/iterator:', 'updater/mixup/',
                    'updater/erase_rng/')
#: Trigger state that another layout drops (Chainer's triggers then derive
#: it from the updater).
TRIGGER_STATE = ('previous_iteration', 'previous_epoch_detail')
_EMPTY = numpy.zeros((0,), dtype=numpy.float32)


class SnapshotError(Exception):
    """A snapshot that cannot be written, found or resumed (one line)."""


def rank_file(rank):
    return 'rank_{}.npz'.format(rank)


# -- files --------------------------------------------------------------------

def _atomic_write(path, write):
    """``write(f)`` into a temporary file beside ``path``, synced, renamed
    to ``path``; returns its size."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, '.{}.tmp-{}'.format(base, os.getpid()))
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def write_npz(arrays, path):
    """Writes ``{key: array}`` as the npz ``path`` atomically; its size."""
    return _atomic_write(path, lambda f: numpy.savez(f, **arrays))


def _fsync_folder(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshots(out_dir):
    """``[(iteration, path)]`` of the ``snapshot_iter_<n>`` folders, oldest
    first (complete or not)."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        match = PATTERN.match(name)
        path = os.path.join(out_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_manifest(path, identity=None):
    """The manifest of the snapshot folder ``path``, checked complete (and
    of ``identity``, see :func:`check_identity`); :class:`SnapshotError`
    (``<path>: <problem>``) otherwise."""
    def fail(problem):
        raise SnapshotError('{}: {}'.format(path, problem))

    if not os.path.exists(path):
        fail('no such snapshot')
    if not os.path.isdir(path):
        fail('not a snapshot folder (single-file snapshots of earlier '
             'versions cannot be resumed)')
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        if manifest['format'] != FORMAT:
            fail('snapshot format {}, expected {}'.format(
                manifest['format'], FORMAT))
        files = {str(name): int(size)
                 for name, size in manifest['files'].items()}
        expected = set(rank_file(r) for r in range(manifest['processes']))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail('incomplete snapshot: {}: {}'.format(
            MANIFEST, communicator_module.one_line(e)))
    if set(files) != expected:
        fail('incomplete snapshot: {} lists {} files for {} processes'
             .format(MANIFEST, len(files), len(expected)))
    for name, size in sorted(files.items()):
        file_path = os.path.join(path, name)
        try:
            actual = os.path.getsize(file_path)
            with zipfile.ZipFile(file_path):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            fail('incomplete snapshot: {}: {}'.format(
                name, communicator_module.one_line(e)))
        if actual != size:
            fail('incomplete snapshot: {}: {} bytes, manifest says {}'
                 .format(name, actual, size))
    try:
        check_identity(manifest, identity)
    except SnapshotError as e:
        fail(e)
    return manifest


def find_latest_snapshot(out_dir, skipped=None):
    """The newest complete ``snapshot_iter_<n>`` folder in ``out_dir``, or
    None; ``skipped``, a list, receives ``(path, why)`` of every newer
    snapshot passed over."""
    for _, path in reversed(snapshots(out_dir)):
        try:
            read_manifest(path)
        except SnapshotError as e:
            if skipped is not None:
                skipped.append((path, str(e)))
            continue
        return path
    return None


def resolve_snapshot(spec, out_dir, identity=None):
    """``spec``: a snapshot folder, or ``'auto'``: the newest complete one in
    ``out_dir`` (None when there is none).  Returns the path, checked
    complete and of ``identity`` (:func:`read_manifest`)."""
    if spec == 'auto':
        skipped = []
        path = find_latest_snapshot(out_dir, skipped)
        for newer, why in skipped:
            logger.warning('--resume auto: skipping %s: %s', newer, why)
    else:
        path = spec
    if path is not None:
        read_manifest(path, identity)
    return path


def check_identity(manifest, identity):
    """Raises :class:`SnapshotError` naming the first key whose value
    differs between the snapshot's identity and ``identity`` (None: no
    check)."""
    if identity is None:
        return
    now = json.loads(json.dumps(identity))
    saved = manifest.get('config', {})
    for key in sorted(set(now) | set(saved)):
        if saved.get(key, '(none)') != now.get(key, '(none)'):
            raise SnapshotError('{} differs: snapshot {}, now {}'.format(
                key, _show(saved.get(key, '(none)')),
                _show(now.get(key, '(none)'))))


def _show(value):
    return json.dumps(value) if not isinstance(value, str) else value


# -- collectives --------------------------------------------------------------

class _OneProcess(object):
    rank = 0
    size = 1

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]


def _mpi(comm):
    """An mpi4py-like communicator: ChainerMN's ``mpi_comm``, an mpi4py
    communicator as is, or one process for None."""
    if comm is None:
        return _OneProcess()
    return getattr(comm, 'mpi_comm', comm)


def _on_root(mpi, function):
    """``function()`` on rank 0; its result, or its error as a
    :class:`SnapshotError`, on every rank."""
    return communicator_module.on_root(mpi, function, error=SnapshotError)


def _agree(mpi, what, function):
    """``function()`` on every rank; a failure on any rank raises
    :class:`SnapshotError` on every rank.  Returns every rank's result."""
    result = error = None
    try:
        result = function()
    except Exception as e:
        error = communicator_module.one_line(e)
    reports = mpi.allgather((result, error))
    failed = [(r, e) for r, (_, e) in enumerate(reports) if e is not None]
    if failed:
        raise SnapshotError('{}: rank {}: {}'.format(what, *failed[0]))
    return [r for r, _ in reports]


# -- which keys belong to whom ------------------------------------------------

class _Keys(object):
    """The keys of a trainer's serialization by owner."""

    def __init__(self, trainer):
        updater = trainer.updater
        self.params = set()
        self.models = []
        for name, optimizer in updater.get_all_optimizers().items():
            model = 'updater/model:{}'.format(name)
            self.models.append(model + '/')
            self.params.update(model + param for param, _ in
                               optimizer.target.namedparams(
                                   include_uninit=True))
        self.optimizer = updater.get_optimizer('main')
        self.root = 'updater/optimizer:main/{}/'.format(
            kfac_module.STATE_SECTION)
        self.layer_names = {
            layer.name.strip('/'): layer.name
            for layer in getattr(self.optimizer, 'kfac_layers', ())}

    def layer_of(self, key):
        """The K-FAC layer whose state ``key`` is, or None."""
        if not key.startswith(self.root):
            return None
        return self.layer_names.get(key[len(self.root):].rsplit('/', 1)[0])

    def is_process_key(self, key):
        """One process's own: iterator, mixup, erasing, model persistents."""
        return key.startswith(PROCESS_PREFIXES) or (
            key.startswith(tuple(self.models)) and key not in self.params)

    def held(self):
        """Names of the layers whose K-FAC state this process writes."""
        primary = getattr(self.optimizer, 'primary_layers', None)
        return [layer.name for layer in primary()] if primary else []

    def owned(self):
        """Names of the layers whose K-FAC state this process loads."""
        plan = getattr(self.optimizer, 'plan', None)
        if plan is not None:
            plan()
        owned = getattr(self.optimizer, 'owned_layers', None)
        return set(layer.name for layer in owned()) if owned else set()


class _Filtered(chainer.serializers.DictionarySerializer):
    """A ``DictionarySerializer`` of the keys ``keep(key)`` accepts only."""

    def __init__(self, keep, target=None, path=''):
        super(_Filtered, self).__init__(target, path)
        self.keep = keep

    def __getitem__(self, key):
        return _Filtered(self.keep, self.target,
                         self.path + key.strip('/') + '/')

    def __call__(self, key, value):
        if not self.keep(self.path + key.lstrip('/')):
            return value
        return super(_Filtered, self).__call__(key, value)


def _own_arrays(trainer, keys, rank, held):
    """What ``rank`` writes: everything on rank 0, its own keys and the
    K-FAC state of the layers ``held`` on the others."""
    if rank == 0:
        def keep(key):
            return True
    else:
        held = set(held)

        def keep(key):
            return keys.is_process_key(key) or keys.layer_of(key) in held
    serializer = _Filtered(keep)
    trainer.serialize(serializer)
    return serializer.target


# -- writing ------------------------------------------------------------------

def save_snapshot(trainer, comm=None, identity=None, keep=None):
    """Writes ``snapshot_iter_<iteration>`` of ``trainer`` in its output
    folder (collective; see the module's docstring) and returns its path.

    Args:
        trainer: the trainer (same iteration on every rank).
        comm: a ChainerMN or mpi4py communicator, or None (one process).
        identity (dict): the run's identity, recorded in the manifest.
        keep (int): keep the newest ``keep`` snapshots (None: all).
    """
    mpi = _mpi(comm)
    out = trainer.out
    name = 'snapshot_iter_{}'.format(trainer.updater.iteration)
    tmp = _on_root(mpi, lambda: _make_folder(out, name))
    keys = _Keys(trainer)

    def write():
        held = keys.held()
        arrays = _own_arrays(trainer, keys, mpi.rank, held)
        return write_npz(arrays, os.path.join(tmp, rank_file(mpi.rank))), \
            held
    try:
        reports = _agree(mpi, '{}: not written'.format(name), write)
    except SnapshotError:
        if mpi.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _on_root(mpi, lambda: _publish(
        tmp, out, name, _manifest(trainer, mpi.size, identity, reports),
        keep))


def _make_folder(out, name):
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, '.{}.tmp-{}'.format(
        name, binascii.hexlify(os.urandom(6)).decode()))
    os.mkdir(tmp)
    return tmp


def _manifest(trainer, size, identity, reports):
    updater = trainer.updater
    optimizer = updater.get_optimizer('main')
    holders = {}
    for rank, (_, held) in enumerate(reports):
        for layer in held:
            holders.setdefault(layer, rank)
    return {
        'format': FORMAT,
        'iteration': int(updater.iteration),
        't': int(optimizer.t),
        'epoch_detail': float(updater.epoch_detail),
        'processes': size,
        'batch_per_process': int(updater.get_iterator('main').batch_size),
        'accumulation_steps': int(getattr(optimizer, 'accumulation_steps',
                                          1)),
        'config': identity if identity is not None else {},
        'layers': holders,
        'files': {rank_file(r): nbytes
                  for r, (nbytes, _) in enumerate(reports)},
    }


def _publish(tmp, out, name, manifest, keep):
    """Rank 0, all rank files written: manifest, rename, clean up."""
    _atomic_write(os.path.join(tmp, MANIFEST), lambda f: f.write(
        json.dumps(manifest, indent=1, sort_keys=True).encode()))
    _fsync_folder(tmp)
    path = os.path.join(out, name)
    old = None
    if os.path.lexists(path):  # written before by a run resumed earlier
        if not os.path.isdir(path) or os.path.islink(path):
            raise SnapshotError(
                '{}: not a snapshot folder (a snapshot file of an earlier '
                'version?): move it away; the new snapshot is left in {}'
                .format(path, tmp))
        old = tmp.replace('.tmp-', '.old-')
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_folder(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _remove_old(out, keep)
    return path


def _remove_old(out, keep):
    """Snapshots beyond the newest ``keep`` (renamed away first, so none is
    ever seen half removed) and leftovers of interrupted writes."""
    doomed = []
    if keep is not None:
        for iteration, path in snapshots(out)[:-keep]:
            hidden = os.path.join(out, '.snapshot_iter_{}.old-{}'.format(
                iteration, binascii.hexlify(os.urandom(6)).decode()))
            os.rename(path, hidden)
            doomed.append(hidden)
    doomed.extend(os.path.join(out, name) for name in os.listdir(out)
                  if LEFTOVER.match(name))
    for path in sorted(set(doomed)):
        shutil.rmtree(path, ignore_errors=True)


class AtomicSnapshot(extension.Extension):
    """Writes ``snapshot_iter_<iteration>`` of the trainer
    (:func:`save_snapshot`) and keeps the newest ``keep``.  Register it on
    every rank with the same trigger: writing is collective.

    It runs after every other extension of its iteration (the priority of
    Chainer's own snapshot extension), so that it holds their state of that
    iteration, e.g. the log entry ``LogReport`` has just written.

    Args:
        comm: a ChainerMN or mpi4py communicator, or None (one process).
        keep (int): how many snapshots to keep.
        identity (dict): the run's identity, recorded in the manifest.
    """

    priority = -100

    def __init__(self, comm=None, keep=3, identity=None):
        self.comm = comm
        self.keep = keep
        self.identity = identity

    def __call__(self, trainer):
        save_snapshot(trainer, self.comm, self.identity, self.keep)


# -- loading ------------------------------------------------------------------

class _Source(object):
    """The arrays one process loads, as a read-only mapping for
    ``NpzDeserializer``: rank 0's file, this rank's own keys (same layout),
    the K-FAC state of the layers it owns from their holders' files, and the
    values another layout replaces."""

    def __init__(self, path, manifest, keys, rank, same, owned, iteration):
        self.path = path
        self.holders = manifest['layers']
        self.keys = keys
        self.rank = rank
        self.same = same
        self.owned = owned
        self.iteration = iteration
        self.files = {}

    def _file(self, rank):
        npz = self.files.get(rank)
        if npz is None:
            npz = numpy.load(os.path.join(self.path, rank_file(rank)),
                             allow_pickle=False)
            self.files[rank] = npz
        return npz

    def __contains__(self, key):
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __getitem__(self, key):
        layer = self.keys.layer_of(key)
        if layer is not None:
            holder = self.holders.get(layer)
            if layer not in self.owned or holder is None:
                return _EMPTY
            return self._file(holder)[key]
        if not self.same:
            if key == 'updater/iteration':
                return numpy.asarray(self.iteration)
            if key.rsplit('/', 1)[-1] in TRIGGER_STATE:
                return numpy.asarray(-1)
        own = self.same and self.keys.is_process_key(key)
        return self._file(self.rank if own else 0)[key]

    def close(self):
        for npz in self.files.values():
            npz.close()
        self.files = {}


def load_snapshot(path, trainer, comm=None, identity=None):
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
    mpi = _mpi(comm)
    saved = _on_root(mpi, lambda: read_manifest(path, identity))
    updater = trainer.updater
    keys = _Keys(trainer)
    same = (saved['processes'] == mpi.size and saved['batch_per_process']
            == updater.get_iterator('main').batch_size)
    k = int(getattr(keys.optimizer, 'accumulation_steps', 1))

    def load():
        source = _Source(path, saved, keys, mpi.rank, same, keys.owned(),
                         saved['t'] * k)
        try:
            trainer.serialize(chainer.serializers.NpzDeserializer(
                source, ignore_names=None if same else
                lambda key: key.startswith(PROCESS_PREFIXES)))
        finally:
            source.close()
        if not same:
            updater_module.seek_iterator(updater.get_iterator('main'),
                                         updater.iteration)
            restart = getattr(updater, 'restart_process_state', None)
            if restart is not None:
                restart()
    _agree(mpi, '{}: not loaded'.format(path), load)
    return describe(path, saved, trainer, mpi.size, same)


def describe(path, saved, trainer, size, same):
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
