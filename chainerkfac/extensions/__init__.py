from chainerkfac.extensions.kfac_schedule import KFACSchedule  # NOQA
from chainerkfac.extensions.fisher_diff import FisherDiff  # NOQA
from chainerkfac.extensions.fisher_diff import relative_change  # NOQA
from chainerkfac.extensions.factor_builds import FactorBuilds  # NOQA
