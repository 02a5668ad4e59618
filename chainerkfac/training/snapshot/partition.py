"""Which keys of a trainer's serialization belong to which process.

Rank 0's file holds the whole serialization of rank 0's trainer; the file
of any other rank r holds what is r's own:

* the keys its components declare per process: the updater's
  ``process_keys`` (prefixes of its serialization;
  :class:`~chainerkfac.training.KFACUpdater`: its data iterator, running
  mixup and erasing random state; any other updater: its iterators);
* the model's persistent values (BatchNormalization's running statistics
  follow each process's batches);
* the K-FAC state (factors, their scales, damped inverses) of the layers r
  is the primary owner of: the optimizer declares the section of its
  serialization that holds each layer's state under the layer's name
  (``layer_state_section``, :class:`~chainerkfac.optimizers.KFAC`) and
  which layers a process holds (``primary_layers``) and owns
  (``owned_layers``).

When loading (:class:`Source`), a process takes rank 0's file, its own keys
from its own file on the same layout, and the K-FAC state of the layers it
owns from the files of their holders.
"""

import os
import typing

import numpy

import chainer

from chainerkfac.training.snapshot import store

#: The per-process keys of an updater that declares none: its iterators.
DEFAULT_PROCESS_KEYS = ('iterator:',)
#: Trigger state that another layout drops (Chainer's triggers then derive
#: it from the updater).
TRIGGER_STATE = ('previous_iteration', 'previous_epoch_detail')
_EMPTY = numpy.zeros((0,), dtype=numpy.float32)


class Partition(object):
    """The keys of a trainer's serialization by owner (see the module)."""

    def __init__(self, trainer: chainer.training.Trainer):
        updater = trainer.updater
        self.process_prefixes = tuple(
            'updater/' + key for key in
            getattr(updater, 'process_keys', DEFAULT_PROCESS_KEYS))
        self.params = set()
        self.models = []
        for name, optimizer in updater.get_all_optimizers().items():
            model = 'updater/model:{}'.format(name)
            self.models.append(model + '/')
            self.params.update(model + param for param, _ in
                               optimizer.target.namedparams(
                                   include_uninit=True))
        self.optimizer = updater.get_optimizer('main')
        section = getattr(self.optimizer, 'layer_state_section', None)
        self.root = 'updater/optimizer:main/{}/'.format(section) \
            if section is not None else None
        self.layer_names = {
            layer.name.strip('/'): layer.name
            for layer in getattr(self.optimizer, 'kfac_layers', ())}

    def layer_of(self, key: str) -> typing.Optional[str]:
        """The K-FAC layer whose state ``key`` is, or None."""
        if self.root is None or not key.startswith(self.root):
            return None
        return self.layer_names.get(key[len(self.root):].rsplit('/', 1)[0])

    def is_process_key(self, key: str) -> bool:
        """One process's own: declared per process, or a model persistent
        value."""
        return key.startswith(self.process_prefixes) or (
            key.startswith(tuple(self.models)) and key not in self.params)

    def held(self) -> typing.List[str]:
        """Names of the layers whose K-FAC state this process writes."""
        primary = getattr(self.optimizer, 'primary_layers', None)
        return [layer.name for layer in primary()] if primary else []

    def owned(self) -> typing.Set[str]:
        """Names of the layers whose K-FAC state this process loads."""
        plan = getattr(self.optimizer, 'plan', None)
        if plan is not None:
            plan()
        owned = getattr(self.optimizer, 'owned_layers', None)
        return set(layer.name for layer in owned()) if owned else set()

    def own_arrays(self, trainer: chainer.training.Trainer, rank: int,
                   held: typing.Iterable[str]) -> dict:
        """What ``rank`` writes: everything on rank 0, its own keys and the
        K-FAC state of the layers ``held`` on the others."""
        if rank == 0:
            def keep(key):
                return True
        else:
            held = set(held)

            def keep(key):
                return self.is_process_key(key) or self.layer_of(key) in held
        serializer = _Filtered(keep)
        trainer.serialize(serializer)
        return serializer.target


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


class Source(object):
    """The arrays one process loads, as a read-only mapping for
    ``NpzDeserializer``: rank 0's file, this rank's own keys (same layout),
    the K-FAC state of the layers it owns from their holders' files, and the
    values another layout replaces (the iteration, the triggers' state)."""

    def __init__(self, path: str, manifest: dict, partition: Partition,
                 rank: int, same: bool, owned: typing.Set[str],
                 iteration: int):
        self.path = path
        self.holders = manifest['layers']
        self.partition = partition
        self.rank = rank
        self.same = same
        self.owned = owned
        self.iteration = iteration
        self.files = {}

    def _file(self, rank):
        npz = self.files.get(rank)
        if npz is None:
            npz = numpy.load(os.path.join(self.path, store.rank_file(rank)),
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
        layer = self.partition.layer_of(key)
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
        own = self.same and self.partition.is_process_key(key)
        return self._file(self.rank if own else 0)[key]

    def close(self) -> None:
        for npz in self.files.values():
            npz.close()
        self.files = {}
