"""chainerkfac: distributed K-FAC for Chainer/ChainerMN (Osawa et al., CVPR 2019)."""

import setuptools


setuptools.setup(
    name='chainerkfac',
    version='0.1.0',
    description='Distributed K-FAC optimizer for Chainer and ChainerMN',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['chainerkfac', 'chainerkfac.*']),
    python_requires='>=3.8',
    install_requires=[
        'chainer==7.8.1',
        'numpy>=1.20,<2',
        'scipy>=1.7',
        'mpi4py>=3.1',
        'PyYAML>=5.4',
        'pillow>=8',
    ],
    extras_require={
        # CuPy 14 dropped cuDNN, which Chainer's GPU convolutions use.
        'gpu': ['cupy-cuda12x>=13,<14'],
    },
    license='MIT',
)
