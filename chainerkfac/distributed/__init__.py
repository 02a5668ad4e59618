"""What distributes K-FAC over processes (Osawa et al. 2019, Section 4).

- :mod:`~chainerkfac.distributed.assignment`: which process owns which
  layer's inversion, from the layer-cost (FLOP) model;
- :mod:`~chainerkfac.distributed.plan`: the blocks of a model (its K-FAC
  layers and the ``'(other)'`` pseudo-block), their costs and owners;
- :mod:`~chainerkfac.distributed.layout`: the flat buffers of stages 3 and
  6, piece by piece;
- :mod:`~chainerkfac.distributed.packing`: symmetric factors as their packed
  upper triangles (Section 4.3);
- :mod:`~chainerkfac.distributed.counters`: what a process sent;
- :mod:`~chainerkfac.distributed.communicator`: ReduceScatterV and
  AllGatherV over MPI or NCCL, the broadcasts, and the abort hook.
"""
