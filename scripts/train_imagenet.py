#!/usr/bin/env python
"""Train ResNet-50 on ImageNet with distributed K-FAC (Osawa et al., 2019).

Usage::

    mpirun -n N python scripts/train_imagenet.py --config bs32k.yaml \\
        --set data.train=/data/imagenet/train data.val=/data/imagenet/val
    mpiexec -n 2 python scripts/train_imagenet.py --config synthetic.yaml

The paper's command line: the same as the installed command
``chainerkfac-train`` (:mod:`chainerkfac.commands.train`, whose ``--help``
tells the options).
"""

import os
import sys

try:
    import chainerkfac  # noqa: F401 (first: makes Chainer importable)
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))

from chainerkfac.commands.train import main  # NOQA: E402


if __name__ == '__main__':
    main()
