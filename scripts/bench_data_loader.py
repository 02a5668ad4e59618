#!/usr/bin/env python
"""Images/s of the training data pipeline alone (is loading the bottleneck?).

    python scripts/bench_data_loader.py --data DIR [--batch 32] [--jobs 2] \\
        [--iterations 20] [--resize 256] [--crop 224] [--step-seconds S]

Reads the folder tree ``DIR`` (a data set's root with ``train/`` in it, the
training tree itself, or a file list) through the trainer's
pipeline: resize, random crop, flip, mean subtraction, in a
``MultiprocessIterator`` with ``--jobs`` workers (forkserver, shared memory),
and prints images/s.  With ``--step-seconds`` (a training step's time, e.g.
from ``scripts/bench_kfac.py``) it prints the images/s the step consumes and
whether loading keeps up.
"""

import argparse
import multiprocessing
import os
import sys
import time

import chainerkfac  # noqa: F401 (first: makes Chainer importable)

import chainer  # NOQA: E402
import numpy  # NOQA: E402

from chainerkfac.datasets import imagenet  # NOQA: E402
from chainerkfac import transforms  # NOQA: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', required=True,
                        help="a data set's root (its train/ is read), a "
                        'tree of class folders, or a file list')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--iterations', type=int, default=20)
    parser.add_argument('--resize', type=int, default=256)
    parser.add_argument('--crop', type=int, default=224)
    parser.add_argument('--step-seconds', type=float, default=None)
    args = parser.parse_args(argv)
    multiprocessing.set_start_method('forkserver', force=True)
    path = args.data
    train = os.path.join(path, 'train')
    if os.path.isdir(train) and not any(
            f.lower().endswith(imagenet.EXTENSIONS)
            for f in os.listdir(train)):
        path = train  # a data set's root: its training tree
    try:
        pairs, _ = imagenet.find_images(path)
    except imagenet.DatasetError as e:
        sys.exit('error: {}'.format(e))
    base = imagenet.ImageNetDataset(pairs, resize=args.resize)
    mean = numpy.full((3, args.crop, args.crop), 117., numpy.float32)
    dataset = transforms.TransformedDataset(
        base, transforms.TrainTransform(mean, args.crop))
    shared_mem = 3 * args.crop * args.crop * 4 * args.batch + 1024
    it = chainer.iterators.MultiprocessIterator(
        dataset, args.batch, n_processes=args.jobs, shared_mem=shared_mem)
    it.next()  # start the workers
    start = time.perf_counter()
    for _ in range(args.iterations):
        it.next()
    seconds = time.perf_counter() - start
    it.finalize()
    rate = args.iterations * args.batch / seconds
    print('data loader: {:.1f} images/s ({} workers, batch {}, {}x{} -> '
          '{}x{}; {} images of {})'.format(
              rate, args.jobs, args.batch, args.resize, args.resize,
              args.crop, args.crop, len(pairs), path))
    if args.step_seconds:
        need = args.batch / args.step_seconds
        print('training step: {:.1f} images/s; loading is {}'.format(
            need, 'the bottleneck' if rate < need else 'not the bottleneck'))


if __name__ == '__main__':
    main()
