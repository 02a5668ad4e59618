"""The ImageNet trainer of the paper, built from a validated config.

:func:`prepare` checks the input (config, device, dataset paths) on every
rank before any work starts; :func:`build_trainer` makes the Chainer
trainer of Algorithm 1 at scale: ResNet-50 (:class:`~chainerkfac.links.
ResNet50`), :class:`~chainerkfac.optimizers.DistributedKFAC` with the
schedules of Section 5 (:class:`~chainerkfac.extensions.KFACSchedule`),
mixup and random erasing in the :class:`~chainerkfac.training.KFACUpdater`,
the multi-node evaluator, the reports and the atomic snapshots.  The global
batch BS = per-process batch × processes × accumulation steps.

What rank 0 has to say (the run's configuration, the layer assignment in
one line, what was resumed, the data check) goes to the logger
``chainerkfac.trainer``; the full assignment table goes to
``<out>/plan.txt``.  The command line
(:mod:`chainerkfac.commands.train`) prints it.  Bad input raises
:class:`UsageError` on every rank, with one line.
"""

import logging
import os
import sys
import time
import typing

import chainer
from chainer.training import extensions
from chainer.training.triggers import IntervalTrigger
import chainermn
import numpy

from chainerkfac import config as config_module
from chainerkfac.datasets import imagenet
from chainerkfac.datasets.sampler import EpochIndexed
from chainerkfac.datasets.sampler import EpochOrderSampler
from chainerkfac import devices
from chainerkfac.distributed import agreement
from chainerkfac.distributed import communicator
from chainerkfac import files
from chainerkfac.extensions import FactorBuilds
from chainerkfac.extensions import FisherDiff
from chainerkfac.extensions import KFACSchedule
from chainerkfac.links import ResNet50
from chainerkfac.optimizers import DistributedKFAC
from chainerkfac.training.classifier import MixupClassifier
from chainerkfac.training.guards import NonFiniteGuard
from chainerkfac.training.plain_text import PlainText
from chainerkfac.training import reports
from chainerkfac.training import snapshot
from chainerkfac.training.triggers import AnyTrigger
from chainerkfac.training.updater import KFACUpdater
from chainerkfac import transforms

logger = logging.getLogger('chainerkfac.trainer')

#: the layer assignment's table, in the output folder
PLAN_FILE = 'plan.txt'

#: ``(train pairs, val pairs)``: ``(path, label)`` of every image.
Pairs = typing.Tuple[list, list]


#: the key the validation's top-1 accuracy is reported under
VALIDATION_ACCURACY = 'validation/main/accuracy'


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, on every rank."""


def on_root(comm: typing.Any, function: typing.Callable) -> typing.Any:
    """Runs ``function`` on rank 0; its result, or its :class:`UsageError`,
    reaches every rank."""
    return agreement.on_root(comm, function, UsageError, UsageError)


def load_config(name: str, overrides: typing.Iterable[str],
                size: int) -> config_module.Config:
    """The config ``name`` with ``--set`` overrides, for ``size``
    processes."""
    try:
        return config_module.load_config(name, overrides, size=size)
    except config_module.ConfigError as e:
        raise UsageError(str(e))


def select_device(cfg: config_module.Config,
                  world: typing.Any) -> chainer.backend.Device:
    """This process's device (``train.device``), agreed by every rank."""
    try:
        return devices.get_process_device(cfg.train.device, world)
    except devices.DeviceError as e:
        raise UsageError('{}: train.device: {}'.format(cfg.source, e))


def find_pairs(path: str, root: typing.Optional[str], what: str,
               classes: typing.Optional[list] = None,
               n_class: typing.Optional[int] = None) -> tuple:
    try:
        pairs, names = imagenet.find_images(path, root, classes, n_class)
    except imagenet.DatasetError as e:
        raise UsageError('data.{}: {}'.format(what, e))
    return pairs, names


def discover(comm: typing.Any, cfg: config_module.Config) -> Pairs:
    """``(train pairs, val pairs)``, checked on rank 0, known to all."""
    data = cfg.data
    n_class = cfg.n_class()
    train_pairs, classes = on_root(
        comm, lambda: find_pairs(data.train, data.root, 'train',
                                 n_class=n_class))
    try:  # what the config pins against what the data has
        notes = cfg.check_data(len(classes), len(train_pairs))
    except config_module.ConfigError as e:
        raise UsageError(str(e))
    n_class = cfg.n_class()
    note = cfg.first_update_note(comm.size)
    if comm.rank == 0:
        for line in notes + ([note] if note else []):
            logger.info('%s', line)
    # val classes are labelled by the training set's class names
    val_pairs, _ = on_root(
        comm, lambda: find_pairs(data.val, data.root, 'val', classes,
                                 n_class))
    missing = sorted(set(label for _, label in train_pairs) -
                     set(label for _, label in val_pairs))
    missing = [classes[label] for label in missing]
    if missing and comm.rank == 0:
        logger.info('data.val: %d of %d training classes have no '
                    'validation images: %s%s', len(missing), len(classes),
                    ', '.join(missing[:5]),
                    ', ...' if len(missing) > 5 else '')
    return train_pairs, val_pairs


def make_datasets(comm: typing.Any, cfg: config_module.Config, out: str,
                  train_pairs: list, val_pairs: list) -> tuple:
    """``(train, val, n_train)`` local datasets and the global train size
    (the N of the schedules)."""
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
            logger.warning('%s', line)
    val_local = chainermn.scatter_dataset(
        imagenet.ImageNetDataset(val_pairs, resize=data.resize)
        if comm.rank == 0 else None, comm)
    train = transforms.TransformedDataset(
        train_local, transforms.TrainTransform(mean, data.crop),
        seed=seed * 1000 + comm.rank)
    val = transforms.TransformedDataset(
        val_local, transforms.ValTransform(mean, data.crop), seed=seed)
    return train, val, data.n_train or len(train_pairs)


def make_iterators(cfg: config_module.Config, train: typing.Any,
                   val: typing.Any, epochs: int) -> tuple:
    """``(train iterator, val iterator)``: the training examples in the
    order of :class:`EpochOrderSampler`, loaded by ``data.loaderjobs``
    worker processes (serially when 0)."""
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


def make_optimizer(comm: typing.Any, cfg: config_module.Config,
                   model: chainer.Link, size: int) -> DistributedKFAC:
    """:class:`DistributedKFAC` with the config's η(0), m(0), γ(0), ρ_BN,
    set up on ``model``; float32 master weights and a static loss scale for
    ``train.dtype: mixed16``."""
    o = cfg.optimizer
    optimizer = DistributedKFAC(
        comm, lr=o.lr, momentum=o.momentum, damping=o.damping,
        bn_damping_ratio=o.bn_damping_ratio,
        weight_rescaling=o.weight_rescaling, bn_fisher=o.bn_fisher,
        factor_dtype=o.factor_dtype, momentum_schedule=o.momentum_schedule,
        weight_rescaling_variant=o.weight_rescaling_variant,
        refresh=o.refresh, refresh_tolerance=o.refresh_tolerance,
        max_interval=o.max_interval, fisher=o.fisher,
        fisher_seed=cfg.train.seed,
        accumulation_steps=cfg.accumulation_steps(size), print_plan=False)
    if cfg.train.dtype == 'mixed16':
        # float32 master weights; the backward pass runs loss-scaled
        optimizer.use_fp32_update()
        optimizer.loss_scaling(scale=cfg.train.loss_scale)
    return optimizer.setup(model)


def plan_summary(assignment: typing.Any, path: str) -> str:
    """The layer assignment in one line: blocks, owners, max load / lower
    bound, and where its table is."""
    counts = [len(assignment.layers_of(r)) for r in range(assignment.size)]
    owners = [n for n in counts if n]
    each = '{}'.format(owners[0]) if min(owners) == max(owners) else \
        '{}-{}'.format(min(owners), max(owners))
    return ('layer assignment: {} blocks on {} process{}, {} owner{} with {} '
            'blocks each{}; max load / lower bound {:.3f}; table: {}'.format(
                assignment.num_layers, assignment.size,
                'es' if assignment.size > 1 else '', len(owners),
                's' if len(owners) > 1 else '', each,
                ', some blocks replicated' if assignment.redundant else '',
                assignment.ratio(), path))


def report_plan(comm: typing.Any, optimizer: DistributedKFAC,
                out: str) -> None:
    """Makes the layer assignment now (on every rank); rank 0 writes its
    table to ``<out>/plan.txt`` and logs :func:`plan_summary`."""
    optimizer.plan()
    if comm.rank == 0:
        path = os.path.join(out, PLAN_FILE)
        with files.atomic_write(path, 'w') as f:
            f.write('\n'.join(optimizer.plan_lines) + '\n')
        logger.info('%s', plan_summary(optimizer.assignment, path))


def add_extensions(trainer: chainer.training.Trainer, comm: typing.Any,
                   cfg: config_module.Config, optimizer: DistributedKFAC,
                   val_iter: typing.Any, classifier: chainer.Link,
                   n_train: int, k: int, device: typing.Any,
                   identity: dict, progress_bar: bool = False) -> None:
    """The schedules, the guard, validation, Figure 5's Diff(t), the
    reports (rank 0) and the snapshots; ``k`` accumulation steps make one
    update."""
    t = cfg.train
    trainer.extend(KFACSchedule.from_config(cfg, n_train))
    trainer.extend(NonFiniteGuard())
    evaluator = extensions.Evaluator(val_iter, classifier, device=device)
    trainer.extend(chainermn.create_multi_node_evaluator(evaluator, comm),
                   trigger=(t.val_interval, 'epoch'), name='validation')
    if t.fisher_diff:
        trainer.extend(FisherDiff(optimizer, comm,
                                  flush_interval=t.log_interval * k))
    if comm.rank == 0:
        add_reports(trainer, t, optimizer, k, cfg.n_class(),
                    progress_bar=progress_bar)
    # on every rank (writing is collective): every snapshot_interval
    # updates and at the end (while the iterators still run: a finished
    # trainer's MultiprocessIterator cannot be saved)
    trainer.extend(
        snapshot.AtomicSnapshot(comm, keep=t.keep_snapshots,
                                identity=identity),
        trigger=AnyTrigger(
            IntervalTrigger(t.snapshot_interval * k, 'iteration'),
            IntervalTrigger(t.epochs, 'epoch')))


def add_reports(trainer: chainer.training.Trainer,
                t: config_module.TrainConfig, optimizer: DistributedKFAC,
                k: int, n_class: typing.Optional[int] = None,
                progress_bar: bool = False) -> None:
    """Log, printed table, plots and, with ``progress_bar``, Chainer's
    progress bar (rank 0).  The bar redraws itself with terminal control
    codes, and under mpiexec a process cannot tell a terminal from a file:
    off unless asked for."""
    log_trigger = (t.log_interval * k, 'iteration')
    for name in ('lr', 'momentum', 'damping'):
        trainer.extend(extensions.observe_value(
            name, lambda _, name=name: getattr(optimizer, name)),
            trigger=log_trigger)
    # eq. 20/21's interval, or the mean of the adaptive ones
    trainer.extend(extensions.observe_value(
        'interval', lambda _: optimizer.refresh_rule.mean_interval(
            optimizer.kfac_layers)), trigger=log_trigger)
    trainer.extend(extensions.LogReport(trigger=log_trigger))
    trainer.extend(FactorBuilds(optimizer, log=logger))
    trainer.extend(reports.LastValues([VALIDATION_ACCURACY]))
    trainer.extend(extensions.PrintReport(
        ['epoch', 'iteration', 'lr', 'momentum', 'damping', 'interval',
         'main/loss', 'main/accuracy', 'validation/main/accuracy',
         'elapsed_time'],
        out=sys.stdout if progress_bar else PlainText()),
        trigger=log_trigger)
    if progress_bar:
        trainer.extend(extensions.ProgressBar(update_interval=max(1, k)))
    reports.add_plots(
        trainer, optimizer, n_class=n_class,
        accuracy_target=t.accuracy_target, mixup=t.mixup_alpha > 0,
        draw_trigger=log_trigger,
        t_warmup=trainer.get_extension('KFACSchedule').t_warmup)


def find_resume(comm: typing.Any, spec: str, out: str,
                identity: dict) -> typing.Optional[str]:
    """The snapshot ``--resume`` names, checked on rank 0 before anything
    is written (complete, of this config), or None: start anew."""
    def check():
        try:
            path = snapshot.resolve_snapshot(spec, out, identity)
        except snapshot.SnapshotError as e:
            raise UsageError('--resume: {}'.format(e))
        if path is None:
            logger.info('resume auto: no snapshot in %s, starting anew', out)
        return path
    return on_root(comm, check)


def resume(trainer: chainer.training.Trainer, comm: typing.Any, path: str,
           identity: dict) -> None:
    """Loads the snapshot on every rank; rank 0 says what was resumed."""
    try:
        line = snapshot.load_snapshot(path, trainer, comm, identity)
    except snapshot.SnapshotError as e:
        raise UsageError('--resume: {}'.format(e))
    if comm.rank == 0:
        logger.info('%s', line)


def check_data(comm: typing.Any, cfg: config_module.Config,
               pairs: Pairs) -> int:
    """``--check-data``: every image read once, by all processes; rank 0
    lists the unreadable ones.  Returns their number, on every rank."""
    start = time.time()
    paths = [path for part in pairs for path, _ in part]
    mine = paths[comm.rank::comm.size]
    bad = imagenet.check_images(mine, cfg.data.resize,
                                max(1, cfg.data.loaderjobs))
    bad = [item for part in comm.gather_obj(bad) or [] for item in part]
    if comm.rank == 0:
        for path, problem in sorted(bad):
            logger.info('unreadable: %s', problem)
        logger.info('check-data: %d images read in %.1f s by %d processes: '
                    '%d unreadable', len(paths), time.time() - start,
                    comm.size, len(bad))
    return comm.bcast_obj(len(bad) if comm.rank == 0 else None)


def make_output_folder(out: str) -> None:
    """Creates ``out`` and checks that it is writable (rank 0)."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, '.write-test-{}'.format(os.getpid()))
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError('--out: {}: cannot write there: {}'.format(
            out, e.strerror or e))


class Job(typing.NamedTuple):
    """The checked input of a run: known to every rank."""
    cfg: config_module.Config
    size: int
    device: typing.Any
    comm: typing.Any
    pairs: Pairs


def prepare(config: str, overrides: typing.Iterable[str] = ()) -> Job:
    """The config, the device and the communicator of this process, and
    the training and validation images, checked on every rank."""
    world = communicator.world()
    size = world.size
    cfg = load_config(config, overrides, size)
    device = select_device(cfg, world)
    device.use()
    comm = chainermn.create_communicator(devices.communicator_name(
        cfg.optimizer.communicator, device))
    return Job(cfg, size, device, comm, discover(comm, cfg))


def describe(job: Job, k: int, n_train: int, t_warmup: int) -> None:
    """Logs the run's BS split, N, t_warmup, device and dtype (rank 0)."""
    cfg = job.cfg
    logger.info('config %s: BS %d = %d per process x %d processes x %d '
                'accumulation steps; N_train %d; t_warmup %d iterations',
                cfg.source, cfg.train.batch_size,
                cfg.train.batch_per_process, job.size, k, n_train, t_warmup)
    logger.info('device: %s per process; communicator: %s; dtype: %s',
                devices.describe(job.device), type(job.comm).__name__,
                cfg.train.dtype + (
                    ' (loss scale {:g})'.format(cfg.train.loss_scale)
                    if cfg.train.dtype == 'mixed16' else ''))


def build_trainer(job: Job, out: str = 'result',
                  resume_spec: typing.Optional[str] = None,
                  progress_bar: bool = False) -> chainer.training.Trainer:
    """The trainer of ``job``, writing under ``out``, resumed from the
    snapshot ``resume_spec`` names (a path or ``'auto'``) if any; with
    ``progress_bar``, Chainer's progress bar too."""
    cfg, size, device, comm, pairs = job
    k = cfg.accumulation_steps(size)
    try:
        t_warmup = cfg.check_warmup(cfg.data.n_train or len(pairs[0]))
    except config_module.ConfigError as e:
        raise UsageError(str(e))
    identity = cfg.identity(len(pairs[0]))
    resume_path = find_resume(comm, resume_spec, out, identity) \
        if resume_spec else None
    # nothing is written before the input is checked
    on_root(comm, lambda: make_output_folder(out))
    train, val, n_train = make_datasets(comm, cfg, out, *pairs)
    if comm.rank == 0:
        describe(job, k, n_train, t_warmup)
    epochs = int(numpy.ceil(cfg.train.epochs)) + 2
    train_iter, val_iter = make_iterators(cfg, train, val, epochs)

    n_class = cfg.n_class()
    if cfg.train.dtype == 'mixed16':  # float16 links, float32 BN parameters
        chainer.global_config.dtype = chainer.mixed16
    numpy.random.seed(cfg.train.seed)  # HeNormal draws from NumPy's global
    model = ResNet50(n_class=n_class, width=cfg.model.width)
    classifier = MixupClassifier(model)
    classifier.to_device(device)
    optimizer = make_optimizer(comm, cfg, classifier, size)
    report_plan(comm, optimizer, out)
    seed = cfg.train.seed * 1000 + comm.rank
    mixup = transforms.RunningMixup(cfg.train.mixup_alpha, n_class,
                                    seed=seed)
    p_erase = cfg.train.random_erasing

    def erase(x, rng):
        return transforms.erase_batch(x, rng, p=p_erase)

    updater = KFACUpdater(train_iter, optimizer, mixup=mixup, erase=erase,
                          seed=seed, device=device)
    trainer = chainer.training.Trainer(
        updater, (cfg.train.epochs, 'epoch'), out=out)
    add_extensions(trainer, comm, cfg, optimizer, val_iter, classifier,
                   n_train, k, device, identity, progress_bar)
    if resume_path is not None:
        resume(trainer, comm, resume_path, identity)
    return trainer


def accuracy_line(trainer: chainer.training.Trainer,
                  target: typing.Optional[float]) -> typing.Optional[str]:
    """``final validation top-1: 0.xxxx`` (and whether ``target`` was
    reached): the last validation's (the log's last row, which may average
    several, after a resume that ran none), or None before any
    validation."""
    last = trainer.get_extension('LastValues').values.get(
        VALIDATION_ACCURACY)
    if last is None:
        log = trainer.get_extension('LogReport').log
        values = [entry[VALIDATION_ACCURACY] for entry in log
                  if VALIDATION_ACCURACY in entry]
        if not values:
            return None
        last = values[-1]
    line = 'final validation top-1: {:.4f}'.format(last)
    if target is not None:
        line += ' (target {}: {})'.format(
            target, 'reached' if last >= target else 'NOT reached')
    return line
