"""Chainer 7.8.1 and ChainerMN on today's stack: NumPy 2, Python 3.12+,
setuptools >= 81 and CuPy 14.

Chainer's last release predates all of them.  :func:`apply` (called by
``chainerkfac/__init__.py`` before anything imports Chainer) makes exactly
the following work, each patch guarded by a feature check and a no-op where
it is not needed (:data:`APPLIED` lists those that were applied):

``numpy.sctypes``
    Removed in NumPy 2.0; ``chainer/functions/array/as_strided.py`` reads it
    when it is imported and in its backward.  The dict is provided while
    Chainer is imported, and afterwards to that module alone.
``numpy.distutils``
    Gone on Python 3.12 / NumPy 2; ``chainer/_environment_check.py`` imports
    ``numpy.distutils.system_info`` for a macOS BLAS check.  A stub whose
    ``get_info`` finds nothing stands in while Chainer is imported.
``pkg_resources``
    Gone from setuptools 81+; ``chainer/_environment_check.py`` uses
    ``require`` / ``get_distribution`` to check the CuPy version.  A stand-in
    built on ``importlib.metadata`` serves while Chainer is imported
    (``chainer.testing`` still needs the real one).
ChainerMN's float16 pack kernels
    CuPy 14's ``cupy/carray.cuh`` no longer includes ``cuda_fp16.h``, so the
    two raw kernels of ``chainermn/communicators/_memory_utility.py``
    (``half`` in every dtype branch, used by ``allreduce_grad`` with batched
    copies) fail to compile; the header is prepended to their source.
ChainerMN's ``unpack_params``
    Calls ``xp.array(v, copy=False, dtype=...)``, which NumPy 2 and CuPy 14
    reject when the dtype differs (a cast cannot avoid a copy); replaced by
    the same function with ``v.astype(dtype)``.
Chainer's cuDNN warning
    CuPy 14 has no cuDNN at all, and Chainer then warns on every device
    check to reinstall CuPy with cuDNN; it runs its own im2col + GEMM
    convolutions instead, so the warning is marked as given.  The mark is
    set the moment ``chainer.backends.cuda`` has been executed, before the
    rest of ``import chainer`` runs: ``chainer/functions/activation/relu.py``
    builds a kernel at import time, which checks CUDA (and would warn).

``cupy.linalg.cholesky`` does not raise on a failed factorization under
CuPy's default ``errstate`` (and returns a partly factorized, finite
matrix); :mod:`chainerkfac.inverse` therefore reads cuSOLVER's ``devInfo``
itself rather than relying on this module.
"""

import contextlib
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import logging
import re
import sys
import types
import typing

import numpy

#: Names of the patches :func:`apply` applied in this process.
APPLIED = []

NUMPY_MAJOR = int(numpy.__version__.split('.')[0])

SCTYPES = {
    'int': [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
    'uint': [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
    'float': [numpy.float16, numpy.float32, numpy.float64,
              numpy.longdouble],
    'complex': [numpy.complex64, numpy.complex128, numpy.clongdouble],
    'others': [bool, object, bytes, str, numpy.void],
}

FP16_HEADER = '#include <cuda_fp16.h>\n'


def _importable(name):
    """Whether ``name`` can be imported (found, not imported: importing
    ``pkg_resources`` or ``numpy.distutils`` warns)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# -- numpy.sctypes -----------------------------------------------------------

def needs_sctypes() -> bool:
    return not hasattr(numpy, 'sctypes')


class NumpyWithSctypes(types.ModuleType):
    """NumPy as seen by one Chainer module: NumPy plus ``sctypes``."""

    sctypes = SCTYPES

    def __getattr__(self, name):
        return getattr(numpy, name)


# -- numpy.distutils ---------------------------------------------------------

def needs_distutils() -> bool:
    return not _importable('numpy.distutils')


def distutils_stub() -> dict:
    """``{module name: module}`` of a ``numpy.distutils.system_info`` whose
    ``get_info`` finds no library (Chainer's macOS BLAS check then passes)."""
    package = types.ModuleType('numpy.distutils')
    system_info = types.ModuleType('numpy.distutils.system_info')
    system_info.get_info = lambda name, notfound_action=0: {}
    package.system_info = system_info
    return {'numpy.distutils': package,
            'numpy.distutils.system_info': system_info}


# -- pkg_resources -----------------------------------------------------------

def needs_pkg_resources() -> bool:
    return not _importable('pkg_resources')


class DistributionNotFound(Exception):
    pass


class VersionConflict(Exception):
    pass


_REQUIREMENT = re.compile(r'^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$')


def _specifier_contains(specifier, version):
    """Whether ``version`` satisfies ``specifier`` (True when ``packaging``
    is missing: a version check is then skipped, not failed)."""
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return True
    return SpecifierSet(specifier).contains(version, prereleases=True)


def require(requirement: str) -> list:
    """``pkg_resources.require`` for one ``name<specifier>`` string."""
    name, specifier = _REQUIREMENT.match(requirement).groups()
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise DistributionNotFound(name)
    if specifier and not _specifier_contains(specifier, version):
        raise VersionConflict(name, version, specifier)
    return [get_distribution(name)]


def get_distribution(name: str) -> types.SimpleNamespace:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise DistributionNotFound(name)
    return types.SimpleNamespace(project_name=name, version=version)


def pkg_resources_stub() -> dict:
    module = types.ModuleType('pkg_resources')
    module.require = require
    module.get_distribution = get_distribution
    module.DistributionNotFound = DistributionNotFound
    module.VersionConflict = VersionConflict
    module.ResolutionError = Exception
    return {'pkg_resources': module}


# -- while Chainer is imported -----------------------------------------------

@contextlib.contextmanager
def temporary_modules(modules: dict,
                      attributes: typing.Iterable[tuple] = ()
                      ) -> typing.Iterator[None]:
    """Puts ``modules`` into ``sys.modules`` and ``(object, name, value)``
    attributes in place, and takes them all out again afterwards."""
    saved_modules = {name: sys.modules.get(name) for name in modules}
    saved_attrs = [(obj, name, obj.__dict__.get(name, _MISSING))
                   for obj, name, _ in attributes]
    sys.modules.update(modules)
    for obj, name, value in attributes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, old in saved_modules.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        for obj, name, old in saved_attrs:
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)


_MISSING = object()


@contextlib.contextmanager
def root_logger_level_kept() -> typing.Iterator[None]:
    """Keeps the root logger's level across Chainer's import: on NumPy 1.x
    Chainer imports ``numpy.distutils``, whose logging setup sets the root
    logger to WARNING (a ``logging.basicConfig(level=logging.INFO)`` made
    before ``import chainerkfac`` would be undone)."""
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        root.setLevel(level)


def _import_chainer():
    """Imports Chainer with the import-time patches it needs."""
    modules = {}
    attributes = []
    if needs_sctypes():
        attributes.append((numpy, 'sctypes', SCTYPES))
        APPLIED.append('numpy.sctypes')
    if needs_distutils():
        stub = distutils_stub()
        modules.update(stub)
        attributes.append((numpy, 'distutils', stub['numpy.distutils']))
        APPLIED.append('numpy.distutils')
    if needs_pkg_resources():
        modules.update(pkg_resources_stub())
        APPLIED.append('pkg_resources')
    with temporary_modules(modules, attributes), root_logger_level_kept():
        import chainer  # NOQA
    if 'numpy.sctypes' in APPLIED:
        from chainer.functions.array import as_strided
        as_strided.np = NumpyWithSctypes('numpy')


# -- ChainerMN and CuPy 14 ---------------------------------------------------

def cupy_major() -> typing.Optional[int]:
    """CuPy's major version, or None when Chainer found no CuPy."""
    cupy = sys.modules.get('cupy')
    if cupy is None:
        return None
    return int(cupy.__version__.split('.')[0])


def fp16_kernel_source(code: str) -> str:
    """A raw kernel's source with ``cuda_fp16.h`` included first."""
    if FP16_HEADER.strip() in code:
        return code
    return FP16_HEADER + code


def with_fp16_header(kernel_factory: typing.Callable[[], typing.Any]
                     ) -> typing.Callable[[], typing.Any]:
    """Wraps a ChainerMN kernel factory (returning ``chainer.cuda.raw(code,
    name)``) so that its source includes ``cuda_fp16.h``."""
    from chainer.backends import cuda

    def factory():
        kernel = kernel_factory()
        return cuda.raw(fp16_kernel_source(kernel.code), kernel.name)
    factory.__name__ = kernel_factory.__name__
    factory.__doc__ = kernel_factory.__doc__
    factory.original = kernel_factory
    return factory


def unpack_params(params: typing.Sequence[typing.Any], attr_name: str,
                  buffer: typing.Any, transfer_dtype: typing.Any,
                  zero_fill: bool, stream: typing.Any = None) -> None:
    """ChainerMN's ``unpack_params`` with the cast written as ``astype``."""
    if len(params) == 0:
        return
    offset = 0
    for param in params:
        v = getattr(param, attr_name)
        if attr_name == 'grad' and v is None and zero_fill:
            v = param.xp.empty_like(param.data)
            setattr(param, attr_name, v)
        size = v.size * numpy.dtype(transfer_dtype).itemsize
        grad_dtype = v.dtype
        if grad_dtype != transfer_dtype:
            v = v.astype(transfer_dtype)
        buffer.to_device(v, size, offset, stream)
        offset += size
        if grad_dtype != transfer_dtype:
            getattr(param, attr_name)[...] = v.astype(grad_dtype)


def _patch_chainermn(mu, major):
    """Patches ChainerMN's ``_memory_utility`` module ``mu``."""
    if major is not None and major >= 14 and not hasattr(
            mu._cupy_batched_pack_params, 'original'):
        mu._cupy_batched_pack_params = with_fp16_header(
            mu._cupy_batched_pack_params)
        mu._cupy_batched_unpack_params = with_fp16_header(
            mu._cupy_batched_unpack_params)
        APPLIED.append('chainermn.fp16_kernels')
    if (NUMPY_MAJOR >= 2 or (major is not None and major >= 14)) and \
            mu.unpack_params is not unpack_params:
        mu.unpack_params = unpack_params
        APPLIED.append('chainermn.unpack_params')


def _patch_cudnn_warning(major, cuda=None):
    """Marks Chainer's cuDNN warning as given under CuPy >= 14 (``cuda``:
    the ``chainer.backends.cuda`` module, imported when not given)."""
    if cuda is None:
        from chainer.backends import cuda
    check = cuda.check_cuda_available
    if major is not None and major >= 14 and \
            not getattr(cuda, 'cudnn_enabled', False) and \
            not getattr(check, '_already_warned', False):
        check._already_warned = True
        if 'chainer.cudnn_warning' not in APPLIED:
            APPLIED.append('chainer.cudnn_warning')


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs ``function(module)`` right after ``name`` is first imported
    (so that importing chainerkfac does not import ChainerMN, hence MPI)."""

    def __init__(self, name, function):
        self.name = name
        self.function = function

    def find_spec(self, fullname: str, path: typing.Any,
                  target: typing.Any = None) -> typing.Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        function = self.function

        def exec_then_patch(module):
            exec_module(module)
            function(module)
        spec.loader.exec_module = exec_then_patch
        return spec


def after_import(name: str,
                 function: typing.Callable[[typing.Any], typing.Any]
                 ) -> None:
    """``function(module)`` now if ``name`` is imported, else right after
    its import."""
    if name in sys.modules:
        function(sys.modules[name])
    elif not any(isinstance(f, _PostImportHook) and f.name == name
                 for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(name, function))


MEMORY_UTILITY = 'chainermn.communicators._memory_utility'
CHAINER_CUDA = 'chainer.backends.cuda'


def apply() -> None:
    """Applies every patch this stack needs (idempotent)."""
    if 'chainer' not in sys.modules:
        after_import(CHAINER_CUDA, lambda module: _patch_cudnn_warning(
            cupy_major(), module))
        _import_chainer()
    major = cupy_major()
    _patch_cudnn_warning(major)
    after_import(MEMORY_UTILITY, lambda module: _patch_chainermn(
        module, major))
