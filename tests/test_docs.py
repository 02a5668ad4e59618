"""The docs cannot drift: every fenced code block of README.md and docs/*.md
runs here, or says why not.

A block is classified by an HTML comment on the line right before its
fence (indented like it):

- ``<!-- not run: REASON -->``: not runnable here (GPUs, ImageNet, the
  network, hours of CPU); the reason is required;
- ``<!-- output -->`` (or ``<!-- output: what -->``): what a command
  printed (a log excerpt), not a command;
- ``<!-- slow -->``: runnable, but takes minutes (``pytest.mark.slow``).

Every other block must be ``python`` or ``sh``, and runs: a python block in
a fresh interpreter after a prelude that defines, where the block uses them
without defining them, a small ``model`` (an ``L.Classifier`` of a conv, a
BN and a linear layer), ``lossfun``, ``x``, ``t``, ``x_local``,
``t_local`` and ``optimizer`` (a ``KFAC`` set up on ``model``); an sh block
with ``bash -e`` in an empty folder that has the checkout's ``scripts/``,
with the virtualenv's ``bin`` first on ``PATH``.  Python blocks import
``chainerkfac`` before ``chainer`` or ``chainermn`` (checked in the order
the blocks read).
"""

import os
import re
import subprocess
import sys

import pytest

import tests

ROOT = tests.ROOT
FILES = ['README.md'] + sorted(
    os.path.join('docs', name) for name in os.listdir(
        os.path.join(ROOT, 'docs')) if name.endswith('.md'))
FENCE = re.compile(r'^(\s*)```(\S*)\s*$')
MARKER = re.compile(r'^\s*<!--\s*(not run|output|slow)\s*(?::\s*(.*?))?\s*'
                    r'-->\s*$')
RUNNABLE = ('python', 'sh')


class Block:
    def __init__(self, path, line, lang, text, marker, reason):
        self.path, self.line, self.lang = path, line, lang
        self.text, self.marker, self.reason = text, marker, reason

    @property
    def name(self):
        return '{}:{}'.format(self.path, self.line)


def blocks(path):
    """Every fenced block of ``path`` (relative to the checkout)."""
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        lines = f.read().split('\n')
    out, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang = match.group(1), match.group(2)
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != '```':
            body.append(lines[i][len(indent):] if lines[i].startswith(
                indent) else lines[i])
            i += 1
        marker = MARKER.match(lines[start - 1]) if start else None
        out.append(Block(path, start + 1, lang, '\n'.join(body) + '\n',
                         marker.group(1) if marker else None,
                         (marker.group(2) or '') if marker else ''))
        i += 1
    return out


ALL = [block for path in FILES for block in blocks(path)]


def run_blocks(slow):
    return [pytest.param(block, id=block.name,
                         marks=[pytest.mark.slow] if slow else [])
            for block in ALL if block.lang in RUNNABLE and
            block.marker == ('slow' if slow else None)]


def test_every_block_is_found_and_classified():
    assert len(ALL) >= 20, [b.name for b in ALL]
    for block in ALL:
        if block.marker == 'not run':
            assert block.reason, '{}: "not run" needs a reason'.format(
                block.name)
        elif block.marker != 'output':
            assert block.lang in RUNNABLE, (
                '{}: a block runs (```python or ```sh) or is marked '
                '<!-- not run: why --> or <!-- output -->'.format(block.name))


IMPORT = re.compile(r'^\s*(?:import|from)\s+(chainerkfac|chainermn|chainer)'
                    r'\b', re.M)


@pytest.mark.parametrize('path', FILES)
def test_python_blocks_import_chainerkfac_first(path):
    """On NumPy 2 Chainer imports only after ``import chainerkfac``."""
    seen = False
    for block in blocks(path):
        if block.lang != 'python':
            continue
        for module in IMPORT.findall(block.text):
            if module == 'chainerkfac':
                seen = True
            assert seen, '{}: imports {} before chainerkfac'.format(
                block.name, module)


PRELUDE = '''\
import chainerkfac
import chainer
import chainer.functions as F
import chainer.links as L
import numpy


class _Net(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(3, 4, 3, pad=1)
            self.bn = L.BatchNormalization(4)
            self.fc = L.Linear(None, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))))


numpy.random.seed(0)
'''
DEFINITIONS = {
    'model': 'model = L.Classifier(_Net())',
    'lossfun': 'lossfun = model',
    'x': "x = numpy.random.rand(8, 3, 6, 6).astype('f')",
    't': "t = numpy.arange(8, dtype='i') % 3",
    'x_local': 'x_local = x',
    't_local': 't_local = t',
    'optimizer': 'optimizer = chainerkfac.KFAC(lr=0.01).setup(model)',
}
NEEDS = {'lossfun': ['model'], 'x_local': ['x'], 't_local': ['t'],
         'optimizer': ['model', 'x', 't']}


def prelude(text):
    """The prelude of a python block: the names it uses, not defines."""
    wanted = []

    def want(name):
        for need in NEEDS.get(name, []):
            want(need)
        if name not in wanted:
            wanted.append(name)
    for name in DEFINITIONS:
        used = re.search(r'\b{}\b'.format(name), text)
        defined = re.search(r'^\s*{}\s*='.format(name), text, re.M)
        if used and not defined:
            want(name)
    return PRELUDE + '\n'.join(DEFINITIONS[n] for n in wanted) + '\n'


def environment():
    env = dict(os.environ)
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + \
        env.get('PATH', '')
    env.update(OMP_NUM_THREADS='1', OMPI_ALLOW_RUN_AS_ROOT='1',
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1',
               OMPI_MCA_rmaps_base_oversubscribe='1',
               PRTE_MCA_rmaps_default_mapping_policy=':oversubscribe',
               MPLBACKEND='Agg')
    return env


def run(block, tmp_path, timeout):
    if block.lang == 'python':
        script = tmp_path / 'block.py'
        script.write_text(prelude(block.text) + block.text)
        command = [sys.executable, str(script)]
    else:
        os.symlink(os.path.join(ROOT, 'scripts'), str(tmp_path / 'scripts'))
        command = ['bash', '-e', '-o', 'pipefail', '-c', block.text]
    proc = subprocess.run(command, cwd=str(tmp_path), env=environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=timeout)
    assert proc.returncode == 0, '{} failed:\n{}\n--- output:\n{}'.format(
        block.name, block.text, proc.stdout[-4000:])
    return proc.stdout


@pytest.mark.parametrize('block', run_blocks(slow=False))
def test_block_runs(block, tmp_path):
    run(block, tmp_path, timeout=300)


@pytest.mark.parametrize('block', run_blocks(slow=True))
def test_slow_block_runs(block, tmp_path):
    run(block, tmp_path, timeout=900)


def test_the_gpu_test_count_in_the_docs_is_the_suite_s():
    """docs/stacks-and-devices.md says how many tests ``pytest -m gpu``
    selects."""
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-m', 'gpu', '--collect-only', '-q',
         '-p', 'no:cacheprovider', 'tests/test_gpu.py'], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=300)
    count = re.search(r'(\d+)/\d+ tests collected', proc.stdout)
    assert count, proc.stdout[-2000:]
    with open(os.path.join(ROOT, 'docs', 'stacks-and-devices.md')) as f:
        text = f.read()
    said = re.findall(r'`pytest -m gpu`: (\d+) tests', text) + \
        re.findall(r'all (\d+) selected tests', text)
    assert said == [count.group(1)] * 2, (said, count.group(1))
