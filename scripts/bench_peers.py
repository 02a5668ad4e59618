#!/usr/bin/env python
"""chainerkfac side by side with peer K-FAC libraries.

For each framework (ours; ASDL, PyPI ``asdfghjkl``, on torch CPU; kfac-jax
on JAX CPU):

* ResNet-50, the same architecture, batch and every-step intervals (every
  factor rebuilt and inverted at every update): the time of one K-FAC update
  (forward, backward, factors, inversion, preconditioning, update; median
  of ``--repeats`` after one warm-up) divided by the same framework's
  momentum-SGD update;
* digits (scikit-learn, the same 80/20 split, the DigitsCNN architecture,
  batch 64, test accuracy every 5 iterations): iterations to 97% for each
  framework's K-FAC, best over a small grid of learning rate and damping.

A peer that cannot be imported or fails is printed as ``failed: <error>``
and the others go on.  Benchmark-only dependencies: ``requirements-bench.txt``
(torch, ASDL: same virtualenv as chainerkfac) and
``requirements-bench-jax.txt``
(kfac-jax: a virtualenv of its own, JAX needs numpy 2; ``--jax-python``).

Usage::

    python scripts/bench_peers.py [--frameworks chainerkfac asdl kfac-jax]
        [--image-size 224] [--batch 32] [--repeats 3] [--skip-resnet]
        [--skip-digits] [--jax-python .venv-jax/bin/python]
        [--out result/peers.png] [--json result/peers.json]
    python scripts/bench_peers.py --replot result/peers.json --out PNG
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy

FRAMEWORKS = ('chainerkfac', 'asdl', 'kfac-jax')
TARGET = 0.97
MAX_ITERATIONS = 400
EVAL_EVERY = 5
DIGITS_BATCH = 64
GRID = ((0.02, 3e-2), (0.05, 3e-2), (0.02, 1e-3), (0.05, 1e-3))
DAMPING = 1e-3  # ResNet-50 timing runs


def digits_arrays(split_seed=0):
    """The split of ``chainerkfac.datasets.get_digits`` as numpy arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(numpy.float32)[:, None]
    y = digits.target.astype(numpy.int32)
    return train_test_split(x, y, test_size=0.2, random_state=split_seed,
                            stratify=y)


def batches(n, batch, seed):
    """Index batches of shuffled epochs (one RandomState)."""
    rng = numpy.random.RandomState(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield order[i:i + batch]


def timed(step, repeats):
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def race(train_step, accuracy, seed=0):
    """Iterations until ``accuracy()`` reaches TARGET (None if never)."""
    x_tr = digits_arrays()[0]
    for i, index in enumerate(batches(len(x_tr), DIGITS_BATCH, seed), 1):
        train_step(index)
        if i % EVAL_EVERY == 0 and accuracy() >= TARGET:
            return i
        if i >= MAX_ITERATIONS:
            return None


# -- chainerkfac --------------------------------------------------------------
def ours_resnet(args):
    import chainerkfac  # noqa: F401 (first: makes Chainer importable)
    import chainer
    import chainer.functions as F
    from chainerkfac.links import ResNet50
    from chainerkfac.optimizers import KFAC
    rng = numpy.random.RandomState(0)
    x = rng.rand(args.batch, 3, args.image_size, args.image_size).astype(
        numpy.float32)
    t = rng.randint(0, 1000, args.batch).astype(numpy.int32)
    out = {}
    for name in ('kfac', 'sgd'):
        numpy.random.seed(0)
        model = ResNet50()
        opt = KFAC(lr=0.01, damping=DAMPING) if name == 'kfac' else \
            chainer.optimizers.MomentumSGD(lr=0.01)
        opt.setup(model)
        out[name] = timed(lambda: opt.update(
            lambda: F.softmax_cross_entropy(model(x), t)), args.repeats)
    return out


def ours_digits(args):
    from chainerkfac.examples import digits
    data = digits.datasets.get_digits()
    results = {}
    for lr, damping in GRID:
        history = digits.train('kfac', 0, MAX_ITERATIONS, EVAL_EVERY,
                               target=TARGET, data=data, lr=lr,
                               damping=damping)
        results['lr {} γ {}'.format(lr, damping)] = digits.iterations_to(
            history, TARGET)
    return results


# -- ASDL (torch) -------------------------------------------------------------
def torch_resnet50():
    from torch import nn

    def conv_bn(cin, cout, k, stride=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                nn.BatchNorm2d(cout)]

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride, projection):
            super().__init__()
            self.body = nn.Sequential(
                *conv_bn(cin, width, 1, stride), nn.ReLU(),
                *conv_bn(width, width, 3), nn.ReLU(),
                *conv_bn(width, 4 * width, 1))
            self.shortcut = nn.Sequential(
                *conv_bn(cin, 4 * width, 1, stride)) if projection else None

        def forward(self, x):
            h = self.body(x)
            return (h + (self.shortcut(x) if self.shortcut else x)).relu()

    layers = conv_bn(3, 64, 7, 2) + [nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for n, width, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2),
                             (3, 512, 2)):
        for i in range(n):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1,
                                     i == 0))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def torch_digits_cnn():
    from torch import nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def asdl_step(model, lr, damping, batch):
    """``step(x, t)`` of ASDL K-FAC (every-step curvature and inverses)."""
    import torch
    import asdl
    config = asdl.PreconditioningConfig(
        data_size=batch, damping=damping, preconditioner_upd_interval=1,
        curvature_upd_interval=1)
    maker = asdl.KfacGradientMaker(model, config,
                                   fisher_type=asdl.FISHER_EMP)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(x, t):
        opt.zero_grad()
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(torch.nn.functional.cross_entropy, dummy, t)
        maker.forward_and_backward()
        opt.step()
    return step


def sgd_step(model, lr):
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(x, t):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    return step


def asdl_resnet(args):
    import torch
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    t = torch.randint(0, 1000, (args.batch,))
    out = {}
    for name in ('kfac', 'sgd'):
        model = torch_resnet50()
        step = asdl_step(model, 0.01, DAMPING, args.batch) \
            if name == 'kfac' else sgd_step(model, 0.01)
        out[name] = timed(lambda: step(x, t), args.repeats)
    return out


def asdl_digits(args):
    import torch
    x_tr, x_te, y_tr, y_te = (torch.from_numpy(a) for a in digits_arrays())
    y_tr, y_te = y_tr.long(), y_te.long()
    results = {}
    for lr, damping in GRID:
        torch.manual_seed(0)
        model = torch_digits_cnn()
        step = asdl_step(model, lr, damping, DIGITS_BATCH)

        def accuracy():
            model.eval()
            with torch.no_grad():
                acc = (model(x_te).argmax(1) == y_te).double().mean().item()
            model.train()
            return acc

        results['lr {} γ {}'.format(lr, damping)] = race(
            lambda index: step(x_tr[index], y_tr[index]), accuracy)
    return results


# -- kfac-jax (its own virtualenv) --------------------------------------------
def jax_worker(task, args):
    """Runs in the kfac-jax virtualenv; prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import haiku as hk
    import kfac_jax
    import optax

    def make(net_fn, n_class):
        def loss_fn(params, state, batch, is_training=True):
            x, t = batch
            logits, state = net_fn.apply(params, state, None, x,
                                         is_training=is_training)
            kfac_jax.register_softmax_cross_entropy_loss(logits, t)
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits, t).mean()
            return loss, (state, logits)
        return loss_fn

    def kfac_optimizer(loss_fn, lr, damping):
        return kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn, has_aux=True),
            l2_reg=0.0, value_func_has_aux=True, value_func_has_state=True,
            use_adaptive_learning_rate=False, use_adaptive_momentum=False,
            use_adaptive_damping=False, initial_damping=damping,
            curvature_update_period=1, inverse_update_period=1,
            multi_device=False, num_burnin_steps=0)

    key = jax.random.PRNGKey(0)
    if task == 'resnet':
        def forward(x, is_training):
            return hk.nets.ResNet50(1000)(x, is_training=is_training)
        net = hk.transform_with_state(forward)
        x = jax.random.uniform(key, (args.batch, args.image_size,
                                     args.image_size, 3))
        t = jax.random.randint(key, (args.batch,), 0, 1000)
        batch = (x, t)
        params, state = net.init(key, x, is_training=True)
        loss_fn = make(net, 1000)
        opt = kfac_optimizer(loss_fn, 0.01, DAMPING)
        opt_state = opt.init(params, key, batch, func_state=state)
        holder = [params, state, opt_state, key]

        def kfac_step():
            p, s, o, k = holder
            k, sub = jax.random.split(k)
            p, o, s, _ = opt.step(p, o, sub, batch=batch, func_state=s,
                                  learning_rate=0.01, momentum=0.9,
                                  damping=DAMPING)
            jax.block_until_ready(p)
            holder[:] = [p, s, o, k]

        sgd = optax.sgd(0.01, momentum=0.9)
        sgd_holder = [params, state, sgd.init(params)]

        @jax.jit
        def sgd_update(p, s, o):
            (_, (s, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(
                p, s, batch)
            u, o = sgd.update(g, o, p)
            return optax.apply_updates(p, u), s, o

        def sgd_step():
            p, s, o = sgd_update(*sgd_holder)
            jax.block_until_ready(p)
            sgd_holder[:] = [p, s, o]
        return {'kfac': timed(kfac_step, args.repeats),
                'sgd': timed(sgd_step, args.repeats)}

    x_tr, x_te, y_tr, y_te = (jnp.asarray(a) for a in digits_arrays())
    x_tr, x_te = x_tr.transpose(0, 2, 3, 1), x_te.transpose(0, 2, 3, 1)

    def forward(x, is_training):
        h = x
        for width, stride in ((16, 1), (32, 2)):
            h = hk.Conv2D(width, 3, stride=stride, with_bias=False)(h)
            h = hk.BatchNorm(True, True, 0.9)(h, is_training=is_training)
            h = jax.nn.relu(h)
        return hk.Linear(10)(hk.Flatten()(h))
    net = hk.transform_with_state(forward)
    loss_fn = make(net, 10)
    results = {}
    for lr, damping in GRID:
        params, state = net.init(key, x_tr[:DIGITS_BATCH], is_training=True)
        opt = kfac_optimizer(loss_fn, lr, damping)
        first = (x_tr[:DIGITS_BATCH], y_tr[:DIGITS_BATCH])
        holder = [params, state, opt.init(params, key, first,
                                          func_state=state), key]

        def train_step(index):
            p, s, o, k = holder
            k, sub = jax.random.split(k)
            p, o, s, _ = opt.step(p, o, sub, batch=(x_tr[index],
                                                    y_tr[index]),
                                  func_state=s, learning_rate=lr,
                                  momentum=0.9, damping=damping)
            holder[:] = [p, s, o, k]

        def accuracy():
            logits, _ = net.apply(holder[0], holder[1], None, x_te,
                                  is_training=False)
            return float((logits.argmax(1) == y_te).mean())

        results['lr {} γ {}'.format(lr, damping)] = race(train_step,
                                                         accuracy)
    return results


def run_jax(task, args):
    python = args.jax_python
    if not os.path.exists(python):
        raise RuntimeError('{} not found: create the kfac-jax virtualenv '
                           '(make bench-venvs)'.format(python))
    command = [python, os.path.abspath(__file__), '--worker', task,
               '--image-size', str(args.image_size), '--batch',
               str(args.batch), '--repeats', str(args.repeats)]
    proc = subprocess.run(command, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode < 0:
        raise RuntimeError('kfac-jax worker killed by signal {}'.format(
            -proc.returncode))
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line]
        raise RuntimeError(lines[-1] if lines else 'exit {}'.format(
            proc.returncode))
    return json.loads(proc.stdout.strip().splitlines()[-1])


RUNNERS = {
    ('chainerkfac', 'resnet'): ours_resnet,
    ('chainerkfac', 'digits'): ours_digits,
    ('asdl', 'resnet'): asdl_resnet,
    ('asdl', 'digits'): asdl_digits,
    ('kfac-jax', 'resnet'): lambda args: run_jax('resnet', args),
    ('kfac-jax', 'digits'): lambda args: run_jax('digits', args),
}


def attempt(framework, task, args):
    """The runner's result, or ``'failed: <one line>'``."""
    try:
        return RUNNERS[(framework, task)](args)
    except Exception as e:  # a peer's failure is a result to report
        return 'failed: {}: {}'.format(type(e).__name__,
                                       ' '.join(str(e).split())[:300])


def plot(resnet, digits, path, frameworks=FRAMEWORKS, setting=''):
    # not in the kfac-jax worker's venv
    from chainerkfac.examples import peers_figure
    return peers_figure.plot(resnet, digits, path, frameworks, setting,
                             target=TARGET, digits_batch=DIGITS_BATCH,
                             max_iterations=MAX_ITERATIONS)


def save_results(path, args, resnet, digits):
    """The numbers of a run as JSON, for ``--replot``."""
    with open(path, 'w') as f:
        json.dump({'frameworks': list(args.frameworks),
                   'setting': setting_text(args), 'resnet': resnet,
                   'digits': digits}, f, indent=1, ensure_ascii=False)


def setting_text(args):
    return '{}x{}, batch {}'.format(args.image_size, args.image_size,
                                    args.batch)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frameworks', nargs='+', default=list(FRAMEWORKS),
                        choices=FRAMEWORKS)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--skip-resnet', action='store_true')
    parser.add_argument('--skip-digits', action='store_true')
    parser.add_argument('--jax-python', default='.venv-jax/bin/python')
    parser.add_argument('--out', default='result/peers.png')
    parser.add_argument('--json', metavar='PATH',
                        help='also write the numbers of the run as JSON')
    parser.add_argument('--replot', metavar='JSON',
                        help='only draw --out from the numbers a run wrote '
                        'with --json')
    parser.add_argument('--worker', choices=('resnet', 'digits'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(jax_worker(args.worker, args)))
        return
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        plot(saved['resnet'], saved['digits'], args.out,
             saved['frameworks'], saved.get('setting', ''))
        return
    resnet, digits = {}, {}
    if not args.skip_resnet:
        print('ResNet-50, {} images of {}x{}, every-step K-FAC (damping {}), '
              'median of {}:'.format(args.batch, args.image_size,
                                     args.image_size, DAMPING, args.repeats))
        print('{:<12} {:>10} {:>10} {:>8}'.format('framework', 'kfac_s',
                                                  'sgd_s', 'ratio'))
        for name in args.frameworks:
            resnet[name] = r = attempt(name, 'resnet', args)
            if isinstance(r, dict):
                print('{:<12} {:>10.3f} {:>10.3f} {:>8.2f}'.format(
                    name, r['kfac'], r['sgd'], r['kfac'] / r['sgd']))
            else:
                print('{:<12} {}'.format(name, r))
            sys.stdout.flush()
    if not args.skip_digits:
        print('digits: iterations to {:.0%} test accuracy (batch {}, every {};'
              ' - = not within {}), momentum 0.9:'.format(
                  TARGET, DIGITS_BATCH, EVAL_EVERY, MAX_ITERATIONS))
        for name in args.frameworks:
            digits[name] = r = attempt(name, 'digits', args)
            if isinstance(r, dict):
                print('{:<12} '.format(name) + ', '.join(
                    '{}: {}'.format(k, '-' if v is None else v)
                    for k, v in r.items()))
            else:
                print('{:<12} {}'.format(name, r))
            sys.stdout.flush()
    if args.json:
        save_results(args.json, args, resnet, digits)
    plot(resnet, digits, args.out, args.frameworks, setting_text(args))


if __name__ == '__main__':
    from chainerkfac.commands import show_log
    show_log('chainerkfac.figures')  # wrote ... on stdout
    sys.exit(main())
