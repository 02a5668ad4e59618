from chainerkfac.datasets.digits import get_digits  # NOQA
from chainerkfac.datasets.fashion_mnist import load_fashion_mnist  # NOQA
from chainerkfac.datasets.imagenet import DatasetError  # NOQA
from chainerkfac.datasets.imagenet import find_images  # NOQA
from chainerkfac.datasets.imagenet import ImageNetDataset  # NOQA
from chainerkfac.datasets.imagenet import load_or_compute_mean  # NOQA
