"""K-FAC blocks, one class per covered link type."""

import typing

from chainerkfac.layers.base import compute_inverses  # NOQA
from chainerkfac.layers.base import Layer  # NOQA
from chainerkfac.layers.batch_normalization import BatchNormalizationLayer  # NOQA
from chainerkfac.layers.convolution_2d import Convolution2DLayer  # NOQA
from chainerkfac.layers.deconvolution_2d import Deconvolution2DLayer  # NOQA
from chainerkfac.layers.dilated_convolution_2d import DilatedConvolution2DLayer  # NOQA
from chainerkfac.layers.embed_id import EmbedIDLayer  # NOQA
from chainerkfac.layers.grouped_convolution_2d import GroupedConvolution2DLayer  # NOQA
from chainerkfac.layers.kronecker import KroneckerLayer  # NOQA
from chainerkfac.layers.linear import LinearLayer  # NOQA

#: The covered link types, most specific first.
LAYER_TYPES = (LinearLayer, GroupedConvolution2DLayer, Convolution2DLayer,
               DilatedConvolution2DLayer, Deconvolution2DLayer, EmbedIDLayer,
               BatchNormalizationLayer)


def layer_type_of(link: typing.Any) -> typing.Optional[type]:
    """The K-FAC block class covering ``link``, or None."""
    for layer_type in LAYER_TYPES:
        if layer_type.covers(link):
            return layer_type
    return None
