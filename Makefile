# Two entry points on a fresh machine (Python 3.11 and a C compiler only):
#   make demo   # virtualenv + install + the main job: distributed K-FAC
#               # ResNet-50 on a generated ImageNet-style tree, 2 processes
#   make test   # virtualenv + install + the whole test suite
#   make digits # K-FAC vs MomentumSGD on scikit-learn's digits
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
export OMPI_ALLOW_RUN_AS_ROOT = 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1
export OMPI_MCA_rmaps_base_oversubscribe = 1

.PHONY: setup demo digits test bench-venvs peers clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet setuptools==73.0.1 wheel==0.45.1
	$(BIN)/python -m pip install --quiet --no-build-isolation -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

data/synthetic/train: | $(STAMP)
	$(BIN)/python scripts/make_synthetic_imagenet.py data/synthetic \
		--classes 4 --per-class 64 --size 40

demo: $(STAMP) data/synthetic/train
	OMP_NUM_THREADS=1 $(BIN)/mpiexec -n 2 $(BIN)/python \
		scripts/train_imagenet.py --config synthetic.yaml --out result

digits: $(STAMP)
	$(BIN)/python scripts/train_digits.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# benchmark-only: torch + ASDL next to chainerkfac in .venv (also enables
# tests/test_asdl_crosscheck.py), kfac-jax in .venv-jax (JAX needs numpy 2)
bench-venvs: $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	$(BIN)/python -m pip install --quiet numpy==1.26.4 setuptools==73.0.1
	$(PYTHON) -m venv .venv-jax
	.venv-jax/bin/python -m pip install --quiet -r requirements-bench-jax.txt

peers: bench-venvs
	$(BIN)/python scripts/bench_peers.py --jax-python .venv-jax/bin/python

clean:
	rm -rf $(VENV) .venv-jax
