"""``chainerkfac-make-synthetic``: a small learnable ImageNet-style JPEG
folder tree (:mod:`chainerkfac.datasets.synthetic`), the demo's data.

Usage::

    chainerkfac-make-synthetic OUT --classes K --per-class M --size S \\
        [--val-per-class V] [--seed 0]
    chainerkfac-make-synthetic OUT --sample-photos
"""

import argparse
import sys
import typing

from chainerkfac.datasets.synthetic import make_sample_photo_tree
from chainerkfac.datasets.synthetic import make_synthetic_tree


def main(argv: typing.Optional[typing.List[str]] = None) -> None:
    """The command: writes the tree ``argv`` asks for and says so."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0])
    parser.add_argument('out')
    parser.add_argument('--classes', type=int, default=4)
    parser.add_argument('--per-class', type=int, default=64)
    parser.add_argument('--val-per-class', type=int, default=None)
    parser.add_argument('--size', type=int, default=40)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--sample-photos', action='store_true',
                        help="scikit-learn's two photographs as 2 classes")
    args = parser.parse_args(argv)
    if args.classes < 1 or args.per_class < 1 or args.size < 8:
        sys.exit('error: need --classes >= 1, --per-class >= 1, --size >= 8')
    if args.sample_photos:
        make_sample_photo_tree(args.out, seed=args.seed)
    else:
        make_synthetic_tree(args.out, args.classes, args.per_class,
                            args.size, args.val_per_class, args.seed)
    print('wrote {}'.format(args.out))


if __name__ == '__main__':
    main()
