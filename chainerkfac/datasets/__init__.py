from chainerkfac.datasets.digits import get_digits  # NOQA
