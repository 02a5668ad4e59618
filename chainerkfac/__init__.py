"""chainerkfac: distributed K-FAC for Chainer (Osawa et al., CVPR 2019)."""

from chainerkfac import compat
compat.apply()  # before anything imports Chainer

from chainerkfac import damping  # NOQA: E402
from chainerkfac import factors  # NOQA: E402
from chainerkfac import inverse  # NOQA: E402
from chainerkfac import layers  # NOQA: E402
from chainerkfac import links  # NOQA: E402
from chainerkfac import optimizers  # NOQA: E402

__version__ = '0.1.0'

from chainerkfac.optimizers import DistributedKFAC  # NOQA: E402
from chainerkfac.optimizers import KFAC  # NOQA: E402
