"""The choices of the optimizer's options, in one place (the optimizer, the
configs and the scripts check against them)."""

#: ``bn_fisher``: the paper's diagonal BN Fisher, the full 2C × 2C one, or
#: the unit-wise one (a 2 × 2 block over (γ_c, β_c) per channel; Osawa et
#: al., SP-NGD, 2020).
BN_FISHER = ('diagonal', 'full', 'unit')
#: ``factor_dtype``: the dtype factors are built, sent and stored in.
FACTOR_DTYPES = ('float32', 'float16')
#: ``loss_reduction``: the loss is the mean, or the sum, of per-sample ones.
LOSS_REDUCTIONS = ('mean', 'sum')
