#!/usr/bin/env python
"""Write a small learnable ImageNet-style JPEG folder tree.

    python scripts/make_synthetic_imagenet.py OUT --classes K --per-class M \\
        --size S [--val-per-class V] [--seed 0]
    python scripts/make_synthetic_imagenet.py OUT --sample-photos

The same as the installed command ``chainerkfac-make-synthetic``
(:mod:`chainerkfac.datasets.synthetic`).
"""

import os
import sys

try:
    import chainerkfac  # noqa: F401 (first: makes Chainer importable)
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))

from chainerkfac.datasets.synthetic import main  # NOQA: E402


if __name__ == '__main__':
    main()
