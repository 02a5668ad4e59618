#!/usr/bin/env python
"""Distributed K-FAC of ResNet-50 stage by stage, on each rank.

Run as ``mpiexec -n P python scripts/bench_distributed.py`` (P = 1, 2; more
with ``--oversubscribe --plan-only``).  Every process uses one BLAS thread
(``OMP_NUM_THREADS=1`` unless set), so P processes have P cores.  Prints, for
one update with every factor due (interval 1) at 32 images per process:

* ``alone``  (P > 1 only): every rank runs DistributedKFAC on its own
  (``MPI.COMM_SELF``) at the same time: the P = 1 job, P times in parallel,
  so both measurements share the machine the same way;
* ``together``: DistributedKFAC over all P ranks;

each as a table of stage seconds per rank and the bytes each rank sent, then
the ratio of the inversion + preconditioning stage (the slowest rank's)
together vs alone (target at P = 2: <= 0.6, model parallelism working), and
the factor bytes of one update sent as packed float16 triangles against the
same factors as dense float32 (target <= 0.26), counted by the optimizer
during a real float16 update on a small input (the factor sizes do not depend
on the input size).
"""

import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import argparse  # NOQA: E402
import sys  # NOQA: E402
import time  # NOQA: E402

import chainerkfac  # noqa: E402,F401 (first: makes Chainer importable)

import chainer.functions as F  # NOQA: E402
import chainermn  # NOQA: E402
import numpy  # NOQA: E402

from chainerkfac.distributed import communicator  # NOQA: E402
from chainerkfac.distributed import plan as plan_module  # NOQA: E402
from chainerkfac import devices  # NOQA: E402
from chainerkfac.links import ResNet50  # NOQA: E402
from chainerkfac import options  # NOQA: E402
from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402

STAGES = ('forward_backward', 'factors', 'reduce_scatter', 'inverse',
          'precondition', 'all_gather', 'update')
BYTES = (('reduce_scatter', ('gradient_bytes', 'factor_bytes')),
         ('all_gather', ('preconditioned_bytes',)))


def batch(rank, n, size, n_class, seed, device):
    rng = numpy.random.RandomState(seed + rank)
    x = rng.rand(n, 3, size, size).astype(numpy.float32)
    t = rng.randint(0, n_class, n).astype(numpy.int32)
    return device.send((x, t))


def make_optimizer(comm, args, factor_dtype):
    numpy.random.seed(args.seed)  # the same model on every rank
    model = ResNet50(args.n_class)
    model.to_device(args.device_object)
    opt = DistributedKFAC(comm, lr=0.01, damping=2.5e-2,
                          bn_damping_ratio=16.0, bn_fisher=args.bn_fisher,
                          factor_dtype=factor_dtype, print_plan=False)
    opt.setup(model)
    opt.synchronize_stages = True  # device times per stage

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)
    return opt, lossfun


def counters_delta(opt, before):
    return {k: opt.comm_counters[k] - before[k] for k in opt.comm_counters}


def timed_update(comm, args, factor_dtype, n, size):
    """One update after a first (plan, broadcast) update on a small input:
    ``(stage seconds, counters of the timed update, optimizer)``."""
    opt, lossfun = make_optimizer(comm, args, factor_dtype)
    rank = comm.rank
    device = args.device_object
    x, t = batch(rank, 2, 64, args.n_class, args.seed, device)
    opt.update(lossfun, x, t)  # plan, broadcast, first-call overheads
    x, t = batch(rank, n, size, args.n_class, args.seed + 100, device)
    if devices.is_gpu(device):  # kernels for this size compiled untimed
        opt.update(lossfun, x, t)
    opt.stage_seconds.clear()
    before = dict(opt.comm_counters)
    devices.synchronize(device)
    comm.mpi_comm.Barrier()
    start = time.perf_counter()
    opt.update(lossfun, x, t)
    devices.synchronize(device)
    seconds = dict(opt.stage_seconds)
    seconds['total'] = time.perf_counter() - start
    return seconds, counters_delta(opt, before), opt


def print_table(title, gathered):
    """``gathered``: per rank ``(seconds, counters)``."""
    size = len(gathered)
    print(title)
    head = '{:<18}'.format('stage') + ''.join(
        '{:>12}'.format('rank {} s'.format(r)) for r in range(size))
    print(head + '   bytes sent per rank')
    for stage in STAGES + ('total',):
        row = '{:<18}'.format(stage) + ''.join(
            '{:>12.3f}'.format(sec.get(stage, 0.0)) for sec, _ in gathered)
        for name, keys in BYTES:
            if stage == name:
                row += '   ' + ' '.join(
                    '{:,}'.format(sum(c[k] for k in keys))
                    for _, c in gathered)
        print(row)


def owned_cost(gathered):
    """The slowest rank's inversion + preconditioning seconds."""
    return max(sec.get('inverse', 0.0) + sec.get('precondition', 0.0)
               for sec, _ in gathered)


def plan_only(world, args):
    if world.rank == 0:
        opt, _ = make_optimizer(world, args, 'float32')
        plan = plan_module.make_plan(opt.kfac_layers, opt.target, world.size)
        print('\n'.join(plan.lines()))


def write_json(args, size, results):
    import json
    record = {'processes': size, 'batch': args.batch, 'size': args.size,
              'bn_fisher': args.bn_fisher, 'factor_dtype': args.factor_dtype}
    for name, gathered in results.items():
        record[name] = [sec for sec, _ in gathered]
    directory = os.path.dirname(args.json)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump(record, f, indent=1)
    print('wrote {}'.format(args.json))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=32,
                        help='images per process')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--n-class', type=int, default=1000)
    parser.add_argument('--bn-fisher', default='diagonal',
                        choices=options.BN_FISHER)
    parser.add_argument('--factor-dtype', default='float32',
                        choices=options.FACTOR_DTYPES,
                        help='factors of the timed updates')
    parser.add_argument('--device', default='auto',
                        choices=devices.CHOICES,
                        help='one GPU per process (node-local rank)')
    parser.add_argument('--communicator', default='auto',
                        help="ChainerMN communicator ('auto': pure_nccl on "
                        "GPUs, naive on CPU)")
    parser.add_argument('--plan-only', action='store_true',
                        help='print the layer assignment for P and stop')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', metavar='PATH',
                        help='also write the stage seconds of every rank '
                        '(alone and together) as JSON, the input of '
                        'scripts/scaling_model.py --measured')
    args = parser.parse_args(argv)

    try:
        args.device_object = devices.get_process_device(
            args.device, communicator.world())
    except devices.DeviceError as e:
        parser.error('--device: {}'.format(e))
    args.device_object.use()
    name = devices.communicator_name(args.communicator, args.device_object)
    world = chainermn.create_communicator(name)
    if args.plan_only:
        plan_only(world, args)
        return
    root = world.rank == 0
    if root:
        print('ResNet-50, {} images of {}x{} per process, {} processes, '
              'BLAS threads per process: {}, bn_fisher={}, factors {}, '
              'device {}, communicator {}'.format(
                  args.batch, args.size, args.size, world.size,
                  os.environ['OMP_NUM_THREADS'], args.bn_fisher,
                  args.factor_dtype, devices.describe(args.device_object),
                  name))
        sys.stdout.flush()

    results = {}
    phases = [('together', world)]
    if world.size > 1:
        from mpi4py import MPI
        self_comm = chainermn.create_communicator(name,
                                                  mpi_comm=MPI.COMM_SELF)
        phases.insert(0, ('alone', self_comm))
    for name, comm in phases:
        seconds, counters, opt = timed_update(
            comm, args, args.factor_dtype, args.batch, args.size)
        gathered = world.gather_obj((seconds, counters))
        if root:
            title = ('{}: DistributedKFAC on {} process(es), every rank at '
                     'once'.format(name, comm.size))
            print_table(title, gathered)
            sys.stdout.flush()
        results[name] = gathered
        del opt
        world.mpi_comm.Barrier()

    # the wire bytes of the factors as packed float16 triangles
    _, counters16, _ = timed_update(world, args, 'float16', 2, 64)
    gathered16 = world.gather_obj(counters16)
    if not root:
        return
    if args.json:
        write_json(args, world.size, results)
    if 'alone' in results:
        alone = owned_cost(results['alone'])
        together = owned_cost(results['together'])
        print('inversion + preconditioning, slowest rank: {:.3f} s with {} '
              'processes vs {:.3f} s alone: {:.3f}x (target at P = 2: '
              '<= 0.6)'.format(together, world.size, alone,
                               together / alone))
    sent = sum(c['factor_bytes'] for c in gathered16)
    dense = sum(c['factor_dense_fp32_bytes'] for c in gathered16)
    print('factor bytes of one update, all ranks: {:,} as packed float16 '
          'triangles vs {:,} as dense float32: {:.3f}x (target <= 0.26)'
          .format(sent, dense, sent / dense))


if __name__ == '__main__':
    main()
