"""What distributes K-FAC over processes (Osawa et al. 2019, Section 4).

- :mod:`~chainerkfac.distributed.assignment`: which process owns which
  layer's inversion, from the layer-cost model;
- :mod:`~chainerkfac.distributed.packing`: symmetric factors as their packed
  upper triangles (Section 4.3);
- :mod:`~chainerkfac.distributed.communicator`: ReduceScatterV and
  AllGatherV over MPI or NCCL, the broadcasts, and the abort hook.
"""
