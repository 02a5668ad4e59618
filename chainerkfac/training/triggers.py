"""Triggers of the trainer's extensions beyond Chainer's own."""

import typing


class AnyTrigger(object):
    """Fires when any of its triggers fires (each is called every time, so
    every interval trigger keeps its own count).

    Used for the snapshot: every ``train.snapshot_interval`` updates and at
    the end of the run.
    """

    def __init__(self, *triggers: typing.Callable) -> None:
        self.triggers = triggers

    def __call__(self, trainer: typing.Any) -> bool:
        return any([trigger(trainer) for trigger in self.triggers])

    def serialize(self, serializer: typing.Any) -> None:
        for i, trigger in enumerate(self.triggers):
            trigger.serialize(serializer[str(i)])
