"""MPI worker of tests/test_gpu.py: DistributedKFAC on a device.

``mpiexec -n P python device_worker.py --device DEV --communicator NAME
--factor-dtype DTYPE --out RESULT.json``

Every rank trains the same conv + linear net (no BatchNormalization, so the
P-process run equals one process on the concatenated batch) with
DistributedKFAC on DEV (``cpu``, or ``gpu``: GPU 0, shared by all ranks for
the MPI communicators; NCCL needs one GPU per rank) for 3 updates.  Rank 0
then trains the same net with single-process KFAC on the CPU on the
concatenation of every rank's batches and writes to RESULT.json the largest
difference of the weights over ranks and against that reference, relative
to the size of the update.
"""

import argparse
import json
import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import chainerkfac  # noqa: E402,F401 (first: makes Chainer importable)
import chainer  # NOQA: E402
import chainer.functions as F  # NOQA: E402
import chainer.links as L  # NOQA: E402
import chainermn  # NOQA: E402
import numpy  # NOQA: E402

from chainerkfac import devices  # NOQA: E402
from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402
from chainerkfac.optimizers import KFAC  # NOQA: E402

UPDATES = 3
PER_RANK = 4


class Net(chainer.Chain):
    def __init__(self):
        super(Net, self).__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(3, 4, 3, pad=1)
            self.fc = L.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)))


def make_net():
    numpy.random.seed(0)
    return Net()


def batches(rank):
    rng = numpy.random.RandomState(100 + rank)
    return [(rng.randn(PER_RANK, 3, 6, 6).astype(numpy.float32),
             rng.randint(0, 5, PER_RANK).astype(numpy.int32))
            for _ in range(UPDATES)]


def train(optimizer, model, data, device):
    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)
    for x, t in data:
        optimizer.update(lossfun, *device.send((x, t)))
    return {name: chainer.backend.CpuDevice().send(p.array)
            for name, p in model.namedparams()}


HYPER = dict(lr=0.1, momentum=0.9, damping=1e-2)


def worker_device(choice, communicator, intra_rank, local_size):
    """The device of this rank: with an MPI communicator, ranks share the
    node's GPUs (all on GPU 0 with one GPU); NCCL needs one GPU per rank."""
    return devices.get_device(choice, intra_rank, local_size,
                              share=communicator != 'pure_nccl')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--device', choices=('cpu', 'gpu'), required=True)
    parser.add_argument('--communicator', default='naive')
    parser.add_argument('--factor-dtype', default='float32')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    comm = chainermn.create_communicator(args.communicator)
    device = worker_device(args.device, args.communicator, comm.intra_rank,
                           comm.intra_size)
    device.use()
    model = make_net()
    initial = {name: p.array.copy() for name, p in model.namedparams()}
    model.to_device(device)
    optimizer = DistributedKFAC(comm, factor_dtype=args.factor_dtype,
                                print_plan=False, **HYPER).setup(model)
    mine = train(optimizer, model, batches(comm.rank), device)
    gathered = comm.gather_obj(mine)
    if comm.rank != 0:
        return
    everyone = [batches(r) for r in range(comm.size)]
    joined = [tuple(numpy.concatenate([b[i][k] for b in everyone])
                    for k in (0, 1)) for i in range(UPDATES)]
    reference_model = make_net()
    reference = train(
        KFAC(factor_dtype=args.factor_dtype, **HYPER).setup(reference_model),
        reference_model, joined, chainer.get_device('@numpy'))
    result = {'ranks_differ': 0.0, 'vs_reference': 0.0}
    for name, ref in reference.items():
        step = float(numpy.abs(ref - initial[name]).max()) or 1.0
        for weights in gathered:
            result['ranks_differ'] = max(result['ranks_differ'], float(
                numpy.abs(weights[name] - gathered[0][name]).max()))
            result['vs_reference'] = max(result['vs_reference'], float(
                numpy.abs(weights[name] - ref).max()) / step)
    result['processes'] = comm.size
    result['device'] = str(device)
    result['kfac_communicator'] = type(optimizer.kfac_comm).__name__
    with open(args.out, 'w') as f:
        json.dump(result, f)


if __name__ == '__main__':
    main()
