"""Report extensions whose whole state is part of a snapshot."""

import chainer
from chainer.training import extensions


class PlotReport(extensions.PlotReport):
    """Chainer's ``PlotReport`` that also saves its trigger and the
    observations gathered since its last point (as ``LogReport`` does), so
    that a resumed run draws the points of a run that never stopped."""

    def serialize(self, serializer: chainer.AbstractSerializer) -> None:
        super(PlotReport, self).serialize(serializer)
        self._trigger.serialize(serializer['_trigger'])
        self._summary.serialize(serializer['_summary'])
