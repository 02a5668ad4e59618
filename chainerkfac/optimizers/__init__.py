from chainerkfac.optimizers.kfac import KFAC  # NOQA
