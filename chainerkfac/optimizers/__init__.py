from chainerkfac.optimizers.kfac import KFAC  # NOQA
from chainerkfac.optimizers.distributed_kfac import DistributedKFAC  # NOQA
