"""The snapshot folder format: rank files, manifest, atomic commit.

A snapshot is a folder ``snapshot_iter_<n>`` (n: the updater's iteration)
holding one npz file per rank (``rank_<r>.npz``, no pickled objects) and
``manifest.json``, written last: the format, the iteration, the optimizer's
t, the number of processes, the per-process batch and accumulation steps,
the identity of the run, for every K-FAC layer the rank whose file holds
its state, and every rank file with its size.

It is written in a hidden folder ``.snapshot_iter_<n>.tmp-<token>``
(:func:`make_folder`) and committed by one rename (:func:`publish`); a
process killed at any point leaves at most a hidden folder, which is
ignored and later removed.  A snapshot is *complete* (:func:`read_manifest`)
when its manifest is readable and every rank file it lists is there with
its size and a readable zip directory.
"""

import binascii
import json
import os
import re
import shutil
import typing
import zipfile

import numpy

from chainerkfac import errors
from chainerkfac import files

PATTERN = re.compile(r'^snapshot_iter_(\d+)$')
LEFTOVER = re.compile(r'^\.snapshot_iter_\d+\.(tmp|old)-[0-9a-f]+$')
MANIFEST = 'manifest.json'
FORMAT = 1


class SnapshotError(Exception):
    """A snapshot that cannot be written, found or resumed (one line)."""


def rank_file(rank: int) -> str:
    """The name of rank ``rank``'s file in a snapshot folder."""
    return 'rank_{}.npz'.format(rank)


def write_npz(arrays: dict, path: str) -> int:
    """Writes ``{key: array}`` as the npz ``path`` atomically; its size."""
    with files.atomic_write(path) as f:
        numpy.savez(f, **arrays)
    return os.path.getsize(path)


def write_manifest(folder: str, manifest: dict) -> None:
    """Writes ``manifest.json`` into ``folder`` atomically."""
    with files.atomic_write(os.path.join(folder, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())


def snapshots(out_dir: str) -> typing.List[typing.Tuple[int, str]]:
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


def read_manifest(path: str, identity: typing.Optional[dict] = None) -> dict:
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
        listed = {str(name): int(size)
                  for name, size in manifest['files'].items()}
        expected = set(rank_file(r) for r in range(manifest['processes']))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail('incomplete snapshot: {}: {}'.format(MANIFEST,
                                                  errors.one_line(e)))
    if set(listed) != expected:
        fail('incomplete snapshot: {} lists {} files for {} processes'
             .format(MANIFEST, len(listed), len(expected)))
    for name, size in sorted(listed.items()):
        file_path = os.path.join(path, name)
        try:
            actual = os.path.getsize(file_path)
            with zipfile.ZipFile(file_path):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            fail('incomplete snapshot: {}: {}'.format(name,
                                                      errors.one_line(e)))
        if actual != size:
            fail('incomplete snapshot: {}: {} bytes, manifest says {}'
                 .format(name, actual, size))
    try:
        check_identity(manifest, identity)
    except SnapshotError as e:
        fail(e)
    return manifest


def find_latest_snapshot(out_dir: str, skipped: typing.Optional[list] = None
                         ) -> typing.Optional[str]:
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


def check_identity(manifest: dict, identity: typing.Optional[dict]) -> None:
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


# -- the atomic commit --------------------------------------------------------

def _token():
    return binascii.hexlify(os.urandom(6)).decode()


def make_folder(out: str, name: str) -> str:
    """Makes the hidden folder the snapshot ``name`` is written in."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, '.{}.tmp-{}'.format(name, _token()))
    os.mkdir(tmp)
    return tmp


def publish(tmp: str, out: str, name: str, manifest: dict,
            keep: typing.Optional[int]) -> str:
    """Every rank file written in ``tmp``: writes the manifest, renames
    ``tmp`` to ``out/name`` and removes the snapshots beyond the newest
    ``keep`` (None: none) and leftovers of interrupted writes.  A folder of
    that name (written by a run resumed earlier) is renamed away first;
    anything else of that name is left alone and the commit fails."""
    write_manifest(tmp, manifest)
    files.fsync_folder(tmp)
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
    files.fsync_folder(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_old(out, keep)
    return path


def remove_old(out: str, keep: typing.Optional[int]) -> None:
    """Snapshots beyond the newest ``keep`` (renamed away first, so none is
    ever seen half removed) and leftovers of interrupted writes."""
    doomed = []
    if keep is not None:
        for iteration, path in snapshots(out)[:-keep]:
            hidden = os.path.join(out, '.snapshot_iter_{}.old-{}'.format(
                iteration, _token()))
            os.rename(path, hidden)
            doomed.append(hidden)
    doomed.extend(os.path.join(out, name) for name in os.listdir(out)
                  if LEFTOVER.match(name))
    for path in sorted(set(doomed)):
        shutil.rmtree(path, ignore_errors=True)
