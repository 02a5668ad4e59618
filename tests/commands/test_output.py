"""What the commands say and write for a person to read: ``--help`` texts,
a missing MPI library, the layer assignment's line and ``plan.txt``, log
output without terminal control codes, the paths at the end, the line on
SIGINT/SIGTERM with the command that resumes, and ``make demo``'s
numbered output folders."""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy
import pytest

import tests

from chainerkfac.commands import make_synthetic
from chainerkfac.commands import train
from chainerkfac.datasets.synthetic import make_synthetic_tree
from chainerkfac.distributed import assignment as assignment_module
from chainerkfac.training import plain_text
from chainerkfac.training import trainer as trainer_module

from tests.mpi import mpi_env
from tests.mpi import mpiexec

ROOT = tests.ROOT
TRAIN = os.path.join(ROOT, 'scripts', 'train_imagenet.py')
MARKUP = re.compile(r'``|:(mod|class|func|meth|attr|data):`')
CONTROL = re.compile(r'\x1b|\r')
# 64 images, BS 32 = 16 per process x 2 processes: 2 updates per epoch
SHORT = ['--config', 'synthetic.yaml', '--set', 'train.log_interval=1',
         'train.fisher_diff=false', 'train.snapshot_interval=1']


def help_text(parse, capsys):
    with pytest.raises(SystemExit) as e:
        parse(['--help'])
    assert e.value.code == 0
    return capsys.readouterr().out


def options(text):
    """``{option: its help}`` from an argparse help text."""
    found, current = {}, None
    for line in text.splitlines():
        match = re.match(r'^  (-[-\w]+|[A-Z]+)([^ ]| [^ ])*( {2,}(.*))?$',
                         line)
        if match:
            current = match.group(1)
            found[current] = match.group(4) or ''
        elif current and line.startswith(' ' * 10) and line.strip():
            found[current] += ' ' + line.strip()
        elif not line.strip():
            current = None
    return found


def check_plain(text):
    assert not MARKUP.search(text), MARKUP.search(text).group(0)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # nothing said twice, no line wider than a terminal, nothing cut off
    assert len(lines) == len(set(lines)), text
    assert max(len(line) for line in text.splitlines()) <= 79, text
    description = text.split('\n\n')[1]
    assert description.rstrip().endswith('.'), description


def test_train_help_is_plain_text(capsys):
    text = help_text(train.parse_args, capsys)
    check_plain(text)
    found = options(text)
    assert set(found) >= {'--config', '--set', '--resume', '--out',
                          '--check-data', '--progress-bar', '--debug'}
    for option, words in found.items():
        if option != '-h':
            assert '(default: ' in words or '(required)' in words, option
    assert '(default: result)' in found['--out']
    # every packaged config is named, by batch size
    assert 'bs4k, bs8k, bs16k, bs32k, bs32k_eq21, bs32k_published, bs65k, ' \
        'bs131k, synthetic' in ' '.join(text.split())


def test_make_synthetic_help_is_plain_text(capsys):
    text = help_text(make_synthetic.parse_args, capsys)
    check_plain(text)
    found = options(text)
    assert set(found) == {'-h', 'OUT', '--classes', '--per-class',
                          '--val-per-class', '--size', '--seed',
                          '--sample-photos'}
    for option, words in found.items():
        assert words, option
        if option.startswith('--'):
            assert '(default: ' in words or 'default: off' in words, option
    assert '(default: 40)' in found['--size']


def test_missing_mpi_library_is_one_line(tmp_path):
    env = mpi_env()
    env['MPI4PY_LIBMPI'] = str(tmp_path / 'nowhere' / 'libmpi.so')
    proc = subprocess.run([sys.executable, TRAIN, '--config',
                           'synthetic.yaml'], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ''
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith('error: mpi4py cannot load an MPI library '
                               '(' + env['MPI4PY_LIBMPI'])
    assert "pip install 'chainerkfac[mpi]'" in lines[0]
    assert 'pip install --no-binary mpi4py mpi4py' in lines[0]
    assert not (tmp_path / 'result').exists()


def test_resume_command_is_the_same_run_with_resume_auto(tmp_path,
                                                         monkeypatch):
    args = argparse.Namespace(config='my config.yaml',
                              set=['data.train=/d/train', 'train.epochs=2'],
                              out='runs/a b')
    line = train.resume_command(args, 4, argv0='/venv/bin/chainerkfac-train')
    assert shlex.split(line) == [
        'mpiexec', '-n', '4', '/venv/bin/chainerkfac-train', '--config',
        'my config.yaml', '--set', 'data.train=/d/train', 'train.epochs=2',
        '--out', 'runs/a b', '--resume', 'auto']
    # a command the PATH finds is named by its name alone
    command = tmp_path / 'bin' / 'chainerkfac-train'
    command.parent.mkdir()
    command.write_text('#!/bin/sh\n')
    command.chmod(0o755)
    monkeypatch.setenv('PATH', str(command.parent))
    line = train.resume_command(args, 2, argv0=str(command))
    assert line.startswith('mpiexec -n 2 chainerkfac-train --config ')
    args.set, args.progress_bar = [], True
    line = train.resume_command(args, 1, argv0='scripts/train_imagenet.py')
    assert shlex.split(line) == [
        sys.executable, 'scripts/train_imagenet.py', '--config',
        'my config.yaml', '--out', 'runs/a b', '--resume', 'auto',
        '--progress-bar']


def test_plan_summary_is_one_line():
    costs = [5.0, 3.0, 3.0, 1.0, 1.0, 1.0]
    line = trainer_module.plan_summary(
        assignment_module.assign(costs, 3), 'out/plan.txt')
    assert line == ('layer assignment: 6 blocks on 3 processes, 3 owners '
                    'with 1-3 blocks each; max load / lower bound 1.000; '
                    'table: out/plan.txt')
    line = trainer_module.plan_summary(
        assignment_module.assign(costs[:2], 4), 'plan.txt')
    assert line.startswith('layer assignment: 2 blocks on 4 processes, 2 '
                           'owners with 1 blocks each;'), line
    assert '\n' not in line


def test_plain_text_drops_terminal_control_codes(capsys):
    out = plain_text.PlainText()
    out.write('\x1b[Jepoch 1\n\x1b[4A\rtotal [##  ] 10%\x1b[?25l\n')
    out.flush()
    assert capsys.readouterr().out == 'epoch 1\ntotal [##  ] 10%\n'


def test_make_demo_numbers_its_output_folders(tmp_path):
    """``make demo`` twice: result/demo-1, then result/demo-2, the first
    kept (a stand-in mpiexec records the command)."""
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    mpiexec_stub = venv / 'bin' / 'mpiexec'
    mpiexec_stub.write_text(
        '#!/bin/sh\n'
        'while [ "$1" != "--out" ]; do shift; done\n'
        'mkdir -p "$2" && echo "$2" >> runs.txt\n')
    mpiexec_stub.chmod(0o755)
    for name in ('requirements.txt', 'setup.py'):
        (tmp_path / name).write_text('')
    time.sleep(0.01)
    (venv / '.installed').write_text('')
    (tmp_path / 'data' / 'synthetic' / 'train').mkdir(parents=True)
    for _ in range(2):
        proc = subprocess.run(
            ['make', '-f', os.path.join(ROOT, 'Makefile'), 'demo',
             'VENV=venv'], cwd=str(tmp_path), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
        assert proc.returncode == 0, proc.stdout
    assert (tmp_path / 'runs.txt').read_text().split() == [
        'result/demo-1', 'result/demo-2']
    assert 'output folder: result/demo-2' in proc.stdout


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp('output')
    make_synthetic_tree(str(path / 'data' / 'synthetic'), 4, 16, 40)
    return path


def launch(cwd, args, n=2):
    prefix = [mpiexec(), '-n', str(n), '--oversubscribe'] if n else []
    return subprocess.Popen(prefix + [sys.executable, TRAIN] + list(args),
                            cwd=str(cwd), env=mpi_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)


@pytest.mark.slow
def test_output_a_person_reads(workdir):
    proc = launch(workdir, SHORT + ['train.epochs=1', '--out', 'plain'])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    out = workdir / 'plain'
    # the layer assignment: one line, its table in plan.txt
    plan = [line for line in stdout.splitlines()
            if line.startswith('layer assignment: ')]
    assert len(plan) == 1 and re.fullmatch(
        r'layer assignment: 107 blocks on 2 processes, 2 owners with '
        r'\d+-\d+ blocks each; max load / lower bound 1\.\d{3}; '
        r'table: plain/plan\.txt', plan[0]), stdout
    table = (out / 'plan.txt').read_text().splitlines()
    assert table[0] == '# 107 layers on 2 processes'
    assert sum(1 for line in table if line.startswith('/predictor/')) == 107
    assert table[-1].startswith('max/lower-bound: ')
    assert '/predictor/' not in stdout and 'owners (primary)' not in stdout
    # the printed table without terminal control codes
    assert not CONTROL.search(stdout) and not CONTROL.search(stderr)
    rows = [line for line in stdout.splitlines() if line[:1].isdigit()]
    assert [line.split()[:2] for line in rows] == [['0', '1'], ['1', '2']]
    # the factor builds of the epoch: 2 updates (eq. 20: interval 1) x
    # (53 convolutions' A and G, 53 BN Fishers, the FC's A and G)
    assert 'epoch 1: {} factor builds in 2 updates (1 of every factor at ' \
        'every update)'.format(2 * (53 * 2 + 53 + 2)) in stdout, stdout
    # where everything is
    lines = stdout.splitlines()
    end = lines[lines.index('log: plain/log'):]
    assert end[1] == 'plots: ' + ', '.join(
        'plain/' + name for name in sorted(
            p.name for p in out.iterdir() if p.name.endswith('.png')))
    assert len(end[1].split(', ')) >= 3
    assert end[2:4] == ['layer assignment table: plain/plan.txt',
                        'final snapshot: plain/snapshot_iter_2']
    assert json.loads((out / 'log').read_text())[-1]['iteration'] == 2


def wait_for_snapshot(proc, folder, name, timeout=240):
    deadline = time.time() + timeout
    while not (folder / name / 'manifest.json').exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.2)


def stop_lines(stderr):
    return [line for line in stderr.splitlines()
            if line.startswith('stopped by ')]


@pytest.mark.slow
def test_ctrl_c_under_mpiexec_names_the_snapshot_and_resumes(workdir):
    args = SHORT + ['train.epochs=4', '--out', 'stopped']
    proc = launch(workdir, args)
    wait_for_snapshot(proc, workdir / 'stopped', 'snapshot_iter_2')
    proc.send_signal(signal.SIGINT)  # to mpiexec, as Ctrl-C
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = stop_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    match = re.match(r'stopped by SIG(INT|TERM): last complete snapshot: '
                     r'stopped/snapshot_iter_(\d+); resume with: (.*)$',
                     lines[0])
    assert match, lines[0]
    assert int(match.group(2)) >= 2
    command = shlex.split(match.group(3))
    assert command[:3] == ['mpiexec', '-n', '2']
    assert command[3:] == [sys.executable, TRAIN] + args + [
        '--resume', 'auto']
    # the printed command continues the run
    resumed = subprocess.run(
        [mpiexec(), '-n', '2', '--oversubscribe'] + command[3:],
        cwd=str(workdir), env=mpi_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from stopped/snapshot_iter_' in resumed.stdout
    assert 'final snapshot: stopped/snapshot_iter_8' in resumed.stdout


@pytest.mark.slow
def test_sigterm_on_one_process_names_the_snapshot(workdir):
    args = SHORT + ['train.epochs=4', '--out', 'one']
    proc = launch(workdir, args, n=0)
    wait_for_snapshot(proc, workdir / 'one', 'snapshot_iter_2')
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.splitlines()[-1] == stop_lines(stderr)[0]
    assert re.match(r'stopped by SIGTERM: last complete snapshot: '
                    r'one/snapshot_iter_\d+; resume with: ',
                    stderr.splitlines()[-1]), stderr[-2000:]
    assert 'Traceback' not in stderr


def test_final_accuracy_line_is_the_last_validations():
    """The log's last row averages the validations of its interval (0.40625
    over four epochs); the line gives the last one (0.5), which
    LastValues recorded as the evaluator reported it."""
    import types
    import chainer
    from chainerkfac.training import reports
    from chainerkfac.training import trainer as trainer_module
    key = trainer_module.VALIDATION_ACCURACY
    last = reports.LastValues([key])
    for value in (0.375, 0.3, 0.425, 0.5):
        last(types.SimpleNamespace(observation={
            key: chainer.Variable(numpy.array(value, numpy.float32))}))
    last(types.SimpleNamespace(observation={'main/loss': 1.0}))
    extensions = {'LastValues': last, 'LogReport': types.SimpleNamespace(
        log=[{key: 0.40625}])}
    trainer = types.SimpleNamespace(get_extension=extensions.__getitem__)
    assert trainer_module.accuracy_line(trainer, 0.5) == \
        'final validation top-1: 0.5000 (target 0.5: reached)'
