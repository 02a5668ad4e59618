"""Errors in one line: an exception's text (:func:`one_line`) and the check
of a choice (:func:`check_choice`).  Agreeing on an error across processes
is :mod:`chainerkfac.distributed.agreement`'s."""

import typing

__all__ = ['one_line', 'check_choice']


def one_line(error: typing.Any) -> str:
    """The text of an exception on one line (its type name when empty)."""
    return ' '.join(str(error).split()) or type(error).__name__


def check_choice(name: str, value: typing.Any, choices: typing.Sequence,
                 error: type = ValueError) -> None:
    """Raises ``error`` naming ``name`` unless ``value`` is one of
    ``choices``: ``name must be one of 'a', 'b', got 'c'``."""
    if value not in choices:
        raise error('{} must be one of {}, got {!r}'.format(
            name, ', '.join(repr(c) for c in choices), value))
