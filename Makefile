# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test test-fast bench lint clean

$(BIN)/medvox: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/medvox

install: $(BIN)/medvox

demo: install
	$(BIN)/medvox demo

# Two workers (each with its share of the CPUs), then the tests that measure time, alone on the machine.
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS)

test: install
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not alone"
	$(BIN)/python -m pytest -q -m alone

test-fast: install
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

bench: install
	$(BIN)/python benchmarks/run.py

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo_data demo_results .pytest_cache
