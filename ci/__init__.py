"""The project's CI tooling, kept out of the installed package.

``.ci/run`` is what CI runs (``make test``); :mod:`ci.gpu_check` is the check
of a GPU machine without network (``scripts/gpu_check.sh``, ``make
gpu-check``; ``make gpu-dryrun`` runs it on a simulated image of that
machine).  Standard library only.
"""
