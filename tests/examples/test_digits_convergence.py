"""Real data: K-FAC reaches 97% test accuracy on scikit-learn's digits in
fewer iterations than MomentumSGD at the best of five learning rates."""

import pytest

from chainerkfac.examples import digits


TARGET = 0.97
EVAL_EVERY = 5
MAX_ITERATIONS = 200


@pytest.fixture(scope='module')
def data():
    return digits.datasets.get_digits()


def test_digits_split_is_80_20_of_real_images(data):
    train, test = data
    assert (len(train), len(test)) == (1437, 360)
    x, t = train[0]
    assert x.shape == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert len(set(int(t) for _, t in test)) == 10


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.slow
def test_kfac_beats_best_sgd_learning_rate(seed, data):
    history = digits.train('kfac', seed, MAX_ITERATIONS, EVAL_EVERY,
                           target=TARGET, data=data)
    kfac_iterations = digits.iterations_to(history, TARGET)
    assert kfac_iterations is not None, history
    # Every SGD learning rate of the grid, given the same budget (same
    # model, seed, batches and evaluation points), stays below the target.
    for lr in digits.SGD_LRS:
        sgd = digits.train('sgd', seed, kfac_iterations, EVAL_EVERY,
                           target=TARGET, data=data, lr=lr)
        assert digits.iterations_to(sgd, TARGET) is None, (lr, sgd[-1])
