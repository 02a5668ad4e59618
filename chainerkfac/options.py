"""The choices of the optimizer's options, in one place (the optimizer, the
configs and the scripts check against them)."""

#: ``bn_fisher``: the paper's diagonal BN Fisher, the full 2C × 2C one, or
#: the unit-wise one (a 2 × 2 block over (γ_c, β_c) per channel; Osawa et
#: al., SP-NGD, 2020).
BN_FISHER = ('diagonal', 'full', 'unit')
#: ``factor_dtype``: the dtype factors are built, sent and stored in.
FACTOR_DTYPES = ('float32', 'float16')
#: ``momentum_schedule``: m by eq. 16 (the paper's text), or m(0) scaled by
#: η(t)/η(t−1) whenever the learning rate decreases (the authors' published
#: code).
MOMENTUM_SCHEDULES = ('eq16', 'lr_ratio')
#: ``weight_rescaling_variant``: eq. 18 always, the momentum including it
#: (the paper's text), or shrink only, the momentum excluding it (the
#: authors' published code).
WEIGHT_RESCALING_VARIANTS = ('paper', 'published')
#: ``loss_reduction``: the loss is the mean, or the sum, of per-sample ones.
LOSS_REDUCTIONS = ('mean', 'sum')
#: ``refresh``: eq. 20/21's fixed intervals (``a_interval``, ``g_interval``)
#: or an interval per factor set from its relative change
#: (:mod:`chainerkfac.refresh`).
REFRESH = ('fixed', 'adaptive')
#: ``fisher``: G (and the BN Fisher) from the gradients at the data's labels
#: (the empirical Fisher, eq. 3) or at labels sampled from the model's
#: softmax (the Fisher, :mod:`chainerkfac.sampled_fisher`).
FISHER = ('empirical', 'sampled')
