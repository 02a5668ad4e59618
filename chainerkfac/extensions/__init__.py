from chainerkfac.extensions.kfac_schedule import KFACSchedule  # NOQA
