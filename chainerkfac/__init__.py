"""chainerkfac: distributed K-FAC for Chainer (Osawa et al., CVPR 2019)."""

from chainerkfac import damping  # NOQA
from chainerkfac import factors  # NOQA
from chainerkfac import inverse  # NOQA
from chainerkfac import layers  # NOQA
from chainerkfac import links  # NOQA
from chainerkfac import optimizers  # NOQA

__version__ = '0.1.0'
