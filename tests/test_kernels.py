"""Every CUDA kernel on chainerkfac's GPU path compiles for the H200, here.

NVRTC compiles for ``sm_90`` (Hopper) without a device, so on the 3.12
stack (CuPy 14 with NVRTC, the CUDA headers and NCCL's bindings) each kernel
is compiled exactly as CuPy would build it, in float32 and float16:

* the kernels chainerkfac defines itself: none (its device code is CuPy's
  and Chainer's); a scan of the package keeps it so, and a kernel added
  later must be added to :data:`OWN_KERNELS` here;
* ChainerMN's ``pure_nccl`` path: the ``div_by_size`` elementwise kernel of
  its NCCL mean (recorded by running ChainerMN's own method with NCCL and
  ``chainer.cuda.elementwise`` stubbed, so its text is ChainerMN's), and
  the batched pack / unpack raw kernels of ``_memory_utility`` (with the
  ``cuda_fp16.h`` header :mod:`chainerkfac.compat` adds).

A kernel that does not compile fails its test with NVRTC's log.
"""

import os
import re
import types

import numpy
import pytest

import chainer
from chainer.backends import cuda

import chainerkfac

from tests.test_compat import _nvrtc_or_skip

ARCH = '-arch=sm_90'
DTYPES = ('float16', 'float32')

#: ``(in_params, out_params, operation, name)`` of every elementwise kernel
#: chainerkfac defines (none so far).
OWN_KERNELS = ()

_DEFINITION = re.compile(
    r'\b(ElementwiseKernel|ReductionKernel|RawKernel|RawModule|'
    r'cuda\.elementwise|cuda\.reduce|cuda\.raw|cupy\.fuse)\s*\(')


def _compile(source, name):
    """Compiles ``source`` for sm_90 with CuPy's headers and options."""
    from cupy._core import core
    from cupy.cuda import compiler
    headers = ''.join('#include <{}>\n'.format(h)
                      for h in core._cupy_header_list)
    options = core.assemble_cupy_compiler_options((ARCH,))
    program = compiler._NVRTCProgram(headers + source, name + '.cu', (), ())
    return program.compile(options)[0]


def _elementwise_source(in_params, out_params, operation, name):
    """The source CuPy generates for an ElementwiseKernel on contiguous
    1-d arrays (its own code generator; no device needed)."""
    import cupy
    from cupy._core import _carray
    from cupy._core import _kernel
    kernel = cupy.ElementwiseKernel(in_params, out_params, operation, name)
    arrays = tuple(_kernel._ArgInfo(1, cupy.ndarray, p.dtype, 1, True, True)
                   for p in kernel.params[:-1])
    indexer = _kernel._ArgInfo(2, _carray.Indexer, None, 1, True, True)
    return _kernel._get_elementwise_kernel_code(
        arrays + (indexer,), _kernel._TypeMap(()), kernel.params,
        kernel.operation, kernel.name, kernel.preamble)


def test_chainerkfac_defines_no_kernel_outside_the_list():
    root = os.path.dirname(chainerkfac.__file__)
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    code = line.split('#')[0]
                    if _DEFINITION.search(code) and \
                            not code.lstrip().startswith(('"', "'")):
                        found.append('{}:{}'.format(
                            os.path.relpath(path, root), number))
    # compat.py only wraps ChainerMN's raw kernels (compiled below)
    found = [f for f in found if not f.startswith('compat.py:')]
    assert len(found) == len(OWN_KERNELS), (
        'kernels defined in chainerkfac; add them to OWN_KERNELS: {}'
        .format(found))


def _chainermn_elementwise_kernels(monkeypatch):
    """The elementwise kernels ChainerMN's pure_nccl mean builds, for each
    dtype, as it builds them."""
    from chainermn.communicators import pure_nccl_communicator as pnc
    from chainermn import nccl
    if not hasattr(nccl, 'NCCL_FLOAT16'):
        pytest.skip('NCCL is not available to CuPy')
    recorded = []

    def elementwise(in_params, out_params, operation, name, **kwargs):
        recorded.append((in_params, out_params, operation, name))
        return lambda *args, **kwargs: None
    monkeypatch.setattr(chainer.cuda, 'elementwise', elementwise)
    buffer = types.SimpleNamespace(ptr=lambda: 0,
                                   array=lambda n, dtype=None: None)
    fake = types.SimpleNamespace(
        size=2, _init_comms=lambda: None,
        nccl_comm=types.SimpleNamespace(allReduce=lambda *args: None))
    for dtype in DTYPES:
        pnc.PureNcclCommunicator._multi_node_mean_nccl(
            fake, buffer, buffer, 4, numpy.dtype(dtype),
            stream=types.SimpleNamespace(ptr=0))
    return recorded


def test_chainermn_nccl_mean_kernel_compiles_for_sm90(monkeypatch):
    _nvrtc_or_skip()
    kernels = _chainermn_elementwise_kernels(monkeypatch)
    monkeypatch.undo()
    assert [k[1].split()[0] for k in kernels] == list(DTYPES)
    for in_params, out_params, operation, name in kernels + list(
            OWN_KERNELS):
        source = _elementwise_source(in_params, out_params, operation, name)
        assert _compile(source, name), (name, out_params)


def test_chainermn_pack_kernels_compile_for_sm90(monkeypatch):
    _nvrtc_or_skip()
    from chainermn.communicators import _memory_utility as mu
    monkeypatch.setattr(cuda, 'raw', lambda code, name, **kw:
                        types.SimpleNamespace(code=code, name=name))
    kernels = [mu._cupy_batched_pack_params(),
               mu._cupy_batched_unpack_params()]
    monkeypatch.undo()
    assert [k.name for k in kernels] == ['cupy_batched_pack_params',
                                         'cupy_batched_unpack_params']
    for kernel in kernels:
        # one source for every dtype: float16 and float32 branches
        assert 'half' in kernel.code and 'float' in kernel.code
        assert _compile(kernel.code, kernel.name), kernel.name


def test_a_broken_kernel_fails_to_compile():
    """The compile helper does report errors (so the tests above can
    fail)."""
    _nvrtc_or_skip()
    from cupy.cuda import compiler
    source = _elementwise_source('', 'float16 x', 'x = undefined_name(x)',
                                 'broken')
    with pytest.raises(compiler.CompileException):
        _compile(source, 'broken')
