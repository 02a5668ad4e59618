"""K-FAC blocks, one class per covered link type."""

from chainerkfac.layers.base import compute_inverses  # NOQA
from chainerkfac.layers.base import Layer  # NOQA
from chainerkfac.layers.batch_normalization import BatchNormalizationLayer  # NOQA
from chainerkfac.layers.convolution_2d import Convolution2DLayer  # NOQA
from chainerkfac.layers.kronecker import KroneckerLayer  # NOQA
from chainerkfac.layers.linear import LinearLayer  # NOQA

#: The covered link types, most specific first.
LAYER_TYPES = (LinearLayer, Convolution2DLayer, BatchNormalizationLayer)


def layer_type_of(link):
    """The K-FAC block class covering ``link``, or None."""
    for layer_type in LAYER_TYPES:
        if isinstance(link, layer_type.link_type):
            return layer_type
    return None
