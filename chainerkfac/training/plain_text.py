"""Console output without terminal control codes."""

import re
import sys
import typing

#: ANSI escape sequences (cursor moves, erase) and carriage returns
CONTROL = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]|\r')


class PlainText(object):
    """A text stream that writes to ``out`` (default: the current
    ``sys.stdout``) without terminal control codes: Chainer's
    ``PrintReport`` erases the progress bar before every row with
    ``ESC[J``, which a log file would keep."""

    def __init__(self, out: typing.Optional[typing.TextIO] = None) -> None:
        self._out = out

    @property
    def out(self) -> typing.TextIO:
        return self._out if self._out is not None else sys.stdout

    def write(self, text: str) -> int:
        return self.out.write(CONTROL.sub('', text))

    def flush(self) -> None:
        self.out.flush()
