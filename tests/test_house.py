"""The rules of the house, read from the source: every folder of the package
one concept, no import cycle between folders, private framework APIs in one
module, a library that logs, thin scripts, tests that import modules."""

import ast
import collections
import os
import re

import pytest

import tests


ROOT = tests.ROOT
PACKAGE = os.path.join(ROOT, 'chainerkfac')

# Chainer / ChainerMN internals, reached only through chainerkfac.framework
# (chainerkfac.compat patches Chainer and knows its insides too)
PRIVATE_APIS = ('_get_reporters', '_observer_names', '_init_comms',
                '_get_nccl_type_id', '_call_converter', '._loss_scale =',
                '._params', '_orig_except_hook')
FRAMEWORK_MODULES = ('framework.py', 'compat.py')
# commands, which may print their results
COMMANDS = 'commands' + os.sep
# drivers exempt from the script length rule
DRIVERS = re.compile(r'^(bench_.*|batch_scaling)\.py$')
SCRIPT_LINES = 150


def _sources(top):
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        for name in sorted(files):
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, top), path


def _module_name(relative):
    name = 'chainerkfac.' + relative[:-3].replace(os.sep, '.')
    return name[:-len('.__init__')] if name.endswith('.__init__') else name


def _node(module):
    """A folder (``layers/``) or a module at the package's top
    (``config.py``): the nodes of the import graph."""
    parts = module.split('.')[1:]
    if not parts:
        return None
    if os.path.isdir(os.path.join(PACKAGE, parts[0])):
        return parts[0] + '/'
    return parts[0] + '.py'


def import_graph():
    """Edges ``node -> nodes it imports`` between the package's folders and
    top-level modules (the package ``__init__``'s re-exports left out)."""
    modules = {_module_name(rel): path for rel, path in _sources(PACKAGE)}

    def resolve(name):
        while name not in modules:
            name = name.rpartition('.')[0]
        return name

    edges = collections.defaultdict(set)
    for module, path in modules.items():
        source = _node(module)
        if source is None:
            continue
        for statement in ast.walk(ast.parse(open(path).read())):
            if isinstance(statement, ast.Import):
                names = [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom) and \
                    statement.level == 0 and statement.module:
                names = [statement.module + '.' + alias.name
                         for alias in statement.names]
            else:
                continue
            for name in names:
                if name.split('.')[0] != 'chainerkfac':
                    continue
                target = _node(resolve(name))
                if target is not None and target != source:
                    edges[source].add(target)
    return edges


def find_cycle(edges):
    """One cycle of ``edges`` as a list of nodes, or None."""
    state = {}

    def visit(node, path):
        state[node] = 'open'
        path.append(node)
        for succ in sorted(edges.get(node, ())):
            if state.get(succ) == 'open':
                return path[path.index(succ):] + [succ]
            if succ not in state:
                found = visit(succ, path)
                if found:
                    return found
        path.pop()
        state[node] = 'done'
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({'a/': {'b/'}, 'b/': {'c.py'}, 'c.py': {'a/'}}) == [
        'a/', 'b/', 'c.py', 'a/']
    assert find_cycle({'a/': {'b/'}, 'b/': {'c.py'}}) is None


def test_no_import_cycle_between_folders():
    edges = import_graph()
    assert edges['optimizers/'] >= {'layers/', 'distributed/'}
    assert find_cycle(edges) is None


def test_private_framework_apis_only_in_framework():
    found = []
    for rel, path in _sources(PACKAGE):
        if rel in FRAMEWORK_MODULES:
            continue
        text = open(path).read()
        found += ['{}: {}'.format(rel, name) for name in PRIVATE_APIS
                  if name in text]
    assert found == []


#: MPI itself is reached only through the communicator interface of
#: ``distributed/`` (``commands/__init__.py`` only checks that mpi4py loads)
RAW_MPI = re.compile(r'\bmpi_comm\.[A-Za-z_]+\(|\bMPI\.[A-Za-z_]+')
MPI_ALLOWED = ('distributed/', 'commands/__init__.py')


def test_no_raw_mpi_outside_the_communicator():
    found = []
    for rel, path in _sources(PACKAGE):
        if rel.startswith(MPI_ALLOWED):
            continue
        for number, line in enumerate(open(path), 1):
            if RAW_MPI.search(line):
                found.append('{}:{}: {}'.format(rel, number, line.strip()))
    assert found == []


def test_library_logs_instead_of_printing():
    printing = []
    for rel, path in _sources(PACKAGE):
        if rel.startswith(COMMANDS):
            continue
        for statement in ast.walk(ast.parse(open(path).read())):
            if isinstance(statement, ast.Call) and getattr(
                    statement.func, 'id', None) == 'print':
                printing.append('{}:{}'.format(rel, statement.lineno))
    assert printing == []


def test_scripts_are_thin():
    long_scripts = []
    for rel, path in _sources(os.path.join(ROOT, 'scripts')):
        lines = len(open(path).read().splitlines())
        if not DRIVERS.match(rel) and lines > SCRIPT_LINES:
            long_scripts.append('{}: {} lines'.format(rel, lines))
    assert long_scripts == []


@pytest.mark.parametrize('pattern', [
    r'spec_from_file_location', r'\brunpy\b', r'sys\.path\.(insert|append)'])
def test_tests_import_modules_not_files(pattern):
    here = os.path.relpath(__file__, os.path.join(ROOT, 'tests'))
    hits = []
    for rel, path in _sources(os.path.join(ROOT, 'tests')):
        if rel == here:
            continue
        for number, line in enumerate(open(path), 1):
            if re.search(pattern, line):
                hits.append('{}:{}: {}'.format(rel, number, line.strip()))
    assert hits == []


def test_public_functions_are_annotated():
    """Every public function and method of the package names the types of
    its parameters and of its result."""
    missing = []
    for rel, path in _sources(PACKAGE):
        for node in ast.parse(open(path).read()).body:
            functions = [node] + (list(node.body) if isinstance(
                node, ast.ClassDef) and not node.name.startswith('_')
                else [])
            for function in functions:
                if not isinstance(function, ast.FunctionDef) or \
                        function.name.startswith('_'):
                    continue
                arguments = [a for a in function.args.args +
                             function.args.kwonlyargs
                             if a.arg not in ('self', 'cls')]
                if function.returns is None or any(
                        a.annotation is None for a in arguments):
                    missing.append('{}:{}: {}'.format(
                        rel, function.lineno, function.name))
    assert missing == []
