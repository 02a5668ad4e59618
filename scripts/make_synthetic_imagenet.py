#!/usr/bin/env python
"""Write a small learnable ImageNet-style JPEG folder tree.

    python scripts/make_synthetic_imagenet.py OUT --classes K --per-class M \\
        --size S [--val-per-class V] [--seed 0]
    python scripts/make_synthetic_imagenet.py OUT --sample-photos

The same as the installed command ``chainerkfac-make-synthetic``
(:mod:`chainerkfac.commands.make_synthetic`).
"""


import chainerkfac  # noqa: F401 (first: makes Chainer importable)

from chainerkfac.commands.make_synthetic import main  # NOQA: E402


if __name__ == '__main__':
    main()
