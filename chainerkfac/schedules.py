"""Hyperparameter schedules: warmup damping, polynomial lr, stale intervals.

All functions are pure; the paper's equation numbers are in the docstrings.
"""

import fractions
import math

IMAGENET_TRAIN_SIZE = 1281167


def _check_positive(**kwargs):
    for name, value in kwargs.items():
        if not value > 0:
            raise ValueError('{} must be positive, got {}'.format(name, value))


def _check_warmup(damping, damping_target, t_warmup):
    _check_positive(damping=damping, damping_target=damping_target,
                    t_warmup=t_warmup)
    if damping_target > damping:
        raise ValueError('damping_target must be <= damping, got {} > {}'
                         .format(damping_target, damping))


def warmup_bound(damping: float, damping_target: float) -> float:
    """The fewest warmup iterations for which eq. 13's α stays in (0, 1]
    (so that γ(t) of eq. 14 decays to γ_target without changing sign):
    ``2·log10(γ(0)/γ_target)``."""
    return 2 * math.log10(damping / damping_target)


def warmup_damping_alpha(damping: float, damping_target: float,
                         t_warmup: int) -> float:
    """α = 2·log10(γ(0)/γ_target)/t_warmup (eq. 13), in [0, 1]: a
    shorter warmup than :func:`warmup_bound` would make γ(1) negative and
    is refused."""
    _check_warmup(damping, damping_target, t_warmup)
    alpha = warmup_bound(damping, damping_target) / t_warmup
    if alpha > 1:
        raise ValueError(
            'the damping warmup is too short: eq. 13 gives alpha = '
            '2*log10(damping/damping_target)/t_warmup = {:.3g} > 1 (t_warmup '
            '{} iterations, at least {:.3g} needed), so damping would turn '
            'negative'.format(alpha, t_warmup,
                              warmup_bound(damping, damping_target)))
    return alpha


def warmup_damping(t: int, damping: float, damping_target: float,
                   t_warmup: int) -> float:
    """γ(t) of γ(t+1) = (1−α)γ(t) + α·γ_target, γ(0) = damping (eq. 14)."""
    alpha = warmup_damping_alpha(damping, damping_target, t_warmup)
    if t < 0:
        raise ValueError('t must be non-negative, got {}'.format(t))
    if damping == damping_target:
        return damping
    return damping_target + (1 - alpha) ** t * (damping - damping_target)


def warmup_iterations(e_start: float, batch_size: int,
                      n_train: int = IMAGENET_TRAIN_SIZE) -> int:
    """t_warmup = ⌈e_start·n_train/batch_size⌉ (Table 3)."""
    _check_positive(e_start=e_start, batch_size=batch_size, n_train=n_train)
    e_start = fractions.Fraction(str(e_start))
    return int(math.ceil(e_start * n_train / fractions.Fraction(batch_size)))


def epoch(iteration: int, batch_size: int, n_train: int) -> float:
    """e = iteration·batch_size/n_train, the fractional epoch of eq. 15-16."""
    return iteration * batch_size / n_train


def polynomial_lr(e: float, lr: float, e_start: float, e_end: float,
                  p_decay: float) -> float:
    """η(e) = η(0)·(1 − (e − e_start)/(e_end − e_start))^p_decay (eq. 15)."""
    if e < e_start:
        return lr
    if e >= e_end:
        return 0.0
    return lr * (1 - (e - e_start) / (e_end - e_start)) ** p_decay


def momentum(e: float, lr: float, momentum0: float, e_start: float,
             e_end: float, p_decay: float) -> float:
    """m(e) = m(0)·η(e)/η(0) (eq. 16)."""
    return momentum0 * polynomial_lr(e, lr, e_start, e_end, p_decay) / lr


def stale_interval_eq20(iteration: int, e: float) -> int:
    """1 for the first 500 iterations, then min(20, 5·⌊e/5⌋ + 1) (eq. 20)."""
    if iteration < 500:
        return 1
    return min(20, 5 * int(math.floor(e / 5)) + 1)


def stale_interval_eq21(e: float) -> int:
    """1 if e < 13 else 20 (eq. 21)."""
    return 1 if e < 13 else 20


def stale_interval(rule: str, iteration: int, e: float) -> int:
    """Refresh interval of rule 'eq20' (eq. 20), 'eq21' (eq. 21) or 'none'."""
    if rule == 'eq20':
        return stale_interval_eq20(iteration, e)
    if rule == 'eq21':
        return stale_interval_eq21(e)
    if rule == 'none':
        return 1
    raise ValueError("unknown stale rule {!r}; expected 'eq20', 'eq21' or "
                     "'none'".format(rule))


def refresh_fraction(rule: str, batch_size: int, epochs: float,
                     n_train: int = IMAGENET_TRAIN_SIZE) -> float:
    """Fraction of the iterations of a run that rebuild the factors: those
    t with ``t % interval(t) == 0`` over t < ⌈epochs·n_train/batch_size⌉."""
    _check_positive(batch_size=batch_size, epochs=epochs, n_train=n_train)
    total = int(math.ceil(epochs * n_train / batch_size))
    due = sum(1 for t in range(total) if t % stale_interval(
        rule, t, epoch(t, batch_size, n_train)) == 0)
    return due / total
