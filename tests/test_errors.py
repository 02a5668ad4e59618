"""One atomic-write helper (``chainerkfac.files``) and one collective-error
helper (``chainerkfac.errors``)."""

import os
import subprocess
import sys

import pytest

import tests

from chainerkfac.distributed import agreement
from chainerkfac import errors
from chainerkfac import files

from tests.mpi import mpi_env
from tests.mpi import mpiexec

ROOT = tests.ROOT


# -- atomic_write -------------------------------------------------------------

def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / 'f.bin'
    path.write_bytes(b'old')
    with files.atomic_write(str(path)) as f:
        f.write(b'new content')
        assert path.read_bytes() == b'old'  # not yet
    assert path.read_bytes() == b'new content'
    assert os.listdir(str(tmp_path)) == ['f.bin']


def test_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'f.txt'
    path.write_text('old\n')
    for error in (OSError('disk full'), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with files.atomic_write(str(path), 'w') as f:
                f.write('half')
                raise error
        assert path.read_text() == 'old\n'
        assert os.listdir(str(tmp_path)) == ['f.txt']


def test_failing_first_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        with files.atomic_write(str(tmp_path / 'new.txt'), 'w') as f:
            f.write('x')
            raise OSError('killed')
    assert os.listdir(str(tmp_path)) == []


def test_append_lines(tmp_path):
    path = tmp_path / 'log.jsonl'
    files.append_lines(str(path), ['a'])
    files.append_lines(str(path), iter(['b', 'c']))
    files.append_lines(str(path), [])
    assert path.read_text() == 'a\nb\nc\n'
    assert os.listdir(str(tmp_path)) == ['log.jsonl']


def test_atomic_write_refuses_other_modes(tmp_path):
    with pytest.raises(ValueError):
        with files.atomic_write(str(tmp_path / 'x'), 'a'):
            pass


# -- one line, on every rank --------------------------------------------------

def test_one_line():
    assert errors.one_line(OSError('no\n  such\tfile ')) == 'no such file'
    assert errors.one_line(KeyError()) == 'KeyError'


def test_agree_on_one_process():
    assert agreement.agree(None, lambda: 3) == [3]
    assert agreement.agree(None, lambda: 3, root=0) == 3
    assert agreement.on_root(None, lambda: 'x') == 'x'

    def fail():
        raise OSError('disk\nfull')
    with pytest.raises(ValueError) as e:
        agreement.agree(None, fail, error=ValueError, what='writing')
    assert str(e.value) == 'writing: disk full'  # the only rank: no rank
    with pytest.raises(ValueError) as e:  # a rank's own file: named
        agreement.agree(None, fail, error=ValueError, what='writing',
                     name_rank=True)
    assert str(e.value) == 'writing: rank 0: disk full'
    with pytest.raises(RuntimeError) as e:
        agreement.on_root(None, fail)
    assert str(e.value) == 'disk full'
    with pytest.raises(OSError):  # not caught: propagates as is
        agreement.agree(None, fail, catch=KeyError)


def test_communicator_names_are_the_same_helpers():
    from chainerkfac.distributed import communicator
    assert communicator.one_line is errors.one_line


@pytest.mark.skipif(mpiexec() is None, reason='no mpiexec')
def test_one_rank_failing_makes_both_raise_the_same_line():
    proc = subprocess.run(
        [mpiexec(), '-n', '2', '--oversubscribe', sys.executable,
         os.path.join(ROOT, 'tests', 'mpi', 'errors_worker.py')],
        cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines()
                   if line.startswith('rank '))
    expected = ('RuntimeError: step: rank 1: disk full | '
                'ValueError: disk full')
    assert lines == ['rank 0: ' + expected, 'rank 1: ' + expected], \
        proc.stdout[-3000:]
    assert proc.stdout.count('results: [0, 10]') == 2
