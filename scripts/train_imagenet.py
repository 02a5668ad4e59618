#!/usr/bin/env python
"""Train ResNet-50 on ImageNet with distributed K-FAC (Osawa et al., 2019).

Usage::

    mpirun -n N python scripts/train_imagenet.py --config bs32k.yaml \\
        --set data.train=/data/imagenet/train data.val=/data/imagenet/val
    mpiexec -n 2 python scripts/train_imagenet.py --config synthetic.yaml

CONFIG is a path or a bare name in ``configs/``; ``--set`` overrides any key
by its dotted name, typed and validated like the file.  Everything the run
writes goes under ``--out`` (default ``result/``): the JSON ``log``, the
``*.png`` plots, the ``snapshot_iter_*`` folders and the cached mean image.
``--resume SNAPSHOT`` (or ``--resume auto``: the newest complete snapshot in
``--out``) continues a run: exactly on the same number of processes; on
another, with the layer assignment re-planned and all factors kept (see
:mod:`chainerkfac.training.snapshot`).  A snapshot of another config (keys
outside ``chainerkfac.config.MAY_DIFFER_ON_RESUME``) is refused.

The global batch BS = per-process batch × processes × accumulation steps:
the accumulation steps are derived from the config and the number of
processes.  Bad input (config, dataset paths) stops every rank with a one-line
error before any work starts.
"""

import os

import argparse  # NOQA: E402
import multiprocessing  # NOQA: E402
import sys  # NOQA: E402

try:
    import chainerkfac  # NOQA: first: makes Chainer importable (compat)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    import chainerkfac  # NOQA

import chainer  # NOQA: E402
from chainer.training import extensions  # NOQA: E402
from chainer.training.triggers import IntervalTrigger  # NOQA: E402
import chainermn  # NOQA: E402
import numpy  # NOQA: E402

from chainerkfac.distributed import communicator  # NOQA: E402
from chainerkfac import config as config_module  # NOQA: E402
from chainerkfac import devices  # NOQA: E402
from chainerkfac.datasets import imagenet  # NOQA: E402
from chainerkfac.extensions import FisherDiff  # NOQA: E402
from chainerkfac.extensions import KFACSchedule  # NOQA: E402
from chainerkfac.links import ResNet50  # NOQA: E402
from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402
from chainerkfac import training as training_module  # NOQA: E402
from chainerkfac import transforms  # NOQA: E402


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, on every rank."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--config', required=True,
                        help='YAML file, or a bare name in configs/')
    parser.add_argument('--set', nargs='+', action='extend', default=[],
                        metavar='KEY=VALUE',
                        help='override config keys (dotted names)')
    parser.add_argument('--resume', default=None,
                        help="snapshot to continue from, or 'auto'")
    parser.add_argument('--out', default='result',
                        help='output directory (default: result/)')
    parser.add_argument('--check-data', action='store_true',
                        help='read every training and validation image as '
                        'training would (all processes, data.loaderjobs '
                        'workers each), list the unreadable ones and exit '
                        '(1 if any); nothing is written')
    parser.add_argument('--debug', action='store_true',
                        help='print the traceback of an error before its '
                        'one line')
    return parser.parse_args(argv)


class EpochOrderSampler(object):
    """Shuffles the n local examples anew every epoch, reproducibly.

    The order of epoch k is ``RandomState([seed, k]).permutation(n)``,
    offset by k·n: the indices of :class:`EpochIndexed` tell the transform
    which epoch it draws for, so the random crops and flips are a function of
    (seed, epoch, example) even in the loader's worker processes, and a
    resumed run (the iterator's snapshot holds the current order) continues
    exactly.
    """

    def __init__(self, seed, n):
        self.seed = seed
        self.n = n

    def __call__(self, current_order, current_position):
        if len(current_order) == self.n:
            epoch = int(current_order[0]) // self.n + 1
        else:  # reset: chainer passes arange(len(dataset))
            epoch = 0
        rng = numpy.random.RandomState([self.seed, epoch])
        return rng.permutation(self.n) + epoch * self.n


class EpochIndexed(chainer.dataset.DatasetMixin):
    """Index ``k·n + i`` = example ``i`` of ``base`` drawn in epoch ``k``."""

    def __init__(self, base, epochs):
        self.base = base
        self.n = len(base)
        self.epochs = epochs

    def __len__(self):
        return self.n * self.epochs

    def get_example(self, j):
        epoch, i = divmod(int(j), self.n)
        self.base.set_epoch(epoch)
        return self.base.get_example(i)


def load_config(args, size):
    try:
        return config_module.load_config(args.config, args.set, size=size)
    except config_module.ConfigError as e:
        raise UsageError(str(e))


def find_pairs(path, root, what, classes=None, n_class=None):
    try:
        pairs, names = imagenet.find_images(path, root, classes, n_class)
    except imagenet.DatasetError as e:
        raise UsageError('data.{}: {}'.format(what, e))
    return pairs, names


def on_root(comm, function):
    """Runs ``function`` on rank 0; its result, or its :class:`UsageError`,
    reaches every rank."""
    return communicator.on_root(comm, function, UsageError, UsageError)


def discover(comm, cfg):
    """``(train pairs, val pairs)``, checked on rank 0, known to all."""
    data = cfg.data
    n_class = cfg.n_class()
    train_pairs, classes = on_root(
        comm, lambda: find_pairs(data.train, data.root, 'train',
                                 n_class=n_class))
    if len(classes) > n_class:
        raise UsageError('data.train: {} classes but n_class is {}'.format(
            len(classes), n_class))
    # val classes are labelled by the training set's class names
    val_pairs, _ = on_root(
        comm, lambda: find_pairs(data.val, data.root, 'val', classes,
                                 n_class))
    missing = sorted(set(label for _, label in train_pairs) -
                     set(label for _, label in val_pairs))
    missing = [classes[label] for label in missing]
    if missing and comm.rank == 0:
        print('data.val: {} of {} training classes have no validation '
              'images: {}{}'.format(len(missing), len(classes),
                                    ', '.join(missing[:5]),
                                    ', ...' if len(missing) > 5 else ''))
    return train_pairs, val_pairs


def make_datasets(comm, cfg, out, train_pairs, val_pairs):
    """``(train, val, n_train)`` local datasets and the global train size."""
    data = cfg.data
    train_full = imagenet.ImageNetDataset(train_pairs, resize=data.resize)
    mean = imagenet.load_or_compute_mean(train_full, train_pairs, out,
                                         crop=data.crop, comm=comm)
    seed = cfg.train.seed
    train_local = chainermn.scatter_dataset(
        train_full if comm.rank == 0 else None, comm, shuffle=True,
        seed=seed)
    if comm.rank == 0:
        for line in imagenet.split_warnings(
                len(train_full), len(train_local), comm.size,
                cfg.train.batch_per_process):
            sys.stderr.write('warning: {}\n'.format(line))
        sys.stderr.flush()
    val_local = chainermn.scatter_dataset(
        imagenet.ImageNetDataset(val_pairs, resize=data.resize)
        if comm.rank == 0 else None, comm)
    train = transforms.TransformedDataset(
        train_local, transforms.TrainTransform(mean, data.crop),
        seed=seed * 1000 + comm.rank)
    val = transforms.TransformedDataset(
        val_local, transforms.ValTransform(mean, data.crop), seed=seed)
    return train, val, data.n_train or len(train_pairs)


def make_iterators(cfg, train, val, epochs):
    batch = cfg.train.batch_per_process
    order = EpochOrderSampler(cfg.train.seed, len(train))
    train = EpochIndexed(train, epochs)
    jobs = cfg.data.loaderjobs
    if jobs > 0:
        shape = (3, cfg.data.crop, cfg.data.crop)
        shared_mem = int(numpy.prod(shape)) * 4 * batch + 1024
        train_iter = chainer.iterators.MultiprocessIterator(
            train, batch, n_processes=jobs, order_sampler=order,
            shared_mem=shared_mem)
    else:
        train_iter = chainer.iterators.SerialIterator(
            train, batch, order_sampler=order)
    # the evaluator resets its iterator every time, which a finalized
    # MultiprocessIterator does not support: validation loads serially
    val_iter = chainer.iterators.SerialIterator(
        val, batch, repeat=False, shuffle=False)
    return train_iter, val_iter


def make_optimizer(comm, cfg, model, size):
    o = cfg.optimizer
    optimizer = DistributedKFAC(
        comm, lr=o.lr, momentum=o.momentum, damping=o.damping,
        bn_damping_ratio=o.bn_damping_ratio,
        weight_rescaling=o.weight_rescaling, bn_fisher=o.bn_fisher,
        factor_dtype=o.factor_dtype,
        accumulation_steps=cfg.accumulation_steps(size))
    if cfg.train.dtype == 'mixed16':
        # float32 master weights; the backward pass runs loss-scaled
        optimizer.use_fp32_update()
        optimizer.loss_scaling(scale=cfg.train.loss_scale)
    return optimizer.setup(model)


def add_extensions(trainer, comm, cfg, optimizer, val_iter, classifier,
                   n_train, k, device, identity):
    t = cfg.train
    trainer.extend(KFACSchedule.from_config(cfg, n_train))
    trainer.extend(training_module.NonFiniteGuard())
    evaluator = extensions.Evaluator(val_iter, classifier, device=device)
    trainer.extend(chainermn.create_multi_node_evaluator(evaluator, comm),
                   trigger=(t.val_interval, 'epoch'), name='validation')
    if t.fisher_diff:
        trainer.extend(FisherDiff(optimizer, comm,
                                  flush_interval=t.log_interval * k))
    if comm.rank == 0:
        add_reports(trainer, t, optimizer, k)
    # on every rank (writing is collective): every snapshot_interval
    # updates and at the end (while the iterators still run: a finished
    # trainer's MultiprocessIterator cannot be saved)
    trainer.extend(
        training_module.AtomicSnapshot(comm, keep=t.keep_snapshots,
                                       identity=identity),
        trigger=AnyTrigger(
            IntervalTrigger(t.snapshot_interval * k, 'iteration'),
            IntervalTrigger(t.epochs, 'epoch')))


def add_reports(trainer, t, optimizer, k):
    """Log, printed table, progress bar and plots (rank 0)."""
    log_trigger = (t.log_interval * k, 'iteration')
    for name in ('lr', 'momentum', 'damping', 'g_interval'):
        trainer.extend(extensions.observe_value(
            name if name != 'g_interval' else 'interval',
            lambda _, name=name: getattr(optimizer, name)),
            trigger=log_trigger)
    trainer.extend(extensions.LogReport(trigger=log_trigger))
    trainer.extend(extensions.PrintReport(
        ['epoch', 'iteration', 'lr', 'momentum', 'damping', 'interval',
         'main/loss', 'main/accuracy', 'validation/main/accuracy',
         'elapsed_time']), trigger=log_trigger)
    trainer.extend(extensions.ProgressBar(update_interval=max(1, k)))
    if training_module.PlotReport.available():
        trainer.extend(training_module.PlotReport(
            ['main/loss', 'validation/main/loss'], 'epoch',
            filename='loss.png'))
        trainer.extend(training_module.PlotReport(
            ['main/accuracy', 'validation/main/accuracy'], 'epoch',
            filename='accuracy.png'))
        trainer.extend(training_module.PlotReport(
            ['lr', 'damping'], 'iteration', filename='lr_damping.png'))


class AnyTrigger(object):
    """Fires when any of its triggers fires (each is called every time)."""

    def __init__(self, *triggers):
        self.triggers = triggers

    def __call__(self, trainer):
        return any([trigger(trainer) for trigger in self.triggers])

    def serialize(self, serializer):
        for i, trigger in enumerate(self.triggers):
            trigger.serialize(serializer[str(i)])


def find_resume(comm, spec, out, identity):
    """The snapshot ``--resume`` names, checked on rank 0 before anything
    is written (complete, of this config), or None: start anew."""
    def check():
        try:
            path = training_module.resolve_snapshot(spec, out, identity)
        except training_module.SnapshotError as e:
            raise UsageError('--resume: {}'.format(e))
        if path is None:
            print('resume auto: no snapshot in {}, starting anew'.format(out))
        return path
    return on_root(comm, check)


def resume(trainer, comm, path, identity):
    """Loads the snapshot on every rank; rank 0 says what was resumed."""
    try:
        line = training_module.load_snapshot(path, trainer, comm, identity)
    except training_module.SnapshotError as e:
        raise UsageError('--resume: {}'.format(e))
    if comm.rank == 0:
        print(line)
        sys.stdout.flush()


def check_data(comm, cfg, pairs):
    """``--check-data``: every image read once; rank 0 lists the
    unreadable ones."""
    import time
    start = time.time()
    paths = [path for part in pairs for path, _ in part]
    mine = paths[comm.rank::comm.size]
    bad = imagenet.check_images(mine, cfg.data.resize,
                                max(1, cfg.data.loaderjobs))
    bad = [item for part in comm.gather_obj(bad) or [] for item in part]
    if comm.rank == 0:
        for path, problem in sorted(bad):
            print('unreadable: {}'.format(problem))
        print('check-data: {} images read in {:.1f} s by {} processes: {} '
              'unreadable'.format(len(paths), time.time() - start, comm.size,
                                  len(bad)))
        sys.stdout.flush()
    if comm.mpi_comm.bcast(len(bad) if comm.rank == 0 else None):
        sys.exit(1)
    return None


def make_output_folder(out):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, '.write-test-{}'.format(os.getpid()))
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError('--out: {}: cannot write there: {}'.format(
            out, e.strerror or e))


def select_device(cfg, world):
    """This process's device (``train.device``), agreed by every rank."""
    try:
        return devices.get_process_device(cfg.train.device, world)
    except devices.DeviceError as e:
        raise UsageError('{}: train.device: {}'.format(cfg.source, e))


def run(args):
    from mpi4py import MPI
    size = MPI.COMM_WORLD.size
    cfg = load_config(args, size)
    device = select_device(cfg, MPI.COMM_WORLD)
    device.use()
    comm = chainermn.create_communicator(devices.communicator_name(
        cfg.optimizer.communicator, device))
    k = cfg.accumulation_steps(size)
    pairs = discover(comm, cfg)
    if args.check_data:
        return check_data(comm, cfg, pairs)
    try:
        t_warmup = cfg.check_warmup(cfg.data.n_train or len(pairs[0]))
    except config_module.ConfigError as e:
        raise UsageError(str(e))
    identity = cfg.identity(len(pairs[0]))
    resume_path = find_resume(comm, args.resume, args.out, identity) \
        if args.resume else None
    # nothing is written before the input is checked
    on_root(comm, lambda: make_output_folder(args.out))
    train, val, n_train = make_datasets(comm, cfg, args.out, *pairs)
    if comm.rank == 0:
        print('config {}: BS {} = {} per process x {} processes x {} '
              'accumulation steps; N_train {}; t_warmup {} iterations'
              .format(cfg.source, cfg.train.batch_size,
                      cfg.train.batch_per_process, size, k, n_train,
                      t_warmup))
        print('device: {} per process; communicator: {}; dtype: {}'.format(
            devices.describe(device), type(comm).__name__, cfg.train.dtype
            + (' (loss scale {:g})'.format(cfg.train.loss_scale)
               if cfg.train.dtype == 'mixed16' else '')))
        sys.stdout.flush()
    epochs = int(numpy.ceil(cfg.train.epochs)) + 2
    train_iter, val_iter = make_iterators(cfg, train, val, epochs)

    n_class = cfg.n_class()
    if cfg.train.dtype == 'mixed16':  # float16 links, float32 BN parameters
        chainer.global_config.dtype = chainer.mixed16
    numpy.random.seed(cfg.train.seed)  # HeNormal draws from NumPy's global
    model = ResNet50(n_class=n_class, width=cfg.model.width)
    classifier = training_module.MixupClassifier(model)
    classifier.to_device(device)
    optimizer = make_optimizer(comm, cfg, classifier, size)
    mixup = transforms.RunningMixup(
        cfg.train.mixup_alpha, n_class, seed=cfg.train.seed * 1000 + comm.rank)
    p_erase = cfg.train.random_erasing

    def erase(x, rng):
        return transforms.erase_batch(x, rng, p=p_erase)

    updater = training_module.KFACUpdater(
        train_iter, optimizer, mixup=mixup, erase=erase,
        seed=cfg.train.seed * 1000 + comm.rank, device=device)
    trainer = chainer.training.Trainer(
        updater, (cfg.train.epochs, 'epoch'), out=args.out)
    add_extensions(trainer, comm, cfg, optimizer, val_iter, classifier,
                   n_train, k, device, identity)
    if resume_path is not None:
        resume(trainer, comm, resume_path, identity)
    try:
        trainer.run(show_loop_exception_msg=args.debug)
    except FloatingPointError as e:  # non-finite loss or parameters
        last = training_module.find_latest_snapshot(args.out)
        sys.stderr.write('error: {} (last good snapshot: {})\n'.format(
            ' '.join(str(e).split()), last))
        sys.stderr.flush()
        comm.mpi_comm.Abort(3)
    except training_module.SnapshotError as e:  # raised on every rank
        if comm.rank == 0:
            sys.stderr.write('error: {} (last complete snapshot: {})\n'
                             .format(e, training_module.find_latest_snapshot(
                                 args.out)))
        sys.exit(1)
    if comm.rank == 0:
        print('final snapshot: {}'.format(
            training_module.find_latest_snapshot(args.out)))
        report_accuracy(trainer, cfg.train.accuracy_target)
    return trainer


def report_accuracy(trainer, target):
    """Prints the final validation top-1 (and the target, if any)."""
    log = trainer.get_extension('LogReport').log
    values = [entry['validation/main/accuracy'] for entry in log
              if 'validation/main/accuracy' in entry]
    if not values:
        return
    line = 'final validation top-1: {:.4f}'.format(values[-1])
    if target is not None:
        line += ' (target {}: {})'.format(
            target, 'reached' if values[-1] >= target else 'NOT reached')
    print(line)


def main(argv=None):
    args = parse_args(argv)
    # from here on, an error on any rank ends every rank with its one line
    communicator.install_abort_hook(debug=args.debug)
    # workers of the data loader must not fork an MPI process
    multiprocessing.set_start_method('forkserver', force=True)
    try:
        run(args)
    except UsageError as e:
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank == 0:
            sys.stderr.write('error: {}\n'.format(e))
        sys.exit(2)


if __name__ == '__main__':
    main()
