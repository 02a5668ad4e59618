"""Snapshots of a training run on one or many processes: atomic, complete
for every rank, resumed exactly.

* :mod:`~chainerkfac.training.snapshot.store`: the folder format (rank
  files, manifest), completeness, the atomic commit;
* :mod:`~chainerkfac.training.snapshot.partition`: which keys belong to
  which process, as the updater and the optimizer declare them;
* :mod:`~chainerkfac.training.snapshot.collective`: writing and resuming on
  every rank (:func:`save_snapshot`, :func:`load_snapshot`,
  :class:`AtomicSnapshot`).
"""

from chainerkfac.training.snapshot.store import check_identity  # NOQA
from chainerkfac.training.snapshot.store import find_latest_snapshot  # NOQA
from chainerkfac.training.snapshot.store import FORMAT  # NOQA
from chainerkfac.training.snapshot.store import LEFTOVER  # NOQA
from chainerkfac.training.snapshot.store import MANIFEST  # NOQA
from chainerkfac.training.snapshot.store import PATTERN  # NOQA
from chainerkfac.training.snapshot.store import rank_file  # NOQA
from chainerkfac.training.snapshot.store import read_manifest  # NOQA
from chainerkfac.training.snapshot.store import snapshots  # NOQA
from chainerkfac.training.snapshot.store import SnapshotError  # NOQA
from chainerkfac.training.snapshot.store import write_npz  # NOQA
from chainerkfac.training.snapshot.partition import Partition  # NOQA
from chainerkfac.training.snapshot.partition import TRIGGER_STATE  # NOQA
from chainerkfac.training.snapshot.collective import AtomicSnapshot  # NOQA
from chainerkfac.training.snapshot.collective import describe  # NOQA
from chainerkfac.training.snapshot.collective import load_snapshot  # NOQA
from chainerkfac.training.snapshot.collective import resolve_snapshot  # NOQA
from chainerkfac.training.snapshot.collective import save_snapshot  # NOQA
