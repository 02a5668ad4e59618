"""``chainerkfac-make-synthetic``: a small learnable ImageNet-style JPEG
folder tree (:mod:`chainerkfac.datasets.synthetic`), the demo's data.

``--help`` (:data:`DESCRIPTION`, :data:`EPILOG`) says what it writes.
"""

import argparse
import sys
import typing

from chainerkfac.datasets.synthetic import make_sample_photo_tree
from chainerkfac.datasets.synthetic import make_synthetic_tree

DESCRIPTION = """\
Write a small, learnable ImageNet-style tree of JPEG images (coloured
shapes, a shape and a colour per class), the demo's and the tests' data:
OUT/train/class_<k>/*.JPEG and OUT/val/class_<k>/*.JPEG."""

EPILOG = """\
example (the demo's data; chainerkfac-train --config synthetic.yaml reads
data/synthetic):
  chainerkfac-make-synthetic data/synthetic --classes 4 --per-class 64 \\
      --size 40
"""


def parse_args(argv: typing.Optional[typing.List[str]] = None
               ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out', metavar='OUT',
                        help='the folder to write (train/ and val/ in it)')
    parser.add_argument('--classes', type=int, default=4, metavar='K',
                        help='number of classes (default: 4)')
    parser.add_argument('--per-class', type=int, default=64, metavar='M',
                        help='training images per class (default: 64)')
    parser.add_argument('--val-per-class', type=int, default=None,
                        metavar='V', help='validation images per class '
                        '(default: max(5, M // 4))')
    parser.add_argument('--size', type=int, default=40, metavar='S',
                        help='image side in pixels, at least 8 (default: 40)')
    parser.add_argument('--seed', type=int, default=0,
                        help='random seed (default: 0)')
    parser.add_argument('--sample-photos', action='store_true',
                        help="instead: random crops of scikit-learn's two "
                        'sample photographs as 2 classes, china and flower, '
                        '20 training and 6 validation images each (needs '
                        'scikit-learn; default: off)')
    return parser.parse_args(argv)


def main(argv: typing.Optional[typing.List[str]] = None) -> None:
    """The command: writes the tree ``argv`` asks for and says so."""
    args = parse_args(argv)
    if args.classes < 1 or args.per_class < 1 or args.size < 8 or (
            args.val_per_class is not None and args.val_per_class < 1):
        sys.exit('error: need --classes >= 1, --per-class >= 1, '
                 '--val-per-class >= 1 and --size >= 8')
    if args.sample_photos:
        make_sample_photo_tree(args.out, seed=args.seed)
    else:
        make_synthetic_tree(args.out, args.classes, args.per_class,
                            args.size, args.val_per_class, args.seed)
    print('wrote {}'.format(args.out))


if __name__ == '__main__':
    main()
