from chainerkfac.links.model.digits_cnn import DigitsCNN  # NOQA
