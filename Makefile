# One command sets up and tests; one sets up and trains. The venv is made on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup test train clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'  # dev: pytest and the launcher plugins, so their tests run
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# Full pre-activation ResNet-110 on CIFAR-10 with the paper's protocol; extra settings go in ARGS,
# e.g. make train ARGS="block=original depth=164".
train: setup
	$(PY) train.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
