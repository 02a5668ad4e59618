"""Files written whole or not at all.

Every file the library writes whole (snapshot rank files and manifests, the
cached mean image, the batch-scaling study's settings) goes through
:func:`atomic_write`: the content is written to a temporary file in the same
folder, synced to disk and renamed over the target in one step, so a reader
(or a run resumed after a kill) sees the old file or the new one, never a
part.  The logs that grow by records (the FisherDiff log, the study's trial
records) go through :func:`append_lines`: whole lines, appended and synced.
"""

import contextlib
import os
import typing

__all__ = ['atomic_write', 'append_lines', 'fsync_folder']


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb') -> typing.Iterator[typing.IO]:
    """A file object open on a temporary file beside ``path``; when the
    block ends without an error it is synced and renamed to ``path``
    (``os.replace``); on an error it is removed and ``path`` is left as it
    was.

    Args:
        path (str): the file to write (its folder must exist).
        mode (str): ``'wb'`` or ``'w'``.
    """
    if mode not in ('wb', 'w'):
        raise ValueError("atomic_write: mode must be 'wb' or 'w', got "
                         "{!r}".format(mode))
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, '.{}.tmp-{}'.format(base, os.getpid()))
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def append_lines(path: str, lines: typing.Iterable[str]) -> None:
    """Appends ``lines`` (each without its newline) to ``path`` and syncs
    it: a run killed meanwhile leaves at most its last line incomplete,
    which readers of these logs skip or report."""
    with open(path, 'a') as f:
        for line in lines:
            f.write(line + '\n')
        f.flush()
        os.fsync(f.fileno())


def fsync_folder(path: str) -> None:
    """Syncs the folder ``path`` itself (the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
