"""The test suite; its folders mirror the package's.

``reference.py`` is the independent NumPy reference of a K-FAC step,
``nets.py`` the small models, ``mpi/`` the workers run under ``mpiexec``
and how to launch them, ``data/`` fixtures.
"""

import os

#: the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: this folder
TESTS = os.path.join(ROOT, 'tests')
