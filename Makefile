# Two entry points: `make demo` (the CPU demo) and `make test` (the whole suite).
# Both create .venv on first use: the package, its dev tools, and the torch pair in constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env data demo test lint

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# Fashion-MNIST from Debian when we can install packages; else the demo downloads it into the cache,
# and with no network runs its digits recipe.
data:
	@if [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
		echo "could not install dataset-fashion-mnist; the demo will download it, or use its digits recipe"; \
	else echo "not root: the demo downloads Fashion-MNIST into ~/.cache/lejepa_scale (or runs on digits)"; fi

demo: env data
	$(PY) -m lejepa_scale.demo

# Two workers: the SLURM tests, one node then two (mostly waiting on SLURM), first on one of them; the
# other modules on whichever is free (tests/conftest.py)
test: env data
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

lint: env
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
