"""chainerkfac.compat: one test per patch, on whichever stack runs them.

On the pinned stack (Python 3.11, NumPy 1.26, setuptools 73) most patches
are no-ops and the tests check that; on the modern stack (Python 3.12+,
NumPy 2, setuptools 81+, CuPy 14) they check that Chainer and ChainerMN
work through them, against computations that do not use them.
"""

import os
import subprocess
import sys
import types
import warnings

import numpy
import pytest

import chainer
import chainer.functions as F
from chainer.backends import cuda

from chainerkfac import compat

NUMPY2 = compat.NUMPY_MAJOR >= 2


# -- numpy.sctypes ----------------------------------------------------------

def run_python(code):
    """``python -c code`` in a fresh interpreter, which must succeed."""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_sctypes_patch_applied_exactly_when_numpy_lacks_it():
    assert ('numpy.sctypes' in compat.APPLIED) == NUMPY2
    # the global attribute is gone again after Chainer's import
    assert hasattr(numpy, 'sctypes') == (not NUMPY2)


def test_as_strided_forward_backward_against_numpy():
    x = numpy.arange(12, dtype=numpy.float32)
    shape, strides = (4, 3), (2, 1)  # overlapping windows
    v = chainer.Variable(x.copy())
    y = F.as_strided(v, shape, strides)
    expected = numpy.lib.stride_tricks.as_strided(
        x, shape, tuple(s * x.itemsize for s in strides))
    numpy.testing.assert_array_equal(y.array, expected)
    gy = numpy.random.RandomState(0).randn(*shape).astype(numpy.float32)
    y.grad = gy
    y.backward()
    gx = numpy.zeros_like(x)
    for i in range(shape[0]):
        for j in range(shape[1]):
            gx[i * strides[0] + j * strides[1]] += gy[i, j]
    numpy.testing.assert_allclose(v.grad, gx, rtol=1e-6)


# -- numpy.distutils --------------------------------------------------------

def test_distutils_patch_applied_exactly_when_missing():
    import importlib.util
    missing = importlib.util.find_spec('numpy.distutils') is None
    assert ('numpy.distutils' in compat.APPLIED) == missing
    assert 'numpy.distutils.system_info' not in sys.modules or not missing


def test_chainer_macos_blas_check_runs_on_the_stub(monkeypatch):
    from chainer import _environment_check
    stub = compat.distutils_stub()
    assert stub['numpy.distutils.system_info'].get_info('blas_opt') == {}
    monkeypatch.setattr(sys, 'platform', 'darwin')
    with compat.temporary_modules(
            stub, [(numpy, 'distutils', stub['numpy.distutils'])]), \
            warnings.catch_warnings():
        warnings.simplefilter('error')
        _environment_check._check_osx_numpy_backend()  # no error, no warning
    assert sys.modules.get('numpy.distutils') is not stub['numpy.distutils']


# -- pkg_resources ----------------------------------------------------------

def test_pkg_resources_stand_in():
    import importlib.util
    missing = importlib.util.find_spec('pkg_resources') is None
    assert ('pkg_resources' in compat.APPLIED) == missing
    assert compat.get_distribution('numpy').version == numpy.__version__
    assert compat.require('numpy>=1.0')[0].version == numpy.__version__
    with pytest.raises(compat.DistributionNotFound):
        compat.require('no-such-distribution-kfac')
    pytest.importorskip('packaging')
    with pytest.raises(compat.VersionConflict):
        compat.require('numpy<1.0')


def test_chainer_version_check_works_through_the_stand_in(monkeypatch):
    from chainer import _environment_check
    stub = compat.pkg_resources_stub()['pkg_resources']
    monkeypatch.setattr(_environment_check, 'pkg_resources', stub)
    pytest.importorskip('packaging')
    monkeypatch.setattr(chainer._version, '_optional_dependencies', [
        {'name': 'NumPy', 'packages': ['numpy'], 'specifier': '<1.0',
         'help': 'h'},
        {'name': 'Absent', 'packages': ['no-such-distribution-kfac'],
         'specifier': '', 'help': 'h'}])
    with pytest.warns(UserWarning, match='may not be compatible'):
        _environment_check._check_optional_dependencies()


# -- ChainerMN: float16 kernels ---------------------------------------------

def _memory_utility():
    """ChainerMN's ``_memory_utility`` (skips where mpi4py is missing)."""
    pytest.importorskip('mpi4py')
    from chainermn.communicators import _memory_utility as mu
    return mu


def _kernel_sources(monkeypatch):
    """(name, source) of ChainerMN's two pack kernels as ChainerMN writes
    them, and as the patched factories hand them to ``cuda.raw``."""
    mu = _memory_utility()
    monkeypatch.setattr(cuda, 'raw', lambda code, name, **kw:
                        types.SimpleNamespace(code=code, name=name))
    out = []
    for factory in (mu._cupy_batched_pack_params,
                    mu._cupy_batched_unpack_params):
        original = getattr(factory, 'original', factory)
        kernel = original()
        patched = compat.with_fp16_header(original)()
        assert patched.name == kernel.name
        out.append((kernel.name, kernel.code, patched.code))
    return out


def test_fp16_kernel_patch_applied_exactly_on_cupy14():
    mu = _memory_utility()
    major = compat.cupy_major()
    patched = hasattr(mu._cupy_batched_pack_params, 'original')
    assert patched == (major is not None and major >= 14)
    assert ('chainermn.fp16_kernels' in compat.APPLIED) == patched


def test_fp16_kernel_sources_get_the_header_once(monkeypatch):
    for name, code, patched in _kernel_sources(monkeypatch):
        assert 'half' in code and compat.FP16_HEADER not in code
        assert patched == compat.FP16_HEADER + code
        assert compat.fp16_kernel_source(patched) == patched


def _nvrtc_compile(source):
    """PTX of ``source`` by NVRTC with CuPy's and CUDA's include folders,
    without a GPU (arch given)."""
    import cupy
    from cupy import _environment
    from cupy.cuda import compiler
    includes = [os.path.join(os.path.dirname(cupy.__file__), '_core',
                             'include')]
    cuda_path = _environment.get_cuda_path()
    if cuda_path:
        includes.append(os.path.join(cuda_path, 'include'))
    program = compiler._NVRTCProgram(source, 'kernel.cu', (), ())
    options = tuple('-I' + d for d in includes) + (
        '-std=c++17', '-arch=compute_90',
        '--device-as-default-execution-space')
    return program.compile(options)[0]


def _nvrtc_or_skip():
    if compat.cupy_major() is None:
        pytest.skip('CuPy is not installed')
    try:
        from cupy.cuda import compiler
        compiler._get_nvrtc_version()
    except Exception as e:  # no libnvrtc
        pytest.skip('NVRTC is not available: {}'.format(
            str(e).splitlines()[0]))


def test_fp16_kernels_compile_with_nvrtc(monkeypatch):
    _nvrtc_or_skip()
    from cupy.cuda import compiler
    for name, code, patched in _kernel_sources(monkeypatch):
        assert _nvrtc_compile(patched)
        if compat.cupy_major() >= 14:  # the patch is needed there
            with pytest.raises(compiler.CompileException, match='half'):
                _nvrtc_compile(code)


# -- ChainerMN: unpack_params -----------------------------------------------

class _RecordingBuffer(object):
    """Stands in for ChainerMN's DeviceMemory: records what it is given."""

    def __init__(self, values):
        self.values = values  # the received (transfer dtype) buffer
        self.calls = []

    def to_device(self, dst, size, offset=0, stream=None):
        n = dst.size
        start = offset // dst.itemsize
        dst[...] = self.values[start:start + n].reshape(dst.shape)
        self.calls.append((dst.dtype, size, offset))


def _params(dtype):
    a = chainer.Parameter(numpy.zeros((2, 3), dtype))
    b = chainer.Parameter(numpy.zeros(4, dtype))
    for p in (a, b):
        p.grad = numpy.zeros_like(p.array)
    return [a, b]


def test_unpack_params_casts_through_the_transfer_dtype():
    received = numpy.arange(10, dtype=numpy.float32) / 3
    params = _params(numpy.float16)
    buf = _RecordingBuffer(received)
    compat.unpack_params(params, 'grad', buf, numpy.float32, False)
    assert buf.calls == [(numpy.float32, 24, 0), (numpy.float32, 16, 24)]
    numpy.testing.assert_array_equal(
        numpy.concatenate([p.grad.ravel() for p in params]),
        received.astype(numpy.float16))


def test_unpack_params_patch_applied_exactly_on_numpy2_or_cupy14():
    mu = _memory_utility()
    patched = NUMPY2 or (compat.cupy_major() or 0) >= 14
    assert (mu.unpack_params is compat.unpack_params) == patched


def test_chainermn_unpack_params_fails_on_numpy2_without_the_patch():
    if not NUMPY2:
        pytest.skip('NumPy 1 accepts copy=False with a cast')
    # the line ChainerMN runs, on NumPy 2
    v = numpy.zeros(3, numpy.float16)
    with pytest.raises(ValueError):
        numpy.array(v, copy=False, dtype=numpy.float32)


# -- Chainer's cuDNN warning ------------------------------------------------

def test_cudnn_warning_marked_as_given_only_on_cupy14(monkeypatch):
    monkeypatch.setattr(cuda, 'available', True)
    monkeypatch.setattr(cuda, 'cudnn_enabled', False)
    monkeypatch.setattr(cuda, '_cudnn_disabled_by_user', False,
                        raising=False)
    monkeypatch.setattr(cuda.check_cuda_available, '_already_warned', False,
                        raising=False)
    monkeypatch.setattr(compat, 'APPLIED', [])
    compat._patch_cudnn_warning(13)
    with pytest.warns(UserWarning, match='cuDNN is not enabled'):
        cuda.check_cuda_available()
    monkeypatch.setattr(cuda.check_cuda_available, '_already_warned', False)
    compat._patch_cudnn_warning(14)
    assert compat.APPLIED == ['chainer.cudnn_warning']
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        cuda.check_cuda_available()


def test_cudnn_warning_marked_before_chainer_builds_its_first_kernel():
    """``chainer/functions/activation/relu.py`` checks CUDA while
    ``import chainer`` runs; the mark must already be set then (CuPy 14)."""
    if compat.cupy_major() is None or compat.cupy_major() < 14:
        pytest.skip('needs CuPy 14')
    code = (
        'import importlib.abc, sys\n'
        'seen = []\n'
        'class Probe(importlib.abc.MetaPathFinder):\n'
        '    def find_spec(self, name, path, target=None):\n'
        '        if name == "chainer.functions.activation.relu":\n'
        '            cuda = sys.modules["chainer.backends.cuda"]\n'
        '            seen.append(getattr(cuda.check_cuda_available,\n'
        '                                "_already_warned", False))\n'
        'sys.meta_path.insert(0, Probe())\n'
        'import chainerkfac\n'
        'print(seen)\n')
    out = run_python(code)
    assert out.stdout.split()[-1] == '[True]', out.stdout
    assert 'cuDNN is not enabled' not in out.stderr


# -- the machinery ----------------------------------------------------------

def test_after_import_runs_once_the_module_is_imported(tmp_path, monkeypatch):
    (tmp_path / 'kfac_compat_probe.py').write_text('VALUE = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    compat.after_import('kfac_compat_probe', lambda m: seen.append(m.VALUE))
    assert seen == []
    import kfac_compat_probe  # NOQA
    assert seen == [1]
    compat.after_import('kfac_compat_probe', lambda m: seen.append(2))
    assert seen == [1, 2]  # already imported: at once
    sys.modules.pop('kfac_compat_probe')


def test_temporary_modules_restores_everything():
    holder = types.SimpleNamespace(kept=1)
    fake = types.ModuleType('kfac_fake_module')
    with compat.temporary_modules({'kfac_fake_module': fake},
                                  [(holder, 'kept', 2), (holder, 'new', 3)]):
        assert sys.modules['kfac_fake_module'] is fake
        assert (holder.kept, holder.new) == (2, 3)
    assert 'kfac_fake_module' not in sys.modules
    assert holder.kept == 1 and not hasattr(holder, 'new')


def test_import_does_not_import_mpi_and_patches_chainermn_later():
    pytest.importorskip('mpi4py')
    code = ('import sys, chainerkfac\n'
            'assert "mpi4py.MPI" not in sys.modules, "MPI imported"\n'
            'from chainerkfac import compat\n'
            'from chainermn.communicators import _memory_utility as mu\n'
            'patched = mu.unpack_params is compat.unpack_params\n'
            'expected = compat.NUMPY_MAJOR >= 2 or '
            '(compat.cupy_major() or 0) >= 14\n'
            'assert patched == expected, (patched, expected)\n'
            'print("ok", sorted(compat.APPLIED))\n')
    out = run_python(code)
    assert out.stdout.startswith('ok')
