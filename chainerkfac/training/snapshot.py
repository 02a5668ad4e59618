"""Snapshots written atomically, the last k kept, the newest valid found.

A snapshot is an npz of the trainer's serialization (model, optimizer with
its factors and w(t−1), updater with the iterator position and the mixup
and erasing random states) without pickled objects.  It is written to a
temporary file in the same folder, synced and renamed over its name, so a
process killed while writing leaves the previous snapshots intact.
"""

import os
import re
import zipfile

import numpy

import chainer
from chainer.training import extension

PATTERN = re.compile(r'^snapshot_iter_(\d+)$')


def save_snapshot(target, path):
    """Serializes ``target`` into the npz ``path`` atomically; returns it."""
    serializer = chainer.serializers.DictionarySerializer()
    serializer.save(target)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, '.{}.tmp-{}'.format(os.path.basename(path),
                                                   os.getpid()))
    try:
        with open(tmp, 'wb') as f:
            numpy.savez(f, **serializer.target)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def is_valid(path):
    """True when ``path`` is a complete npz without pickled objects."""
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                npz[key]
        return True
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def snapshots(out_dir):
    """``[(iteration, path)]`` of the snapshot files, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        match = PATTERN.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def find_latest_snapshot(out_dir):
    """The newest valid ``snapshot_iter_<n>`` in ``out_dir``, or None."""
    for _, path in reversed(snapshots(out_dir)):
        if is_valid(path):
            return path
    return None


def load_snapshot(path, target):
    if not is_valid(path):
        raise ValueError('{}: not a complete snapshot'.format(path))
    chainer.serializers.load_npz(path, target)


class AtomicSnapshot(extension.Extension):
    """Writes ``snapshot_iter_<iteration>`` of the trainer atomically and
    keeps the newest ``keep`` (older ones are removed after the new one is
    complete).  Register it on one rank."""

    priority = extension.PRIORITY_WRITER

    def __init__(self, keep=3):
        self.keep = keep

    def __call__(self, trainer):
        self.save_now(trainer)

    def save_now(self, trainer):
        path = os.path.join(trainer.out, 'snapshot_iter_{}'.format(
            trainer.updater.iteration))
        save_snapshot(trainer, path)
        for _, old in snapshots(trainer.out)[:-self.keep]:
            os.remove(old)
        return path
