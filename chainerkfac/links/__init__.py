from chainerkfac.links.model.digits_cnn import DigitsCNN  # NOQA
from chainerkfac.links.model.resnet50 import ResNet50  # NOQA
from chainerkfac.links.model.resnet8 import ResNet8  # NOQA
